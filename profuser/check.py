"""`profuser check CONFIG`: can this run start? Validate before hours of GPU time are spent.

Loads every tokenizer and chat template (weights only with --load-weights), reads the data through
the normalizer with the target's over-length policy, prints a report, and returns the problems.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from profuser.config import RunConfig, missing_paths


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
    (vocabulary tables are built and cached in RUN_DIR/prep/vocab_maps, where prep reuses them), so a
    pair that cannot be aligned fails here, before any model is loaded for prep."""
    import numpy as np

    from profuser.chat import encode_chat, end_of_turn_id
    from profuser.prep.align_stage import Reject, Target, align_sample, make_pair

    target = loaded.get(cfg.target.name)
    if target is None:
        return
    max_len = cfg.target.max_length or cfg.data.max_length
    tgt = Target(target, end_of_turn_id(target.tokenizer, target.template), max_len)
    cache = Path(cfg.run_dir) / "prep" / "vocab_maps"
    for spec in cfg.sources:
        cm = loaded.get(spec.name)
        if cm is None:
            continue
        try:
            pair = make_pair(cfg, cache, spec, tgt, cm)
            enc = encode_chat(cm.tokenizer, cm.template, record["messages"], record["reference"])
            ids = np.asarray(enc.input_ids[enc.prompt_len:], dtype=np.int64)
            zeros = np.zeros((len(ids), 1), dtype=np.float32)
            out = align_sample(pair, tgt, "truncate_left", record["messages"], record["reference"], ids, zeros[:, 0],
                               ids[:, None].astype(np.int32), zeros)
        except Reject as e:
            rep.problems.append(f"source {spec.name}: its tokens cannot be aligned with the target "
                                f"{cfg.target.name} ({e.kind}): {e.reason}")
            continue
        except Exception as e:  # noqa: BLE001 — reported with the source named; the check goes on
            rep.problems.append(f"source {spec.name}: aligning it with the target {cfg.target.name} failed: "
                                f"{type(e).__name__}: {e}")
            continue
        how = {"spans": "byte spans", "mined": "MinED, no offsets: 1:1 pairs only"}[pair.method]
        rep.add(f"align {spec.name} -> {cfg.target.name}: {'copy (same tokenizer)' if pair.copy else how}; "
                f"sample {record['id']}: {out['n_text_transferred']} of {out['n_text']} target positions holding "
                f"response text get a teacher distribution")


def run_check(cfg: RunConfig, load_weights: bool = False) -> CheckReport:
    from profuser import data as data_mod
    from profuser.chat import end_of_turn_id
    from profuser.models import load_chat_tokenizer, load_model

    rep = CheckReport()
    rep.problems += missing_paths(cfg)
    rep.add(f"run_dir: {cfg.run_dir}")
    rep.add("")
    header = f"{'role':8} {'name':22} {'tokenizer':26} {'vocab':>7} {'offsets':8} {'chat template':24} {'end of turn':12}"
    rep.add(header)
    rep.add("-" * len(header))
    loaded = {}
    for role, spec in [*(("source", s) for s in cfg.sources), ("target", cfg.target)]:
        if not Path(spec.path).exists():
            rep.add(f"{role:8} {spec.name:22} (path missing)")
            continue
        try:
            cm = load_chat_tokenizer(spec)
            eot = end_of_turn_id(cm.tokenizer, cm.template)
            eot_s = cm.tokenizer.convert_ids_to_tokens(eot) if eot is not None else "?"
            loaded[spec.name] = cm
            rep.add(f"{role:8} {spec.name:22} {type(cm.tokenizer).__name__:26} {len(cm.tokenizer):>7} "
                    f"{'yes' if _offsets_available(cm.tokenizer) else 'no':8} {cm.template_source:24} {eot_s:12}")
        except Exception as e:  # noqa: BLE001 — every failure is reported, none stops the check
            rep.add(f"{role:8} {spec.name:22} FAILED")
            rep.problems.append(f"{role} {spec.name}: {e}")
            continue
        if load_weights:
            try:
                model, attn = load_model(spec)
                n = sum(p.numel() for p in model.parameters())
                rep.add(f"         weights: {type(model).__name__}, {n / 1e6:.2f}M parameters, attention={attn}")
                del model
            except Exception as e:  # noqa: BLE001 — reported, the check goes on
                rep.problems.append(f"{role} {spec.name}: weights: {e}")
    for i, s in enumerate(cfg.scorers):
        where = s.path or s.function
        rep.add(f"scorer   {s.name:22} {s.type:26} {where}")
        if s.type == "rule":
            try:
                from importlib import import_module

                mod, fn = s.function.split(":", 1)
                getattr(import_module(mod), fn)
            except (ImportError, AttributeError) as e:
                rep.problems.append(f"scorers.{i}.function: cannot import {s.function!r}: {e}")

    rep.add("")
    target = loaded.get(cfg.target.name)
    if not any(p.startswith("data.path") for p in rep.problems):
        counter: Counter = Counter()
        check = None
        if target is not None:
            max_len = cfg.target.max_length or cfg.data.max_length
            check = data_mod.make_length_check(target.tokenizer, target.template, max_len, cfg.data.overlength, counter)
        try:
            res = data_mod.normalize(cfg.data.path, cfg.data.format, cfg.data.limit, check)
        except ValueError as e:
            rep.problems.append(f"data.path: {e}")
        else:
            c = res.counts
            rep.add(f"data: {cfg.data.path}: {c['rows']} rows -> {c['accepted']} accepted, {c['rejected']} rejected")
            for kind, n in list(c["reasons"].items())[:5]:
                example = next(r for r in res.rejects if r["kind"] == kind)
                rep.add(f"  {n:6d} x {kind}   e.g. row {example['row']}: {example['reason']}")
            if target is not None:
                rep.add(f"  target over-length policy {cfg.data.overlength!r}: {counter['fits']} fit, "
                        f"{counter['truncated']} truncated, {counter['rejected']} rejected")
            if not res.records:
                rep.problems.append(f"data.path: no usable records in {cfg.data.path!r}")
            else:
                rep.add("")
                check_alignment(cfg, loaded, res.records[0], rep)
    return rep
