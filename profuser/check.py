"""The preflight: can this run start? `profuser check CONFIG` prints it; `prep`, `train` and `eval`
run it first (cheaply: no weights are loaded) and stop with the same messages before any stage
starts (`--skip-check` to go on regardless).

Checked: every path; every tokenizer and chat template (rendering a conversation of every kind the
data holds, with the prompt a prefix of the conversation, and an end-of-turn token); model weight
files readable (safetensors headers and sizes, shard indexes, GGUF headers, no pickles unless
allowed) and a GGUF target trainable; `prep.topk` within every source's vocabulary; every rule
scorer importable and giving a finite score on one record; the data readable, with every bad row
rejected with its reason (special-token strings and lone surrogates included) and some rows left
that fit every model's max_length; the DeepSpeed config parses and agrees with the `train` section;
the training set (train) and the held-out set (eval) are readable.

Reads files only: no weights unless --load-weights, nothing written; every failure is a reported
problem, never a traceback.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from profuser.config import ConfigError, ModelConfig, RunConfig, load_config, missing_paths

COMMANDS = ("check", "prep", "train", "eval")
SAMPLE_ROWS = 256  # rows formatted with every model by the preflight of prep (check: every row)


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        out = list(self.lines)
        if self.problems:
            out += ["", f"NOT READY — {len(self.problems)} problem(s):"] + [f"  - {p}" for p in self.problems]
        else:
            out += ["", "READY: the run can start."]
        return "\n".join(out)


def _offsets_available(tok) -> bool:
    from profuser.models import has_offsets

    return has_offsets(tok)


def check_alignment(cfg: RunConfig, loaded: dict, record: dict, rep: CheckReport) -> None:
    """Align one real sample from every source to the target through the align stage's own code
    (vocabulary tables are built and cached in the user cache, vocab_map.cache_dir(), where prep reuses them), so a
    pair that cannot be aligned fails here, before any model is loaded for prep. `loaded`: (role,
    name) -> ChatModel of the tokenizers that loaded."""
    import numpy as np

    from profuser.chat import encode_chat, end_of_turn_id
    from profuser.data import Reject
    from profuser.prep.align_stage import Target, align_sample, make_pair

    target = loaded.get(("target", cfg.target.name))
    if target is None or any(p.startswith(f"target {cfg.target.name}") for p in rep.problems):
        return  # its problem is reported already
    max_len = cfg.target.max_length or cfg.data.max_length
    tgt = Target(target, end_of_turn_id(target.tokenizer, target.template), max_len)
    from profuser.vocab_map import cache_dir

    cache = cache_dir()
    for spec in cfg.sources:
        chat_model = loaded.get(("source", spec.name))
        if chat_model is None or any(p.startswith(f"source {spec.name}") for p in rep.problems):
            continue
        try:
            pair = make_pair(cfg, cache, spec, tgt, chat_model)
            enc = encode_chat(chat_model.tokenizer, chat_model.template, record["messages"], record["reference"])
            ids = np.asarray(enc.input_ids[enc.prompt_len:], dtype=np.int64)
            zeros = np.zeros((len(ids), 1), dtype=np.float32)
            out = align_sample(pair, tgt, "truncate_left", record["messages"], record["reference"], ids, zeros[:, 0],
                               ids[:, None].astype(np.int32), zeros)
        except Reject as e:
            rep.problems.append(f"source {spec.name}: its tokens cannot be aligned with the target "
                                f"{cfg.target.name} ({e.kind}): {e.detail}")
            continue
        except Exception as e:  # noqa: BLE001 — reported with the source named; the check goes on
            rep.problems.append(f"source {spec.name}: aligning it with the target {cfg.target.name} failed: "
                                f"{type(e).__name__}: {e}")
            continue
        how = {"spans": "byte spans", "mined": "MinED, no offsets: 1:1 pairs only"}[pair.method]
        rep.add(f"align {spec.name} -> {cfg.target.name}: {'copy (same tokenizer)' if pair.copy else how}; "
                f"sample {record['id']}: {out['n_text_transferred']} of {out['n_text']} target positions holding "
                f"response text get a teacher distribution")


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, RuntimeError)) else str(e)


# --------------------------------------------------------------------------------------------
# pieces, each returning problems as "key: what is wrong" strings


def conversation_kinds(records: list[dict]) -> dict[str, dict]:
    """The first record of each kind of conversation in the data (single-turn, with a system
    message, multi-turn): a template must render every kind that occurs."""
    kinds: dict[str, dict] = {}
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        kind = ("system + " if roles and roles[0] == "system" else "") + (
            "multi-turn" if roles.count("user") > 1 else "single-turn")
        kinds.setdefault(kind, r)
    if not kinds:
        kinds["single-turn"] = {"id": "probe", "messages": [{"role": "user", "content": "Hi"}], "reference": "Hello"}
    return kinds


def template_problems(chat_model, kinds: dict[str, dict]) -> list[str]:
    """The chat template renders each kind of conversation, its generation prompt is a prefix of
    the rendered conversation, and an assistant turn ends with a token."""
    from profuser.chat import end_of_turn_id, split_response

    out = []
    for kind, rec in kinds.items():
        try:
            split_response(chat_model.tokenizer, chat_model.template, rec["messages"], rec["reference"])
        except Exception as e:  # noqa: BLE001 — any template failure is the user's to fix
            out.append(f"{chat_model.name}: chat template ({chat_model.template_source}) fails on a {kind} conversation "
                       f"(record {rec['id']!r}): {_err(e)}")
    if not out:
        try:
            if end_of_turn_id(chat_model.tokenizer, chat_model.template) is None:
                out.append(f"{chat_model.name}: no end-of-turn token: the template ends an assistant turn with no special "
                           "token and the tokenizer has no EOS, so generation could never stop")
        except Exception as e:  # noqa: BLE001
            out.append(f"{chat_model.name}: chat template ({chat_model.template_source}): {_err(e)}")
    return out


def vocab_size(spec: ModelConfig, tokenizer) -> int:
    """The width of the model's logits (config.json's vocab_size), or the tokenizer's length."""
    p = Path(spec.path) / "config.json"
    if p.is_file():
        try:
            c = json.loads(p.read_text())
            v = c.get("vocab_size") or (c.get("text_config") or {}).get("vocab_size")
            if isinstance(v, int) and v > 0:
                return v
        except (OSError, ValueError):
            pass
    return len(tokenizer)


def gguf_trainable_problems(spec: ModelConfig, load_weights: bool) -> list[str]:
    """A GGUF target trains from its dequantized weights (profuser.models.dequantize_gguf): its
    architecture must be one transformers maps from GGUF; with weights, the dequantized model must
    have only floating-point, trainable parameters once the GGUF quantizer is dropped."""
    from transformers import AutoConfig

    path = Path(spec.path)
    try:
        AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001
        return [f"target {spec.name}: transformers cannot build a model from this GGUF ({_err(e)})"]
    if not load_weights:
        return []
    import torch

    from profuser.models import load_model

    model, _ = load_model(spec, device="cpu", dtype=torch.float32, place=False)
    bad = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    del model
    if bad:
        return [f"target {spec.name}: the GGUF's weights do not dequantize to float tensors ({bad[:3]}); "
                "it cannot be trained"]
    return []


def rule_scorer_problems(i: int, s, record: Optional[dict]) -> list[str]:
    """A rule scorer imports and gives a finite number on one record (its reference as the response)."""
    from profuser.prep.score import RuleScorer

    try:
        scorer = RuleScorer(s)
    except Exception as e:  # noqa: BLE001 — ImportError, AttributeError, errors at import time
        return [f"scorers.{i}.function: cannot import {s.function!r}: {_err(e)}"]
    if not callable(scorer.fn):
        return [f"scorers.{i}.function: {s.function!r} is not callable"]
    if record is None:
        return []
    try:
        (v,) = scorer.score([record], [record["reference"]])
    except Exception as e:  # noqa: BLE001
        return [f"scorers.{i}.function: {s.function!r} fails on record {record['id']!r} (its reference as the "
                f"response): {_err(e)}"]
    if not math.isfinite(v):
        return [f"scorers.{i}.function: {s.function!r} gives {v} on record {record['id']!r}; scores must be finite"]
    return []


def deepspeed_problems(cfg: RunConfig) -> list[str]:
    """train.deepspeed parses as JSON, and its values that are not "auto" agree with `train`."""
    path = cfg.train.deepspeed
    if not path or not Path(path).is_file():
        return []
    key = "train.deepspeed"
    try:
        ds = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        return [f"{key}: {path} is not UTF-8 text ({e})"]
    except json.JSONDecodeError as e:
        return [f"{key}: {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"]
    if not isinstance(ds, dict):
        return [f"{key}: {path} must hold a JSON object, not {type(ds).__name__}"]
    t, out = cfg.train, []

    def agree(ds_key: str, value, ours, our_key: str) -> None:
        if value is None or value == "auto":
            return
        same = (abs(float(value) - float(ours)) <= 1e-12 * max(1.0, abs(float(ours)))
                if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(ours, (int, float))
                else value == ours)
        if not same:
            out.append(f"{key}: {path} sets {ds_key}={value!r} but {our_key} is {ours!r}; set it to \"auto\" "
                       f"(filled from the run config) or make the two agree")

    agree("train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu"), t.per_device_train_batch_size,
          "train.per_device_train_batch_size")
    agree("gradient_accumulation_steps", ds.get("gradient_accumulation_steps"), t.gradient_accumulation_steps,
          "train.gradient_accumulation_steps")
    agree("gradient_clipping", ds.get("gradient_clipping"), t.max_grad_norm, "train.max_grad_norm")
    agree("bf16.enabled", (ds.get("bf16") or {}).get("enabled"), t.bf16, "train.bf16")
    agree("fp16.enabled", (ds.get("fp16") or {}).get("enabled"), False, "fp16 (not supported by this trainer)")
    opt = (ds.get("optimizer") or {}).get("params") or {}
    agree("optimizer.params.lr", opt.get("lr"), t.learning_rate, "train.learning_rate")
    agree("optimizer.params.weight_decay", opt.get("weight_decay"), t.weight_decay, "train.weight_decay")
    out += _optimizer_problems(ds, path, t.optim)
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        out.append(f"{key}: {path} sets zero_optimization.stage={stage!r}; use 0, 1, 2 or 3")
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        v = ds.get(k)
        if v is not None and v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            out.append(f"{key}: {path} sets {k}={v!r}; use a positive integer or \"auto\"")
    return out


# the train.optim values that mean the same optimizer as a DeepSpeed "AdamW" block filled from the config
_ADAMW = ("adamw_torch", "adamw_torch_fused")


def _optimizer_problems(ds: dict, path: str, optim: str) -> list[str]:
    """A DeepSpeed "optimizer" block replaces train.optim: refuse a train.optim it would silently ignore."""
    block = ds.get("optimizer")
    if not isinstance(block, dict):
        return []
    kind = block.get("type")
    if str(kind).lower() == "adamw" and optim in _ADAMW:
        return []
    offload = ((ds.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") not in (None, "none")
    other = 'a DeepSpeed config without an "optimizer" block' + (
        " and without offload_optimizer (DeepSpeed refuses another optimizer under ZeRO-Offload), e.g. "
        "deepspeed_configs/zero3.json" if offload else "")
    fix = (f"use train.optim={_ADAMW[0]} (the same AdamW) or, for {optim}, {other}" if str(kind).lower() == "adamw"
           else f"to train with {optim}, use {other}")
    return [f"train.optim: {optim!r} would be ignored: {path} defines its own optimizer ({kind!r}); {fix}"]


def training_set_problems(data_dir: Path) -> list[str]:
    """The build output reads: a complete manifest, and every shard what its sidecar says was written."""
    from profuser.prep.shards import check_shard_file
    from profuser.train.dataset import TrainingSetError, shard_paths

    try:
        shards = shard_paths(data_dir)
    except TrainingSetError as e:
        return [f"training set: {e}"]
    out = []
    for s in shards:
        side = s.with_suffix(".json")
        want = None
        if side.is_file():
            try:
                want = json.loads(side.read_text()).get("file")
            except (OSError, ValueError):
                pass
        why = check_shard_file(s, want, full=False)
        if why:
            out.append(f"training set: {s} is damaged ({why}); rerun `profuser prep CONFIG` to redo it")
    return out


# --------------------------------------------------------------------------------------------
# the whole preflight


def run_check(cfg: RunConfig, load_weights: bool = False, command: str = "check", model: Optional[str] = None,
              data_dir: Optional[str] = None) -> CheckReport:
    """Everything that can be known before the run starts, for `command` (check: all of it)."""
    from profuser import data as data_mod
    from profuser.models import load_chat_tokenizer, weight_problems

    assert command in COMMANDS, command
    rep = CheckReport()
    # eval needs neither the training data nor the DeepSpeed config
    skip = ("data.path", "train.deepspeed") if command == "eval" else ()
    rep.problems += [p for p in missing_paths(cfg) if not p.startswith(skip)]
    rep.add(f"run_dir: {cfg.run_dir}")
    rep.add("")

    # which models this command needs
    roles: list[tuple[str, ModelConfig]] = []
    if command in ("check", "prep"):
        roles = [*(("source", s) for s in cfg.sources), ("target", cfg.target)]
    elif command == "train":
        roles = [("target", cfg.target)]
    elif command == "eval":
        from profuser.evaluate import resolve_model

        try:
            roles = [("model", resolve_model(cfg, model))] if model else []
        except ValueError as e:
            rep.problems.append(str(e))

    # data first (the templates are tried on the kinds of conversation it holds)
    records: list[dict] = []
    res = None
    data_path = cfg.data.eval_path if command == "eval" else cfg.data.path
    data_key = "data.eval_path" if command == "eval" else "data.path"
    if command != "train" and data_path and Path(data_path).exists():
        try:
            res = data_mod.normalize(data_path, cfg.data.format, None if command == "eval" else cfg.data.limit)
        except ValueError as e:
            rep.problems.append(f"{data_key}: {e}")
        else:
            records = res.records
    elif command == "eval" and not data_path:
        rep.problems.append("data.eval_path: not set; `profuser eval` needs a held-out set (same formats as data.path)")
    kinds = conversation_kinds(records)

    header = f"{'role':8} {'name':22} {'tokenizer':26} {'vocab':>7} {'offsets':8} {'chat template':24} {'end of turn':12}"
    rep.add(header)
    rep.add("-" * len(header))
    loaded = {}
    for role, spec in roles:
        if not Path(spec.path).exists():
            rep.add(f"{role:8} {spec.name:22} (path missing)")
            continue
        try:
            chat_model = load_chat_tokenizer(spec)
        except Exception as e:  # noqa: BLE001 — every failure is reported, none stops the check
            rep.add(f"{role:8} {spec.name:22} FAILED")
            rep.problems.append(f"{role} {spec.name}: {_err(e)}")
            continue
        loaded[(role, spec.name)] = chat_model
        tmpl = template_problems(chat_model, kinds)
        rep.problems += [f"{role} {p}" for p in tmpl]
        eot_s = "?"
        if not tmpl:
            from profuser.chat import end_of_turn_id

            eot_s = chat_model.tokenizer.convert_ids_to_tokens(end_of_turn_id(chat_model.tokenizer, chat_model.template))
        vocab = vocab_size(spec, chat_model.tokenizer)
        rep.add(f"{role:8} {spec.name:22} {type(chat_model.tokenizer).__name__:26} {len(chat_model.tokenizer):>7} "
                f"{'yes' if _offsets_available(chat_model.tokenizer) else 'no':8} {chat_model.template_source:24} {eot_s:12}")
        if role == "source" and cfg.prep.topk > vocab:
            rep.problems.append(f"prep.topk: {cfg.prep.topk} is more than source {spec.name}'s vocabulary "
                                f"({vocab} tokens); use at most {vocab}")
        rep.problems += [f"{role} {spec.name}: weights: {p}" for p in weight_problems(spec.path, spec.allow_pickle)]
        if role == "target" and Path(spec.path).suffix == ".gguf" and command in ("check", "train"):
            rep.problems += gguf_trainable_problems(spec, load_weights)
        if load_weights and not any(p.startswith(f"{role} {spec.name}: weights") for p in rep.problems):
            from profuser.models import load_model

            try:
                m, attn = load_model(spec)
                n = sum(p.numel() for p in m.parameters())
                rep.add(f"         weights: {type(m).__name__}, {n / 1e6:.2f}M parameters, attention={attn}")
                del m
            except Exception as e:  # noqa: BLE001 — reported, the check goes on
                rep.problems.append(f"{role} {spec.name}: weights: {_err(e)}")

    if command in ("check", "prep", "eval"):
        sample = next(iter(records), None)
        for i, s in enumerate(cfg.scorers):
            rep.add(f"scorer   {s.name:22} {s.type:26} {s.path or s.function}")
            if s.type == "rule":
                rep.problems += rule_scorer_problems(i, s, sample)
            elif s.path and Path(s.path).is_dir():
                top = [f"scorers.{i}.path: {p}" for p in weight_problems(s.path, s.allow_pickle)
                       if "no weight files" not in p]
                if s.type == "similarity" and not s.allow_pickle:
                    from profuser.models import check_no_pickle

                    try:
                        check_no_pickle(s.path, False, s.name)
                    except Exception as e:  # noqa: BLE001
                        top.append(f"scorers.{i}.path: {_err(e)}")
                rep.problems += top

    if res is not None:
        rep.add("")
        _data_section(rep, cfg, command, res, data_path, data_key, loaded)

    if command in ("check", "train"):
        rep.problems += deepspeed_problems(cfg)
    if command == "train":
        rep.problems += training_set_problems(Path(data_dir or Path(cfg.run_dir) / "prep" / "build"))
    return rep


def _data_section(rep: CheckReport, cfg: RunConfig, command: str, res, data_path: str, data_key: str,
                  loaded: dict) -> None:
    """Per-row rejects of the data, special-token strings, and the rows that fit each model."""
    from profuser import data as data_mod

    c = res.counts
    rep.add(f"data: {data_path}: {c['rows']} rows -> {c['accepted']} accepted, {c['rejected']} rejected")
    for kind, n in list(c["reasons"].items())[:5]:
        example = next(r for r in res.rejects if r["kind"] == kind)
        rep.add(f"  {n:6d} x {kind}   e.g. row {example['row']}: {example['reason']}")
    if not res.records:
        rep.problems.append(f"{data_key}: no usable records in {data_path!r}" + (
            f" ({', '.join(f'{k}: {v}' for k, v in list(c['reasons'].items())[:5])})" if c["reasons"] else ""))
        return
    specials = (set().union(*(data_mod.special_strings(chat_model.tokenizer) for chat_model in loaded.values()))
                if loaded else set())
    usable, escaped, rejected = [], 0, 0
    for rec in res.records:
        rec = {**rec, "messages": list(rec["messages"])}
        try:
            escaped += data_mod.guard_special_tokens(rec, specials, cfg.data.special_tokens)
        except data_mod.Reject:
            rejected += 1
            continue
        usable.append(rec)
    if escaped or rejected:
        rep.add(f"  special-token strings in the text (data.special_tokens={cfg.data.special_tokens!r}): "
                f"{escaped} record(s) escaped, {rejected} rejected")
    if not usable:
        rep.problems.append(f"{data_key}: every record spells a special token in its text and "
                            "data.special_tokens=reject rejects them all")
        return
    # The normalize stage's rule: a record goes on only if every model (sources and target) takes it.
    models: dict = {}  # name -> (name, chat model, max_length); a target that is also a source counts once
    roles: dict = {}
    for (role, name), chat_model in loaded.items():
        models[name] = (name, chat_model, chat_model.spec.max_length or cfg.data.max_length)
        roles[name] = role
    models = list(models.values())
    rows = usable if command == "check" else usable[:SAMPLE_ROWS]
    counts = {name: Counter() for name, _, _ in models}
    reasons: Counter = Counter()
    kept, example = 0, ""
    for rec in rows:
        problems = data_mod.length_problems(rec, models, cfg.data.overlength, counts)
        if not problems:
            kept += 1
            continue
        reasons[problems[0][0]] += 1  # normalize's reject kind: the first model's
        example = example or f"record {rec['id']!r}: {'; '.join(why for _, why in problems)}"
    of = "" if command == "check" else f" (of the first {len(rows)} records)"
    for name, _, max_len in models:
        c = counts[name]
        rep.add(f"  {roles[name]} {name}, max_length {max_len}, policy {cfg.data.overlength!r}: {c['fits']} fit, "
                f"{c['truncated']} truncated, {c['rejected']} rejected{of}")
    rep.add(f"  {kept} of {len(rows)} records fit every model (normalize keeps only those){of}")
    _dropped_characters(rep, rows, models, roles, of)
    if rows and not kept:
        rep.problems.append(f"no usable row: every record{of} is rejected by some model "
                            f"({', '.join(f'{k}: {v}' for k, v in reasons.items())}; e.g. {example})")
    if command in ("check", "prep"):
        rep.add("")
        check_alignment(cfg, loaded, usable[0], rep)


def _record_chars(rec: dict) -> set[str]:
    texts = [m.get("content") for m in rec["messages"]] + [rec.get("reference")]
    return set().union(*(set(t) for t in texts if isinstance(t, str)))


def _dropped_characters(rep: CheckReport, rows: list[dict], models: list, roles: dict, of: str) -> None:
    """One line per model whose tokenizer drops characters that occur in the records (it never sees
    them; training goes on without them)."""
    from profuser.align import dropped_characters

    per_record = [_record_chars(rec) for rec in rows]
    chars = set().union(*per_record) if per_record else set()
    for name, chat_model, _ in models:
        if not _offsets_available(chat_model.tokenizer):  # no offsets to check against (MinED path)
            continue
        lost = dropped_characters(chat_model.tokenizer, chars)  # sorted
        if lost:
            n = sum(1 for c in per_record if not c.isdisjoint(lost))
            shown = ", ".join(f"U+{ord(c):04X}" for c in lost[:8]) + (", ..." if len(lost) > 8 else "")
            rep.add(f"  {roles[name]} {name}: its tokenizer drops {len(lost)} character(s) found in {n} record(s){of} "
                    f"({shown}); that model never sees them (remove them from the data if they matter)")


def load_and_preflight(args, command: str, **preflight_args) -> tuple[Optional[RunConfig], int]:
    """A launched command's config (``args.config`` with ``args.overrides``), preflighted unless
    ``args.skip_check``: (cfg, 0), or (None, exit code) once the problem is printed: 2 for a config
    error, 1 when the preflight finds the run cannot start."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None, 2
    if not getattr(args, "skip_check", False) and not preflight(cfg, command, **preflight_args):
        return None, 1
    return cfg, 0


def preflight(cfg: RunConfig, command: str, model: Optional[str] = None, data_dir: Optional[str] = None) -> bool:
    """Run the checks `command` needs; print the problems (on rank 0) and return False if any.

    Every rank of a launched command runs it (it reads only files, so all reach the same verdict)
    and stops before any collective operation: nobody waits for a rank that quit."""
    import os

    t0 = time.time()
    rep = run_check(cfg, command=command, model=model, data_dir=data_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return rep.ok
    if rep.ok:
        print(f"[preflight] {command}: ok ({time.time() - t0:.1f}s; `profuser check CONFIG` shows the details)",
              flush=True)
    else:
        print(f"[preflight] {command}: NOT READY — {len(rep.problems)} problem(s); nothing was started:",
              file=sys.stderr)
        for p in rep.problems:
            print(f"  - {p}", file=sys.stderr)
        print("Fix them (`profuser check CONFIG` shows the full report), or pass --skip-check to start anyway.",
              file=sys.stderr, flush=True)
    return rep.ok
