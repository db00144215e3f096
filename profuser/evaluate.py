"""`profuser eval CONFIG --model DIR`: judge a model by numbers on the held-out set.

For every held-out record (data.eval_path):
- teacher-forced CE of the model on the ground-truth response (mean over all response tokens of the
  set) and its perplexity;
- the model's greedy response, scored by the run's scorers; its win rate against each source's
  response to the same prompt (per record, the scorers vote between the two as in prep: a win
  counts 1, a tie 1/2); the mean of every scorer (for a rule scorer such as exact_match this is the
  accuracy);
- the same broken down by the record's `skill` field when the data has one.
Source responses are generated once per source and cached in RUN_DIR/eval/sources/<name>.jsonl.
Results go to RUN_DIR/eval/<model name>/results.json (or --out).
"""
from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from profuser.config import ConfigError, ModelConfig, RunConfig

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
    return ModelConfig(path=str(p), name=p.name if p.name != "final" else f"{p.parent.name}", chat_template=None,
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


def response_ce(cm, records: list[dict], max_length: int, batch_size: int = 8) -> list[tuple[float, int]]:
    """(sum of token CE in nats, number of response tokens) per record, teacher-forced on the reference."""
    import torch

    from profuser.chat import encode_chat
    from profuser.prep.teacher import teacher_forward

    seqs, n_resp = [], []
    for r in records:
        enc = encode_chat(cm.tokenizer, cm.template, r["messages"], r["reference"], max_length, "truncate_left")
        seqs.append(enc.input_ids)
        n_resp.append(len(enc.input_ids) - enc.prompt_len)
    out = []
    for s in range(0, len(seqs), batch_size):
        with torch.no_grad():
            res = teacher_forward(cm.model, seqs[s:s + batch_size], n_resp[s:s + batch_size], k=1)
        out += [(float(o.ce) * n, n) for o, n in zip(res, n_resp[s:s + batch_size])]
    return out


def generate_responses(cm, records: list[dict], cfg: RunConfig) -> list[str]:
    from profuser.config import GenerateConfig
    from profuser.prep.generate import HFGenerator, prompt_ids

    g = GenerateConfig(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, do_sample=False)
    max_len = cm.spec.max_length or cfg.data.max_length
    prompts = [prompt_ids(cm, r["messages"], max_len)[0] for r in records]
    gens = HFGenerator(cm, g).generate(prompts, seed=cfg.seed)
    return [cm.tokenizer.decode(x.token_ids, skip_special_tokens=True).strip() for x in gens]


def _cached_source_responses(cfg: RunConfig, spec: ModelConfig, records: list[dict], loader) -> list[str]:
    cache = Path(cfg.run_dir) / "eval" / "sources" / f"{spec.name}.jsonl"
    want = [r["id"] for r in records]
    if cache.exists():
        rows = [json.loads(l) for l in cache.read_text().splitlines() if l.strip()]
        got = {r["id"]: r["response"] for r in rows}
        if all(i in got for i in want) and rows and rows[0].get("max_new_tokens") == cfg.eval.max_new_tokens:
            return [got[i] for i in want]
    cm = loader(spec)
    responses = generate_responses(cm, records, cfg)
    from profuser.data import write_jsonl

    write_jsonl(cache, [{"id": i, "response": s, "max_new_tokens": cfg.eval.max_new_tokens}
                        for i, s in zip(want, responses)])
    del cm
    return responses


def evaluate(cfg: RunConfig, model: str, out: Optional[str] = None, compare_sources: bool = True,
             loader=None) -> dict:
    from profuser.models import load_chat_model
    from profuser.prep.score import build_scorer, pick_winner, score_safely

    loader = loader or (lambda spec: load_chat_model(spec))
    spec = resolve_model(cfg, model)
    records = load_eval_records(cfg)
    if not records:
        raise ConfigError(f"data.eval_path: no usable records in {cfg.data.eval_path!r}")
    cm = loader(spec)
    max_len = spec.max_length or cfg.data.max_length
    ce = response_ce(cm, records, max_len, cfg.eval.batch_size)
    responses = generate_responses(cm, records, cfg)
    del cm

    scorers = [build_scorer(s, "cpu") for s in cfg.scorers]
    own = np.array([[_num(v) for v in score_safely(sc, records, responses)] for sc in scorers]).reshape(len(scorers), -1)
    skills = [str(r.get("meta", {}).get("skill", "all")) for r in records]
    result: dict = {"model": spec.name, "path": spec.path, "n_records": len(records),
                    "ce": sum(c for c, _ in ce) / max(1, sum(n for _, n in ce))}
    result["perplexity"] = math.exp(result["ce"])
    result["scores"] = {sc.name: float(np.nanmean(own[i])) for i, sc in enumerate(scorers)}
    by_skill: dict = defaultdict(lambda: {"ce_sum": 0.0, "tokens": 0, "n": 0, "scores": defaultdict(list)})
    for j, sk in enumerate(skills):
        b = by_skill[sk]
        b["ce_sum"] += ce[j][0]
        b["tokens"] += ce[j][1]
        b["n"] += 1
        for i, sc in enumerate(scorers):
            b["scores"][sc.name].append(own[i, j])
    result["by_skill"] = {sk: {"n": b["n"], "ce": b["ce_sum"] / max(1, b["tokens"]),
                               "scores": {k: float(np.nanmean(v)) for k, v in b["scores"].items()}}
                          for sk, b in sorted(by_skill.items())}
    result["win_rate"] = {}
    if compare_sources and scorers:
        for src in cfg.sources:
            if Path(src.path).resolve() == Path(spec.path).resolve():
                continue
            theirs_txt = _cached_source_responses(cfg, src, records, loader)
            theirs = np.array([[_num(v) for v in score_safely(sc, records, theirs_txt)] for sc in scorers])
            wins = 0.0
            for j in range(len(records)):
                pair = np.stack([np.nan_to_num(own[:, j], nan=-np.inf), np.nan_to_num(theirs[:, j], nan=-np.inf)], 1)
                w, votes, _ = pick_winner(pair)
                wins += 0.5 if votes[0] == votes[1] else float(w == 0)
            result["win_rate"][src.name] = wins / len(records)
    result["samples"] = [{"id": r["id"], "skill": sk, "response": s, "reference": r["reference"]}
                         for r, sk, s in zip(records[:20], skills, responses)]
    if cfg.eval.lm_eval_tasks:
        result["lm_eval"] = run_lm_eval(spec.path, cfg.eval.lm_eval_tasks, spec.allow_pickle)
    path = Path(out) if out else Path(cfg.run_dir) / "eval" / spec.name / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    result["results_path"] = str(path)
    return result


def _num(v) -> float:
    return float("nan") if isinstance(v, str) else float(v)


def run_lm_eval(path: str, tasks: list[str], allow_pickle: bool = False) -> dict:
    from profuser.models import check_no_pickle

    try:
        import lm_eval
    except ImportError:
        raise ConfigError("eval.lm_eval_tasks is set but lm-eval is not installed: pip install 'profuser[eval]'") from None
    check_no_pickle(path, allow_pickle, Path(path).name)  # lm-eval's HF loader would read pickled weights
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path}", tasks=list(tasks))
    return res.get("results", {})


def format_results(r: dict) -> str:
    lines = [f"{r['model']}: {r['n_records']} held-out records, CE {r['ce']:.4f} nats/token, perplexity {r['perplexity']:.2f}"]
    for k, v in r["scores"].items():
        lines.append(f"  {k}: {v:.4f}")
    for k, v in r["win_rate"].items():
        lines.append(f"  win rate vs {k}: {v:.3f}")
    if len(r["by_skill"]) > 1:
        for sk, b in r["by_skill"].items():
            lines.append(f"  [{sk}] n={b['n']} CE {b['ce']:.4f} " + " ".join(f"{k}={v:.3f}" for k, v in b["scores"].items()))
    return "\n".join(lines)


def cmd_eval(args) -> int:
    import sys

    from profuser.config import load_config
    from profuser.models import ModelLoadError
    from profuser.prep.stages import PrepError

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
    print(format_results(r))
    print(f"results written to {r['results_path']}")
    return 0
