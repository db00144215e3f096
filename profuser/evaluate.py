"""`profuser eval CONFIG --model DIR`: judge a model by numbers on the held-out set. It must never change
a model, and never keep two models resident at once.

For every held-out record (data.eval_path):
- teacher-forced CE of the model on the ground-truth response (mean over all response tokens of the
  set) and its perplexity;
- the model's greedy response, scored by the run's scorers; its win rate against each source's
  response to the same prompt (per record, the scorers vote between the two as in prep: a win
  counts 1, a tie 1/2); the mean of every scorer (for a rule scorer such as exact_match this is the
  accuracy);
- the same broken down by the record's `skill` field when the data has one;
- optionally lm-eval tasks (`eval.lm_eval_tasks`) on the same loaded model (rank 0).

Where it runs: the evaluated model, each source (for the win rates) and each model scorer (reward
model, similarity) are loaded one at a time on the evaluated model's configured device (`device:
auto` = cuda:LOCAL_RANK when a GPU is present, else cpu; dtype `auto` = bf16 on GPU) and freed before
the next, so at most one of them is resident. CE and generation are batched by eval.batch_size
(prompts sorted by length), scorers by their own batch_size.
Under a launcher (deepspeed / torchrun, RANK and WORLD_SIZE set), the records are cut into blocks of
min(prep.shard_size, ceil(n / world)) and block i goes to rank i % world (prep's rule,
`profuser.prep.stages.owner`); every rank evaluates its blocks and rank 0 gathers the per-record
results and writes results.json, identical in content to a single-process run.
Source responses are generated once per source and cached in RUN_DIR/eval/sources/<name>.jsonl
(also when the source itself is evaluated). Results go to RUN_DIR/eval/<model name>/results.json
(or --out).
"""
from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from profuser.config import ConfigError, ModelConfig, RunConfig, name_from_path

log = logging.getLogger("profuser")


def resolve_model(cfg: RunConfig, model: str) -> ModelConfig:
    """`model` is a source/target name from the config or a path (a trained model directory)."""
    for m in [*cfg.sources, cfg.target]:
        if model == m.name:
            return m
    p = Path(model)
    if not p.exists():
        names = [m.name for m in cfg.sources] + [cfg.target.name]
        raise ConfigError(f"--model {model!r} is neither a path nor a model name of the config ({', '.join(names)})")
    # A trained target: the target's settings, with the trained weights and their saved tokenizer/template.
    t = cfg.target
    return ModelConfig(path=str(p), name=name_from_path(str(p if p.name != "final" else p.parent)), chat_template=None,
                       dtype=t.dtype, device=t.device, attn_implementation=t.attn_implementation,
                       trust_remote_code=t.trust_remote_code, allow_pickle=t.allow_pickle, max_length=t.max_length)


def load_eval_records(cfg: RunConfig) -> list[dict]:
    from profuser.data import normalize

    if not cfg.data.eval_path:
        raise ConfigError("data.eval_path: not set; `profuser eval` needs a held-out set (same formats as data.path)")
    res = normalize(cfg.data.eval_path, cfg.data.format)
    if res.rejects:
        log.warning("eval data: %d of %d rows rejected (first: row %d: %s)", len(res.rejects), res.n_rows,
                    res.rejects[0]["row"], res.rejects[0]["reason"])
    return res.records


# --------------------------------------------------------------------------------------------
# splitting the records over the ranks of a launch


def rank_share(n: int, rank: int, world: int, shard_size: int) -> list[int]:
    """Indexes of the records `rank` evaluates: blocks of min(shard_size, ceil(n / world)) records,
    block i on rank i % world (`stages.owner` for a single part). Every index on exactly one rank."""
    from profuser.prep.stages import owner

    if world <= 1:
        return list(range(n))
    block = max(1, min(shard_size, math.ceil(n / world)))
    n_blocks = math.ceil(n / block)
    return [j for i in range(n_blocks) if owner([""], "", i, n_blocks, world) == rank
            for j in range(i * block, min(n, (i + 1) * block))]


def gather_to_main(dist, obj) -> Optional[list]:
    """Every rank's `obj` as a list on rank 0 (None elsewhere); [obj] without a launcher."""
    if dist.world <= 1:
        return [obj]
    import torch.distributed as td

    out = [None] * dist.world if dist.is_main else None
    td.gather_object(obj, out, dst=0)
    return out


def merge_shares(parts: list[dict], n: int) -> dict:
    """Per-record lists of every rank (each with its "index" list) -> one dict in record order."""
    out: dict = {}
    for p in parts:
        for key, values in p.items():
            if key == "index":
                continue
            if isinstance(values, dict):
                out.setdefault(key, {})
                for sub, v in values.items():
                    out[key].setdefault(sub, [None] * n)
                    for j, x in zip(p["index"], v):
                        out[key][sub][j] = x
            else:
                out.setdefault(key, [None] * n)
                for j, x in zip(p["index"], values):
                    out[key][j] = x
    return out


# --------------------------------------------------------------------------------------------
# the model's numbers


def _free() -> None:
    """Give the device memory of models the caller has dropped back before the next one loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def response_ce(chat_model, records: list[dict], max_length: int, batch_size: int = 8) -> list[tuple[float, int]]:
    """(sum of token CE in nats, number of response tokens) per record, teacher-forced on the reference.
    Batches hold sequences of similar length; the model's device is used."""
    import torch

    from profuser.chat import encode_chat
    from profuser.prep.teacher import teacher_forward

    seqs, n_resp = [], []
    for r in records:
        enc = encode_chat(chat_model.tokenizer, chat_model.template, r["messages"], r["reference"], max_length, "truncate_left")
        seqs.append(enc.input_ids)
        n_resp.append(len(enc.input_ids) - enc.prompt_len)
    order = sorted(range(len(seqs)), key=lambda j: (len(seqs[j]), j))
    out: list = [None] * len(seqs)
    pad = chat_model.tokenizer.pad_token_id if chat_model.tokenizer.pad_token_id is not None else 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        with torch.no_grad():
            res = teacher_forward(chat_model.model, [seqs[j] for j in idx], [n_resp[j] for j in idx], k=1, pad_id=pad)
        for j, o in zip(idx, res):
            out[j] = (float(o.ce) * n_resp[j], n_resp[j])
    return out


def generate_responses(chat_model, records: list[dict], cfg: RunConfig) -> list[str]:
    from profuser.config import GenerateConfig
    from profuser.prep.generate import HFGenerator, prompt_ids

    g = GenerateConfig(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, do_sample=False)
    max_len = chat_model.spec.max_length or cfg.data.max_length
    prompts = [prompt_ids(chat_model, r["messages"], max_len)[0] for r in records]
    gens = HFGenerator(chat_model, g).generate(prompts, seed=cfg.seed)
    return [chat_model.tokenizer.decode(x.token_ids, skip_special_tokens=True).strip() for x in gens]


def _cache_path(cfg: RunConfig, name: str) -> Path:
    return Path(cfg.run_dir) / "eval" / "sources" / f"{name}.jsonl"


def read_source_cache(cfg: RunConfig, name: str, ids: list[str]) -> Optional[list[str]]:
    """The cached responses of source `name` to `ids`, or None when the cache does not hold them all
    (or was made with another eval.max_new_tokens)."""
    cache = _cache_path(cfg, name)
    if not cache.exists():
        return None
    rows = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    got = {r["id"]: r["response"] for r in rows}
    if rows and rows[0].get("max_new_tokens") == cfg.eval.max_new_tokens and all(i in got for i in ids):
        return [got[i] for i in ids]
    return None


def write_source_cache(cfg: RunConfig, name: str, ids: list[str], responses: list[str]) -> None:
    from profuser.data import write_jsonl

    write_jsonl(_cache_path(cfg, name), [{"id": i, "response": s, "max_new_tokens": cfg.eval.max_new_tokens}
                                         for i, s in zip(ids, responses)])


def _scores(scorer, records: list[dict], responses: list[str]) -> list[float]:
    """One float per item (NaN where the scorer failed on it), batched by the scorer's batch_size
    over items sorted by length (less padding for model scorers)."""
    from profuser.prep.score import score_safely

    order = sorted(range(len(records)), key=lambda j: (len(responses[j]) + len(str(records[j]["messages"])), j))
    vals = score_safely(scorer, [records[j] for j in order], [responses[j] for j in order])
    out = [float("nan")] * len(records)
    for j, v in zip(order, vals):
        out[j] = _num(v)
    return out


def evaluate_share(cfg: RunConfig, spec: ModelConfig, records: list[dict], loader: Callable,
                   compare_sources: bool, device: str) -> dict:
    """This rank's records: per record CE, response, every scorer's score of it, and for each
    source its response and scores. Lists are in the order of `records`."""
    from profuser.prep.score import build_scorer

    chat_model = loader(spec)
    ce = response_ce(chat_model, records, spec.max_length or cfg.data.max_length, cfg.eval.batch_size)
    responses = generate_responses(chat_model, records, cfg)
    chat_model = None
    _free()

    ids = [r["id"] for r in records]
    theirs: dict[str, list[str]] = {}
    fresh: list[str] = []
    if compare_sources and cfg.scorers:
        for src in cfg.sources:
            if Path(src.path).resolve() == Path(spec.path).resolve():
                continue
            got = read_source_cache(cfg, src.name, ids)
            if got is None:
                scm = loader(src)
                got = generate_responses(scm, records, cfg)
                scm = None
                _free()
                fresh.append(src.name)
            theirs[src.name] = got

    out: dict = {"ce_sum": [c for c, _ in ce], "tokens": [n for _, n in ce], "response": responses,
                 "score": {}, "source_response": theirs, "fresh_sources": fresh}
    for sc_cfg in cfg.scorers:  # one scorer resident at a time; every response it judges in one go
        sc = build_scorer(sc_cfg, device)
        out["score"][sc_cfg.name] = _scores(sc, records, responses)
        for name, txt in theirs.items():
            out["score"][f"{name}/{sc_cfg.name}"] = _scores(sc, records, txt)
        sc = None
        _free()
    return out


def summarize(cfg: RunConfig, spec: ModelConfig, records: list[dict], per: dict, compare_sources: bool) -> dict:
    """results.json from the per-record results of every record (in record order)."""
    from profuser.prep.score import pick_winner

    names = [s.name for s in cfg.scorers]
    own = np.array([per["score"][n] for n in names], dtype=np.float64).reshape(len(names), len(records))
    skills = [str(r.get("meta", {}).get("skill", "all")) for r in records]
    ce_sum, tokens = per["ce_sum"], per["tokens"]
    result: dict = {"model": spec.name, "path": spec.path, "n_records": len(records),
                    "ce": sum(ce_sum) / max(1, sum(tokens))}
    result["perplexity"] = math.exp(result["ce"])
    result["scores"] = {n: float(np.nanmean(own[i])) for i, n in enumerate(names)}
    by_skill: dict = defaultdict(lambda: {"ce_sum": 0.0, "tokens": 0, "n": 0, "scores": defaultdict(list)})
    for j, sk in enumerate(skills):
        b = by_skill[sk]
        b["ce_sum"] += ce_sum[j]
        b["tokens"] += tokens[j]
        b["n"] += 1
        for i, n in enumerate(names):
            b["scores"][n].append(own[i, j])
    result["by_skill"] = {sk: {"n": b["n"], "ce": b["ce_sum"] / max(1, b["tokens"]),
                               "scores": {k: float(np.nanmean(v)) for k, v in b["scores"].items()}}
                          for sk, b in sorted(by_skill.items())}
    result["win_rate"] = {}
    if compare_sources and names:
        for src in per.get("source_response", {}):
            theirs = np.array([per["score"][f"{src}/{n}"] for n in names], dtype=np.float64)
            wins = 0.0
            for j in range(len(records)):
                pair = np.stack([np.nan_to_num(own[:, j], nan=-np.inf), np.nan_to_num(theirs[:, j], nan=-np.inf)], 1)
                w, votes, _ = pick_winner(pair)
                wins += 0.5 if votes[0] == votes[1] else float(w == 0)
            result["win_rate"][src] = wins / len(records)
    result["samples"] = [{"id": r["id"], "skill": sk, "response": s, "reference": r["reference"]}
                         for r, sk, s in zip(records[:20], skills, per["response"])]
    return result


def evaluate(cfg: RunConfig, model: str, out: Optional[str] = None, compare_sources: bool = True,
             loader=None) -> dict:
    """Evaluate `model` (a config model name or a trained directory); returns results.json's content
    (plus "results_path") on every rank."""
    from profuser.models import load_chat_model, resolve_device
    from profuser.prep.dist import Dist, set_cpu_threads

    loader = loader or (lambda spec: load_chat_model(spec))
    spec = resolve_model(cfg, model)
    records = load_eval_records(cfg)
    if not records:
        raise ConfigError(f"data.eval_path: no usable records in {cfg.data.eval_path!r}")
    dist = Dist.from_env(cfg.prep.dist_timeout_minutes)
    try:
        set_cpu_threads(dist)
        device = resolve_device(spec.device)
        mine = rank_share(len(records), dist.rank, dist.world, cfg.prep.shard_size)
        part = evaluate_share(cfg, spec, [records[j] for j in mine], loader, compare_sources, device)
        part["index"] = mine
        parts = gather_to_main(dist, part)
        result = None
        if dist.is_main:
            per = merge_shares(parts, len(records))
            ids = [r["id"] for r in records]
            fresh = {s for p in parts for s in p["fresh_sources"]}
            for src, txt in per.get("source_response", {}).items():
                if src in fresh:
                    write_source_cache(cfg, src, ids, txt)
            if any(Path(s.path).resolve() == Path(spec.path).resolve() for s in cfg.sources):
                write_source_cache(cfg, spec.name, ids, per["response"])  # a source's own answers serve later evals
            result = summarize(cfg, spec, records, per, compare_sources)
            result.update(device=device, world_size=dist.world)
            if cfg.eval.lm_eval_tasks:
                result["lm_eval"] = run_lm_eval(cfg, spec, loader)
            path = Path(out) if out else Path(cfg.run_dir) / "eval" / spec.name / "results.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2))
            result["results_path"] = str(path)
        result = dist.broadcast(result)
    finally:
        dist.close()
    return result


def _num(v) -> float:
    return float("nan") if isinstance(v, str) else float(v)


# --------------------------------------------------------------------------------------------
# lm-eval


def run_lm_eval(cfg: RunConfig, spec: ModelConfig, loader: Optional[Callable] = None) -> dict:
    """lm-eval's `simple_evaluate` on the model loaded as profuser loads it (right device and dtype,
    safetensors only unless allow_pickle), wrapped in lm-eval's HFLM with eval.batch_size, and the
    model's chat template applied when eval.lm_eval_chat_template is on. Tasks come from lm-eval's
    registry plus eval.lm_eval_include_path (a folder of task YAMLs; local data files work offline).
    Returns {"results": per-task metrics, "n_samples": per task, "config": what was passed}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("eval.lm_eval_tasks is set but lm-eval is not installed: pip install 'profuser[eval]'") from None
    from profuser.models import load_chat_model

    e = cfg.eval
    chat_model = (loader or (lambda s: load_chat_model(s)))(spec)
    tok = chat_model.tokenizer
    tok.chat_template = chat_model.template  # lm-eval renders chats with the tokenizer's template: make it the model's
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    kw = {"max_length": spec.max_length} if spec.max_length else {}
    lm = HFLM(pretrained=chat_model.model, tokenizer=tok, batch_size=e.batch_size, **kw)
    tm = None
    if e.lm_eval_include_path:  # indexing lm-eval's own registry takes half a minute: only when a task needs it
        tm = TaskManager(include_path=e.lm_eval_include_path, include_defaults=False)
        if not all(t in tm.all_tasks for t in e.lm_eval_tasks):
            tm = None
    tm = tm or TaskManager(include_path=e.lm_eval_include_path)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(e.lm_eval_tasks), task_manager=tm,
                                  apply_chat_template=e.lm_eval_chat_template, num_fewshot=e.lm_eval_num_fewshot,
                                  limit=e.lm_eval_limit, log_samples=False, random_seed=cfg.seed,
                                  numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                  fewshot_random_seed=cfg.seed)
    device, dtype = str(lm.device), str(chat_model.model.dtype)
    chat_model = lm = None
    _free()
    res = res or {}
    return {"results": res.get("results", {}), "n_samples": res.get("n-samples", {}),
            "config": {"tasks": list(e.lm_eval_tasks), "batch_size": e.batch_size, "device": device,
                       "dtype": dtype, "chat_template": e.lm_eval_chat_template,
                       "num_fewshot": e.lm_eval_num_fewshot, "limit": e.lm_eval_limit}}


def format_results(r: dict) -> str:
    lines = [f"{r['model']}: {r['n_records']} held-out records, CE {r['ce']:.4f} nats/token, perplexity {r['perplexity']:.2f}"
             + (f" (device {r['device']}, {r['world_size']} process(es))" if "device" in r else "")]
    for k, v in r["scores"].items():
        lines.append(f"  {k}: {v:.4f}")
    for k, v in r["win_rate"].items():
        lines.append(f"  win rate vs {k}: {v:.3f}")
    if len(r["by_skill"]) > 1:
        for sk, b in r["by_skill"].items():
            lines.append(f"  [{sk}] n={b['n']} CE {b['ce']:.4f} " + " ".join(f"{k}={v:.3f}" for k, v in b["scores"].items()))
    for task, metrics in (r.get("lm_eval") or {}).get("results", {}).items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k)
        lines.append(f"  lm-eval {task}: {shown}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    import os
    import sys

    from profuser.config import load_config
    from profuser.models import ModelLoadError
    from profuser.prep.stages import PrepError

    main = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = load_config(args.config, args.overrides, check_paths=False)
        if not getattr(args, "skip_check", False):
            from profuser.check import preflight

            if not preflight(cfg, "eval", model=args.model):
                return 1
        r = evaluate(cfg, args.model, args.out, compare_sources=not args.no_compare)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ModelLoadError, PrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if main:
        print(format_results(r))
        print(f"results written to {r['results_path']}")
    return 0
