"""Stage 5, align: each mode's teacher distributions re-expressed on the target's tokens and vocabulary.

Parts mirror the teacher stage: `training/<source>` and `inference/<source>` hold the samples that
source teaches in that mode (teacher/winners.parquet: MinCE for training, the score winner for
inference). For each such sample:

1. the conversation is encoded with the target's tokenizer and chat template (`encode_chat`, the
   target's max_length and data.overlength: a prompt may be truncated differently than on the
   source side, which does not matter because alignment is over the response only);
2. the source side is re-rendered exactly as the teacher stage rendered it, and its response tokens
   must equal the stored `token_ids` (else the row is rejected: the distributions would be for other
   tokens);
3. response tokens are aligned (`profuser.align.align_response`: exact byte spans, end-of-turn tokens
   paired; identical tokenizers and renderings take the copy fast path);
4. each aligned position's top-k is mapped to target ids (`profuser.vocab_map`: table cached in
   RUN_DIR/prep/vocab_maps, `prep.vocab_mapping` exact|soft, source end-of-turn -> target end-of-turn).
   On the copy path with the same end-of-turn token, rows are copied unchanged.

Rows (one per sample and mode) cover the WHOLE target sequence and are label-aligned (row t is the
teacher's distribution over input_ids[t], docs/ARCHITECTURE.md, "Stage contracts"):
  id, mode, source (the teacher), teacher_score (training: the teacher's mean token CE on the
  reference, nats, lower is better; inference: the winner's scorer votes, higher is better), ce,
  votes and mean_z (inference; null for training), method ("copy" | "spans"),
  input_ids [T], labels [T] (-100 on the prompt), topk_ids [T, k] int32 (-1 on prompt rows, on
  response rows without a transferred distribution and as padding after dropped entries),
  topk_logprobs [T, k] float16 (the teacher's full-vocabulary log-probs, -inf where the id is -1),
  n_response (target response positions), n_aligned (positions whose span matched a source token),
  n_transferred (aligned positions with at least one entry left after the vocabulary mapping),
  kept_mass (mean over aligned positions of the top-k probability mass kept by the mapping).

The manifest's `pairs` holds the statistics per source -> target pair and mode (transferred share
of target response positions, kept top-k mass over aligned positions); they also go to W&B.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profuser.prep.stages import Context, Progress, Stage, model_deps, read_records, sidecar_info, up

ALIGN_VERSION = 1  # bump when the alignment rules change (invalidates align and build)
MODES = ("training", "inference")
SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("mode", pa.string()),
    pa.field("source", pa.string()),  # the teacher
    pa.field("teacher_score", pa.float64()),  # training: CE (nats); inference: votes
    pa.field("ce", pa.float64()),  # the teacher's mean token CE on this mode's response
    pa.field("votes", pa.float64()),  # inference only
    pa.field("mean_z", pa.float64()),  # inference only
    pa.field("method", pa.string()),  # "copy" | "spans"
    pa.field("input_ids", pa.list_(pa.int32())),  # [T] target tokens, prompt + response
    pa.field("labels", pa.list_(pa.int32())),  # [T] -100 on the prompt
    pa.field("topk_ids", pa.list_(pa.list_(pa.int32()))),  # [T, k] target ids, -1 = none
    pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16()))),  # [T, k] -inf where id is -1
    pa.field("n_response", pa.int32()),
    pa.field("n_aligned", pa.int32()),
    pa.field("n_transferred", pa.int32()),
    pa.field("kept_mass", pa.float64()),  # mean over aligned positions; null when none
])
STAT_KEYS = ("rows", "response_positions", "aligned", "transferred", "kept_mass_sum", "copy_rows",
             "rows_without_transfer")


class Reject(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# --------------------------------------------------------------------------------------------
# Arrow <-> numpy for the nested [R, k] columns


def nested(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    """[R_i, k] (or [R_i]) numpy arrays -> list<list<dtype>> (or list<dtype>), no Python lists."""
    np_dtype = dtype.to_pandas_dtype()
    flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(np_dtype) if arrays else np.zeros(0, np_dtype)
    outer = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int32)
    values = pa.array(flat, type=dtype)
    if arrays and arrays[0].ndim == 2:
        k = arrays[0].shape[1]
        values = pa.ListArray.from_arrays(pa.array(np.arange(0, int(outer[-1]) * k + 1, k, dtype=np.int32)), values)
    return pa.ListArray.from_arrays(pa.array(outer), values)


def unnest(col, width: Optional[int] = None) -> list[np.ndarray]:
    """A list<x> (width None) or list<list<x>> column of `width`-long rows -> per-row numpy arrays."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return []
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    inner = arr.flatten()
    if width is not None:
        inner = inner.flatten()
    flat = inner.to_numpy(zero_copy_only=False)
    per = lengths * (width or 1)
    if flat.size != per.sum():
        raise ValueError(f"nested column: {flat.size} values for rows of width {width} (expected {per.sum()})")
    parts = np.split(flat, np.cumsum(per)[:-1])
    return [p.reshape(-1, width) for p in parts] if width is not None else parts


# --------------------------------------------------------------------------------------------
# one source -> target pair


@dataclass
class Pair:
    name: str  # source name
    cm: object  # the source's ChatModel (tokenizer + template)
    eot: Optional[int]
    same_tokenizer: bool
    vocab_map: Optional[np.ndarray]  # None: copy ids unchanged
    mapped_share: float  # share of the source's regular (non-special) tokens with a target counterpart


@dataclass
class Target:
    cm: object
    eot: Optional[int]
    max_length: int


def make_pair(ctx: Context, spec, tgt: Target) -> Pair:
    from profuser.align import same_tokenizer, surfaces
    from profuser.chat import end_of_turn_id
    from profuser.models import load_chat_tokenizer
    from profuser.vocab_map import load_or_build_vocab_map

    cfg = ctx.cfg
    cm = load_chat_tokenizer(spec)
    eot = end_of_turn_id(cm.tokenizer, cm.template)
    same = same_tokenizer(cm.tokenizer, tgt.cm.tokenizer)
    pairs = {eot: tgt.eot} if eot is not None and tgt.eot is not None else {}
    if same and eot == tgt.eot:
        vm, share = None, 1.0
    else:
        vm = load_or_build_vocab_map(cm.tokenizer, tgt.cm.tokenizer, ctx.prep_dir / "vocab_maps",
                                     cfg.prep.vocab_mapping, pairs)
        s = surfaces(cm.tokenizer)
        regular = ~s.special & (s.lengths > 0)
        share = float((vm[regular] >= 0).mean()) if regular.any() else 0.0
    return Pair(spec.name, cm, eot, same, vm, share)


def align_sample(pair: Pair, tgt: Target, overlength: str, messages: list[dict], response: str,
                 token_ids: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> dict:
    """One teacher row on the target's tokens: input_ids, labels, full-length [T, k] top-k and the
    row's statistics. Raises Reject(kind, reason) when it cannot be used."""
    from profuser.align import align_response
    from profuser.chat import OverLength, encode_chat, split_response

    src_tok, tgt_tok = pair.cm.tokenizer, tgt.cm.tokenizer
    tname = tgt.cm.spec.name
    try:
        s_prompt, s_resp = split_response(src_tok, pair.cm.template, messages, response)
    except Exception as e:  # noqa: BLE001 — a template that cannot render this response
        raise Reject("template_error", f"{pair.name}: {type(e).__name__}: {e}") from e
    try:
        enc = encode_chat(tgt_tok, tgt.cm.template, messages, response, tgt.max_length, overlength)
        t_prompt, t_resp = split_response(tgt_tok, tgt.cm.template, messages, response)
    except OverLength as e:
        raise Reject("over_length", f"target {tname}: {e} (data.overlength={overlength})") from e
    except Exception as e:  # noqa: BLE001
        raise Reject("template_error", f"target {tname}: {type(e).__name__}: {e}") from e
    try:
        al = align_response(src_tok, s_prompt + s_resp, len(s_prompt), tgt_tok, t_prompt + t_resp, len(t_prompt),
                            response, pair.eot, tgt.eot)
    except ValueError as e:
        raise Reject("unalignable", f"{pair.name} -> {tname}: {e}") from e
    if not np.array_equal(al.src_ids, token_ids):
        n = min(len(al.src_ids), len(token_ids))
        at = next((j for j in range(n) if al.src_ids[j] != token_ids[j]), n)
        raise Reject("retokenization_mismatch",
                     f"{pair.name}: re-tokenizing the response gives {len(al.src_ids)} tokens, the teacher stored "
                     f"{len(token_ids)} (first difference at response token {at}); its distributions are for "
                     "other tokens")
    resp_ids = np.asarray(enc.input_ids[enc.prompt_len:], dtype=np.int64)
    if not np.array_equal(al.tgt_ids, resp_ids):
        raise Reject("target_mismatch", f"target {tname}: the aligned response tokens differ from encode_chat's "
                                        f"({len(al.tgt_ids)} vs {len(resp_ids)})")
    if al.method == "copy" and pair.vocab_map is None:  # same tokens, same ids: rows copied as they are
        ids = np.asarray(topk_ids, dtype=np.int64)[al.tgt_to_src]
        lps = np.asarray(topk_logprobs, dtype=np.float32)[al.tgt_to_src]
        lps = np.where(ids >= 0, lps, -np.inf)
        kept = (ids >= 0).any(axis=1).astype(np.float64)
    else:
        from profuser.vocab_map import aligned_topk

        ids, lps, kept = aligned_topk(al.tgt_to_src, topk_ids, topk_logprobs, pair.vocab_map)
    T, P, k = len(enc.input_ids), enc.prompt_len, topk_ids.shape[1]
    full_ids = np.full((T, k), -1, dtype=np.int32)
    full_lps = np.full((T, k), -np.inf, dtype=np.float16)
    full_ids[P:] = ids
    full_lps[P:] = lps.astype(np.float16)
    aligned = al.tgt_to_src >= 0
    n_aligned = int(aligned.sum())
    return {"method": al.method, "input_ids": np.asarray(enc.input_ids, dtype=np.int32),
            "labels": np.asarray(enc.labels, dtype=np.int32), "topk_ids": full_ids, "topk_logprobs": full_lps,
            "n_response": T - P, "n_aligned": n_aligned, "n_transferred": int((ids[:, 0] >= 0).sum()),
            "kept_mass": float(kept[aligned].mean()) if n_aligned else None,
            "kept_mass_sum": float(kept[aligned].sum()), "tgt_to_src": al.tgt_to_src}


def rows_to_table(rows: list[dict]) -> pa.Table:
    col = lambda key, t: pa.array([r[key] for r in rows], t)  # noqa: E731
    return pa.Table.from_arrays([
        col("id", pa.string()), col("mode", pa.string()), col("source", pa.string()),
        col("teacher_score", pa.float64()), col("ce", pa.float64()), col("votes", pa.float64()),
        col("mean_z", pa.float64()), col("method", pa.string()),
        nested([r["input_ids"] for r in rows], pa.int32()), nested([r["labels"] for r in rows], pa.int32()),
        nested([r["topk_ids"] for r in rows], pa.int32()), nested([r["topk_logprobs"] for r in rows], pa.float16()),
        col("n_response", pa.int32()), col("n_aligned", pa.int32()), col("n_transferred", pa.int32()),
        col("kept_mass", pa.float64()),
    ], schema=SCHEMA)


def read_winners(teacher_dir) -> dict:
    """(mode, id) -> the winners.parquet row (source, ce, votes, mean_z)."""
    import pyarrow.parquet as pq

    path = teacher_dir.root / "winners.parquet"
    if not path.exists():
        from profuser.prep.stages import PrepError

        raise PrepError(f"{path} is missing; the teacher stage writes it when it completes (rerun `profuser prep "
                        "CONFIG --stage teacher`)")
    return {(w["mode"], w["id"]): w for w in pq.read_table(path).to_pylist()}


# --------------------------------------------------------------------------------------------
# the stage


class AlignStage(Stage):
    name = "align"
    needs = ("normalize", "teacher")

    def parts(self, cfg, plan):
        from profuser.vocab_map import MAP_VERSION

        t = cfg.target
        common = {"target": {**model_deps(t), "max_length": t.max_length or cfg.data.max_length},
                  "overlength": cfg.data.overlength, "vocab_mapping": cfg.prep.vocab_mapping, "method": "spans",
                  "version": [ALIGN_VERSION, MAP_VERSION]}
        # MinCE compares every source's training CE, so each training part reads all training parts
        train_up = {k: v for k, v in up(plan, "teacher").items() if k.startswith("teacher/training/")}
        out = {}
        for m in cfg.sources:
            out[f"training/{m.name}"] = {"upstream": {**up(plan, "normalize"), **train_up}, **common}
            out[f"inference/{m.name}"] = {"upstream": {**up(plan, "normalize"),
                                                       **up(plan, "teacher", f"inference/{m.name}")}, **common}
        return out

    def group(self, part: str) -> str:
        return part.split("/", 1)[1]  # both modes of a source on one rank: one tokenizer pair

    def run(self, ctx: Context, todo: dict[str, list[int]]) -> None:
        from profuser.chat import end_of_turn_id
        from profuser.models import load_chat_tokenizer

        cfg, sd, tsd = ctx.cfg, ctx.stage_dir(self.name), ctx.stage_dir("teacher")
        if not todo:
            return
        tcm = load_chat_tokenizer(cfg.target)
        tgt = Target(tcm, end_of_turn_id(tcm.tokenizer, tcm.template), cfg.target.max_length or cfg.data.max_length)
        winners = read_winners(tsd)
        norm = ctx.stage_dir("normalize")
        for spec in cfg.sources:
            jobs = [(m, i) for m in MODES for i in todo.get(f"{m}/{spec.name}", [])]
            if not jobs:
                continue
            pair = make_pair(ctx, spec, tgt)
            shard_ids = {i: norm.read("records", i, ["id"]).column("id").to_pylist() for _, i in jobs}
            total = sum(sum(winners.get((m, rid), {}).get("source") == spec.name for rid in shard_ids[i])
                        for m, i in jobs)
            bar = Progress(ctx, total, f"align {spec.name} -> {cfg.target.name}")
            records: dict[int, list[dict]] = {}
            for m, i in sorted(jobs, key=lambda j: (j[1], MODES.index(j[0]))):
                if i not in records:
                    records = {i: read_records(ctx, i)}  # keep one shard's records at a time
                self._shard(ctx, sd, tsd, pair, tgt, winners, m, i, records[i], bar)
            bar.close()

    def _shard(self, ctx, sd, tsd, pair: Pair, tgt: Target, winners: dict, mode: str, i: int, records: list[dict],
               bar: Progress) -> None:
        t0 = time.time()
        part = f"{mode}/{pair.name}"
        mine = [r for r in records if winners.get((mode, r["id"]), {}).get("source") == pair.name]
        table = tsd.read(part, i)
        table = table.filter(pc.is_in(table["id"], value_set=pa.array([r["id"] for r in mine], pa.string())))
        at = {rid: j for j, rid in enumerate(table["id"].to_pylist())}
        k = ctx.cfg.prep.topk
        tok_ids, top_ids = unnest(table["token_ids"]), unnest(table["topk_ids"], k)
        top_lps = unnest(table["topk_logprobs"], k)
        responses = table["response"].to_pylist()
        rows, rejects = [], []
        stats = dict.fromkeys(STAT_KEYS, 0)
        stats["kept_mass_sum"] = 0.0
        for rec in mine:
            w = winners[(mode, rec["id"])]
            j = at.get(rec["id"])
            try:
                if j is None:
                    raise Reject("missing_teacher_row", f"winners.parquet names {pair.name} as the {mode} teacher but "
                                                        f"teacher/{part} has no row for this id")
                out = align_sample(pair, tgt, ctx.cfg.data.overlength, rec["messages"], responses[j],
                                   tok_ids[j].astype(np.int64), top_ids[j], top_lps[j])
            except Reject as e:
                rejects.append({"id": rec["id"], "mode": mode, "source": pair.name, "kind": e.kind, "reason": e.reason})
                continue
            score = w["ce"] if mode == "training" else w["votes"]
            rows.append({"id": rec["id"], "mode": mode, "source": pair.name, "teacher_score": score, "ce": w["ce"],
                         "votes": w["votes"], "mean_z": w["mean_z"], **out})
            stats["rows"] += 1
            stats["response_positions"] += out["n_response"]
            stats["aligned"] += out["n_aligned"]
            stats["transferred"] += out["n_transferred"]
            stats["kept_mass_sum"] += out["kept_mass_sum"]
            stats["copy_rows"] += out["method"] == "copy"
            stats["rows_without_transfer"] += out["n_transferred"] == 0
            bar.update(1, out["n_response"])
        bar.update(len(mine) - len(rows), 0)
        sd.commit(part, i, rows_to_table(rows),
                  sidecar_info(len(mine), len(rows), rejects, time.time() - t0, stats["response_positions"],
                               align=stats, pair={"same_tokenizer": pair.same_tokenizer,
                                                  "copy_ids": pair.vocab_map is None,
                                                  "vocab_mapping": ctx.cfg.prep.vocab_mapping,
                                                  "mapped_share": pair.mapped_share}))

    def finalize(self, ctx, sd, parts, rejects):
        cfg = ctx.cfg
        n = len(next(iter(parts.values()))["shards"]) if parts else 0
        pairs, shares = {}, {}
        for spec in cfg.sources:
            src = spec.name
            entry: dict = {"source": src, "target": cfg.target.name}
            total = dict.fromkeys(STAT_KEYS, 0)
            for m in MODES:
                agg = dict.fromkeys(STAT_KEYS, 0)
                for i in range(n):
                    side = sd.sidecar(f"{m}/{src}", i)
                    if "same_tokenizer" not in entry:
                        entry.update(side.get("pair") or {})
                    for key in STAT_KEYS:
                        agg[key] += side.get("align", {}).get(key, 0)
                for key in STAT_KEYS:
                    total[key] += agg[key]
                entry[m] = pair_summary(agg)
            entry["all"] = pair_summary(total)
            pairs[f"{src}->{cfg.target.name}"] = entry
            shares[src] = [x for m in MODES for i in range(n)
                           for x in _row_shares(sd.read(f"{m}/{src}", i, ["n_transferred", "n_response"]))]
        for key, e in pairs.items():
            a = e["all"]
            ctx.say(f"align {key}: {a['rows']} rows, transferred distributions at "
                    f"{_pct(a['transferred_share'])} of {a['response_positions']} target response positions, top-k "
                    f"mass kept {_pct(a['kept_mass'])} ({'copy' if e.get('copy_ids') else cfg.prep.vocab_mapping} "
                    f"vocabulary map, {_pct(e.get('mapped_share'))} of source tokens mapped)")
        log_align_stats(ctx, pairs, shares)
        return {"pairs": pairs}


def _row_shares(t: pa.Table) -> list[float]:
    tr, rs = t.column("n_transferred").to_pylist(), t.column("n_response").to_pylist()
    return [a / b for a, b in zip(tr, rs) if b]


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def pair_summary(a: dict) -> dict:
    """Counts of one source -> target pair plus the two shares the stage reports."""
    return {**{k: a[k] for k in STAT_KEYS if k != "kept_mass_sum"},
            "transferred_share": a["transferred"] / a["response_positions"] if a["response_positions"] else None,
            "aligned_share": a["aligned"] / a["response_positions"] if a["response_positions"] else None,
            "kept_mass": a["kept_mass_sum"] / a["aligned"] if a["aligned"] else None}


def log_align_stats(ctx, pairs: dict, shares: dict) -> Optional[str]:
    """The per-pair statistics to W&B (a `<run>-align` run, same project; offline without an API key)."""
    from profuser.config import wandb_mode
    from profuser.prep.stats import start_prep_run

    run = start_prep_run(ctx.cfg, "align")
    if run is None:
        return None
    import wandb

    cols = ["source", "target", "mode", "rows", "response_positions", "transferred_share", "aligned_share",
            "kept_mass", "mapped_share"]
    data = [[e["source"], e["target"], m, e[m]["rows"], e[m]["response_positions"], e[m]["transferred_share"],
             e[m]["aligned_share"], e[m]["kept_mass"], e.get("mapped_share")]
            for e in pairs.values() for m in (*MODES, "all")]
    log = {"prep/align/pairs": wandb.Table(columns=cols, data=data)}
    for src, v in shares.items():
        if v:
            log[f"prep/align/transferred_share_per_row/{src}"] = wandb.Histogram(v)
    run.log(log)
    flat = {}
    for e in pairs.values():
        for m in (*MODES, "all"):
            for key in ("transferred_share", "kept_mass"):
                if e[m][key] is not None:
                    flat[f"prep/align/{key}/{m}/{e['source']}"] = e[m][key]
    run.summary.update(flat)
    where = run.dir
    run.finish()
    ctx.say(f"alignment statistics logged to W&B ({wandb_mode(ctx.cfg.wandb)})")
    return where
