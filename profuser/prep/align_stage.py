"""Stage 5, align: each mode's teacher chosen and its distributions re-expressed on the target's tokens.

Two parts, `training` and `inference`, one row per sample and mode:

- training: every source was teacher-forced on the ground truth (teacher/training/<source>); the
  sources are ranked by MinCE (profuser.selection: bits per byte of the response text by default,
  `prep.mince`), and the best one whose row can be used teaches. When a row cannot be used
  (unalignable text, re-tokenization mismatch, no position transferred, ...) the next source in the
  ranking teaches instead, and a reject line records why (kind = the failure, "falling back to X").
- inference: the score stage's winner teaches on its own response (teacher/inference/<winner>).
  Only the winner's distributions on that response exist, so there is no fallback: a sample whose
  row cannot be used has no inference mode (reject line), and keeps its training mode.

For each (sample, teacher):
1. the conversation is encoded with the target's tokenizer and chat template (`encode_chat`, the
   target's max_length and data.overlength; alignment is over the response only);
2. the source side is re-rendered as the teacher stage rendered it, and its response tokens must
   equal the stored `token_ids` (else the distributions would be for other tokens);
3. every target response position gets a distribution by profuser.transfer's rule (byte spans;
   chain rule over source tokens a target token covers, conditioning when it starts inside one;
   vocabulary tables cached per tokenizer pair in the user cache, `prep.vocab_mapping`); identical
   tokenizers with identical renderings copy the rows unchanged. Samples are prepared one by one
   (prepare_sample) and projected together per source (project_rows: profuser.transfer.project_many,
   the same rows as one call each, in batches of PROJECT_BATCH_TOKENS target tokens); a shard runs
   in rounds, each sample still without a row trying its next-ranked source.

Rows (docs/ARCHITECTURE.md, "Stage contracts") cover the WHOLE target sequence, label-aligned:
  id, mode, source (the teacher), rank (its place in the ranking: 0 = first choice),
  teacher_score (training: the MinCE value, bits per byte or nats per token; inference: the
  winner's scorer votes), ce (the teacher's nats per own token on this response), bpb (its bits per
  byte of the response text), votes and mean_z (inference; null for training), method ("copy" |
  "project" | "mined"), input_ids [T], labels [T] (-100 on the prompt), topk_ids [T, k] int32 (-1
  on prompt rows, uncovered positions and padding), topk_logprobs [T, k] float16 (-inf where the
  id is -1; the teacher's probabilities, not renormalized), n_response, n_aligned (positions whose
  span equals one source token's: the 1:1 rule), n_transferred (positions with a distribution),
  kept_mass (mean over those of the share of the head row's stored mass carried), mass (mean
  probability mass of the stored entries there).

The manifest's `pairs` holds the statistics per source -> target pair and mode, `selection` the
first-choice and actual teacher counts; both also go to W&B, and prep/stats.json is written here.

Never renormalizes a teacher's probabilities, and never passes on a row whose re-tokenized
response differs from the tokens the teacher stored (a reject line says why).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from profuser.constants import PREP_MODES
from profuser.data import Reject
from profuser.prep.formats import ALIGN_SCHEMA, to_table, unnest
from profuser.prep.stages import Context, Progress, Stage, model_deps, read_records, sidecar_info, upstream_hashes

ALIGN_VERSION = 6  # bump when the alignment rules change (invalidates align and build; 5: word lookahead;
# 6: a special candidate is no text to the rule: steps 1, 3 and 4 of profuser.transfer)
# target tokens per project_many call: the rule's throughput on AlpacaEval answers (README,
# bench_align's call-size sweep, 400 answers) rises 1.56-1.67x from one call per text to 4k-16k tokens
# and falls again at 64k (cache misses); its peak memory at 16k is 45-103 MB
PROJECT_BATCH_TOKENS = 16384
STAT_KEYS = ("rows", "fallback_rows", "response_positions", "text_positions", "text_transferred", "aligned",
             "transferred", "kept_mass_sum", "mass_sum", "copy_rows", "lookahead")


# --------------------------------------------------------------------------------------------
# one source -> target pair


@dataclass
class Pair:
    name: str  # source name
    chat_model: object  # the source's ChatModel (tokenizer + template)
    eot: Optional[int]
    same_tokenizer: bool
    copy: bool  # identical tokenizer and end-of-turn token: rows can be copied unchanged
    first: Optional[np.ndarray]  # whole-token map (vocab_map.pair_tables); None when copying
    by_byte: Optional[np.ndarray]  # by-byte prefix table
    mapped_share: float  # share of the source's regular (non-special) tokens with a target counterpart
    method: str  # "spans" (offsets) | "mined" (no offsets: 1:1 pairs by MinED)
    trie: Optional[object] = None  # the target vocabulary's vocab_map.PrefixTrie (None: head rows only)
    exact_walk: bool = False  # the trie gives only identical surfaces (vocab_mapping exact/soft)


@dataclass
class Target:
    chat_model: object
    eot: Optional[int]
    max_length: int


def make_pair(cfg, cache_dir, spec, tgt: Target, chat_model=None) -> Pair:
    """The source `spec` (its ChatModel `chat_model` when already loaded) against the target: end-of-turn
    tokens, identical-tokenizer check, vocabulary tables (cached in `cache_dir`), alignment method."""
    from profuser.align import same_tokenizer, surfaces
    from profuser.chat import end_of_turn_id
    from profuser.models import load_chat_tokenizer
    from profuser.vocab_map import load_pair_tables, prefix_trie

    chat_model = chat_model or load_chat_tokenizer(spec)
    eot = end_of_turn_id(chat_model.tokenizer, chat_model.template)
    same = same_tokenizer(chat_model.tokenizer, tgt.chat_model.tokenizer)
    pairs = {eot: tgt.eot} if eot is not None and tgt.eot is not None else {}
    first = by_byte = None
    share = 1.0
    copy = same and eot == tgt.eot
    first, by_byte = load_pair_tables(chat_model.tokenizer, tgt.chat_model.tokenizer, cache_dir, cfg.prep.vocab_mapping,
                                      pairs)
    if not copy:
        s = surfaces(chat_model.tokenizer)
        regular = ~s.special & (s.lengths > 0)
        share = float((first[regular] >= 0).mean()) if regular.any() else 0.0
    return Pair(spec.name, chat_model, eot, same, copy, first, by_byte, share,
                alignment_method(chat_model.tokenizer, tgt.chat_model.tokenizer),
                None if copy else prefix_trie(tgt.chat_model.tokenizer), cfg.prep.vocab_mapping != "prefix")


def alignment_method(src_tok, tgt_tok) -> str:
    """"spans" when both tokenizers give character offsets, else "mined" (FuseLLM's MinED over the
    tokens' surfaces: 1:1 pairs only)."""
    from profuser.models import has_offsets

    return "spans" if has_offsets(src_tok) and has_offsets(tgt_tok) else "mined"


class Pairs:
    """The source -> target pairs of one align run, built on first use (tokenizer + cached tables)."""

    def __init__(self, ctx: Context, tgt: Target):
        self.ctx, self.tgt = ctx, tgt
        self.specs = {m.name: m for m in ctx.cfg.sources}
        self.built: dict[str, Pair] = {}

    def __getitem__(self, name: str) -> Pair:
        from profuser.vocab_map import cache_dir

        if name not in self.built:
            self.built[name] = make_pair(self.ctx.cfg, cache_dir(), self.specs[name], self.tgt)
        return self.built[name]

    def info(self) -> dict:
        return {n: {"same_tokenizer": p.same_tokenizer, "copy_ids": p.copy, "mapped_share": p.mapped_share,
                    "method": p.method} for n, p in self.built.items()}


def align_sample(pair: Pair, tgt: Target, overlength: str, messages: list[dict], response: str,
                 token_ids: np.ndarray, token_logprobs: np.ndarray, topk_ids: np.ndarray,
                 topk_logprobs: np.ndarray, lookahead: Optional[tuple] = None) -> dict:
    """One teacher row on the target's tokens: input_ids, labels, full-length [T, k] top-k and the
    row's statistics. Raises Reject(kind, reason) when it cannot be used. (The stage itself runs
    prepare_sample per sample and project_rows per batch: the same rows.) `lookahead`: the teacher
    row's word outcomes (rows, texts, log-probs), or None."""
    ready = prepare_sample(pair, tgt, overlength, messages, response, token_ids, token_logprobs, topk_ids,
                           topk_logprobs, lookahead)
    return ready if isinstance(ready, dict) else project_rows(pair, [ready])[0]


@dataclass
class PendingRow:
    """A sample's row before its projection: what profuser.transfer.project_many needs, and what the
    row is built from afterwards."""
    projection: object  # profuser.transfer.Projection
    enc: object  # the target's encode_chat result
    in_text: np.ndarray  # bool [m]: target response positions holding response text or the end of turn
    lookahead: Optional[tuple] = None  # the teacher's word outcomes (rows, texts, log-probs), prep.lookahead
    enc_tokenizer: object = None  # the target's tokenizer (spells the outcomes)


def token_batches(sizes, cap: int = PROJECT_BATCH_TOKENS) -> list[list[int]]:
    """Consecutive indices of `sizes` (target tokens per text) in batches that close once they hold
    `cap` tokens or more (so at most cap plus one text); cap 0: one text per batch."""
    out, total = [], 0
    for i, n in enumerate(sizes):
        if not out or total >= cap:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def project_rows(pair: Pair, pending: list[PendingRow]) -> list[dict]:
    """The rows of prepared samples of one source, projected together (project_many: one vectorized
    pass per batch instead of one per sample, README "Cross-tokenizer alignment"; the rows are the
    same as one project call each gives)."""
    from profuser.align import surfaces
    from profuser.lookahead import EOT_OUTCOME, apply_outcomes, speller, word_classes
    from profuser.transfer import project_many

    out: list[Optional[dict]] = [None] * len(pending)
    by_k: dict[int, list[int]] = {}  # the teacher's top-k width (the same for every row of a stage)
    for i, p in enumerate(pending):
        by_k.setdefault(p.projection.topk_ids.shape[1], []).append(i)
    src_tok = pair.chat_model.tokenizer
    # the target token the source's end of turn maps to (the whole-token map holds the eot pair): an
    # end-of-turn word outcome is taught as it
    t_eot = (int(pair.first[pair.eot]) if pair.eot is not None and pair.first is not None
             and 0 <= pair.eot < len(pair.first) and pair.first[pair.eot] >= 0 else None)
    for k, idx in by_k.items():
        # calls of about PROJECT_BATCH_TOKENS target tokens, so that the rule's [positions,
        # candidates] work arrays stay tens of MB whatever the shard size
        for part in token_batches([len(pending[i].projection.tgt.ids) for i in idx]):
            call = [idx[j] for j in part]
            items = [pending[i].projection for i in call]
            need = max(int(max(it.src.ids.max(initial=-1), np.max(it.topk_ids, initial=-1))) for it in items)
            outcomes: dict = {}  # the call's word outcomes, spelled at once per target tokenizer
            for i in call:
                if pending[i].lookahead is not None:
                    outcomes.setdefault(pending[i].enc_tokenizer, []).extend(pending[i].lookahead[1])
            for tok, texts in outcomes.items():
                speller(tok).prepare(t for t in texts if t != EOT_OUTCOME)
            for i, tr in zip(call, project_many(items, surfaces(src_tok, need), pair.first, pair.by_byte, k,
                                                trie=pair.trie, exact_only=pair.exact_walk)):
                covered = (tr.ids >= 0).any(axis=1)
                n_la = 0
                la = pending[i].lookahead
                if la is not None and len(la[0]):  # the word lookahead's rows replace the rule's where it fits
                    pr = pending[i].projection
                    n_la = apply_outcomes(pr.src, pr.tgt, tr.ids, tr.logprobs, tr.kept, covered, *la,
                                          speller(pending[i].enc_tokenizer), word_classes(src_tok), t_eot)
                out[i] = _full_row(pending[i].enc, tr.ids, tr.logprobs, covered, pending[i].in_text, tr.kept,
                                   tr.one_to_one, "project", k, n_la)
    return out


def prepare_sample(pair: Pair, tgt: Target, overlength: str, messages: list[dict], response: str,
                   token_ids: np.ndarray, token_logprobs: np.ndarray, topk_ids: np.ndarray,
                   topk_logprobs: np.ndarray, lookahead: Optional[tuple] = None):
    """align_sample up to the projection: the finished row (dict) when it needs none (copy, MinED),
    else a PendingRow for project_rows. Raises Reject(kind, reason) when the row cannot be used."""
    from profuser.align import end_of_turn_index, response_tokens
    from profuser.chat import OverLength, encode_chat, split_response
    from profuser.transfer import Projection

    src_tok, tgt_tok = pair.chat_model.tokenizer, tgt.chat_model.tokenizer
    tname = tgt.chat_model.spec.name
    try:
        s_prompt, s_resp = split_response(src_tok, pair.chat_model.template, messages, response)
    except Exception as e:  # noqa: BLE001 — a template that cannot render this response
        raise Reject("template_error", f"{pair.name}: {type(e).__name__}: {e}") from e
    try:
        enc = encode_chat(tgt_tok, tgt.chat_model.template, messages, response, tgt.max_length, overlength)
        t_prompt, t_resp = split_response(tgt_tok, tgt.chat_model.template, messages, response)
    except OverLength as e:
        raise Reject("over_length", f"target {tname}: {e} (data.overlength={overlength})", True) from e
    except Exception as e:  # noqa: BLE001
        raise Reject("template_error", f"target {tname}: {type(e).__name__}: {e}", True) from e
    if pair.method == "mined":
        again = encode_chat(src_tok, pair.chat_model.template, messages, response).input_ids
        src_resp = again[len(again) - len(token_ids):] if len(again) >= len(token_ids) else again
        if list(src_resp) != list(np.asarray(token_ids).tolist()):
            raise Reject("retokenization_mismatch", f"{pair.name}: re-tokenizing the response does not give the "
                                                    f"{len(token_ids)} tokens the teacher stored")
        return _align_mined(pair, tgt, enc, token_ids, token_logprobs, topk_ids, topk_logprobs)
    try:
        src = response_tokens(src_tok, s_prompt + s_resp, len(s_prompt), response)
    except ValueError as e:
        raise Reject("unalignable", f"{pair.name}: {e}") from e
    try:
        tgt_rt = response_tokens(tgt_tok, t_prompt + t_resp, len(t_prompt), response)
    except ValueError as e:
        raise Reject("unalignable", f"target {tname}: {e}", True) from e
    if not np.array_equal(src.ids, token_ids):
        n = min(len(src.ids), len(token_ids))
        first_diff = next((j for j in range(n) if src.ids[j] != token_ids[j]), n)
        raise Reject("retokenization_mismatch",
                     f"{pair.name}: re-tokenizing the response gives {len(src.ids)} tokens, the teacher stored "
                     f"{len(token_ids)} (first difference at response token {first_diff}); its distributions are for "
                     "other tokens")
    resp_ids = np.asarray(enc.input_ids[enc.prompt_len:], dtype=np.int64)
    if not np.array_equal(tgt_rt.ids, resp_ids):
        raise Reject("target_mismatch", f"target {tname}: the aligned response tokens differ from encode_chat's "
                                        f"({len(tgt_rt.ids)} vs {len(resp_ids)})", True)
    k = topk_ids.shape[1]
    m = len(resp_ids)
    n_resp = len(response.encode("utf-8", "surrogatepass"))
    eot = (end_of_turn_index(src, pair.eot, n_resp), end_of_turn_index(tgt_rt, tgt.eot, n_resp))
    # positions holding response text or the end of turn (the template's other tokens have no source)
    in_text = (tgt_rt.ends > 0) & (tgt_rt.ends <= n_resp) & (tgt_rt.ends > tgt_rt.starts)
    if eot[1] is not None:
        in_text[eot[1]] = True
    if pair.copy and s_resp == t_resp and np.array_equal(src.ids, tgt_rt.ids):
        ids = np.asarray(topk_ids, dtype=np.int64)
        lps = np.where(ids >= 0, np.asarray(topk_logprobs, dtype=np.float32), -np.inf)
        covered = (ids >= 0).any(axis=1)
        kept = covered.astype(np.float64)
        one = np.ones(m, dtype=bool)
        return _full_row(enc, ids, lps, covered, in_text, kept, one, "copy", k)
    return PendingRow(Projection(src, tgt_rt, n_resp, topk_ids, topk_logprobs, token_logprobs, eot), enc, in_text,
                      lookahead, tgt_tok)


def _full_row(enc, ids, lps, covered, in_text, kept, one, method: str, k: int, n_lookahead: int = 0) -> dict:
    """The row of align_sample: [T, k] arrays over the whole sequence (prompt rows empty) + statistics."""
    T, P = len(enc.input_ids), enc.prompt_len
    full_ids = np.full((T, k), -1, dtype=np.int32)
    full_lps = np.full((T, k), -np.inf, dtype=np.float16)
    full_ids[P:] = ids
    full_lps[P:] = lps.astype(np.float16)
    n_tr = int(covered.sum())
    mass = np.exp(np.where(ids >= 0, lps, -np.inf).astype(np.float64)).sum(axis=1)
    return {"method": method, "input_ids": np.asarray(enc.input_ids, dtype=np.int32),
            "labels": np.asarray(enc.labels, dtype=np.int32), "topk_ids": full_ids, "topk_logprobs": full_lps,
            "n_response": T - P, "n_text": int(in_text.sum()), "n_text_transferred": int((covered & in_text).sum()),
            "n_aligned": int(one.sum()), "n_transferred": n_tr,
            "kept_mass": float(kept[covered].mean()) if n_tr else None,
            "mass": float(mass[covered].mean()) if n_tr else None,
            "kept_mass_sum": float(kept[covered].sum()), "mass_sum": float(mass[covered].sum()),
            "n_lookahead": n_lookahead}


def _align_mined(pair: Pair, tgt: Target, enc, token_ids, token_logprobs, topk_ids, topk_logprobs) -> dict:
    """A tokenizer without offsets: MinED (DTW over the response tokens' surfaces) pairs tokens one
    to one; paired positions take the source row (the 1:1 rule), the end-of-turn tokens are paired."""
    from profuser.align import ResponseTokens, align_mined, surfaces
    from profuser.transfer import project

    src_ids = np.asarray(token_ids, dtype=np.int64)
    tgt_ids = np.asarray(enc.input_ids[enc.prompt_len:], dtype=np.int64)
    ss, ts = surfaces(pair.chat_model.tokenizer), surfaces(tgt.chat_model.tokenizer)
    surf = lambda t, i: t.surfaces[i] if 0 <= i < len(t.surfaces) else b""  # noqa: E731
    pairs = align_mined([surf(ss, i) for i in src_ids], [surf(ts, i) for i in tgt_ids])
    last = lambda ids, e: (int(np.flatnonzero(ids == e)[-1]) if e is not None and (ids == e).any() else None)  # noqa: E731
    eot = (last(src_ids, pair.eot), last(tgt_ids, tgt.eot))
    if None not in eot:
        pairs[eot[1]] = eot[0]
    dummy = lambda ids: ResponseTokens(ids, np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64),  # noqa: E731
                                       np.ones(len(ids), bool), np.zeros(0, np.uint8), 0)
    k = topk_ids.shape[1]
    tr = project(dummy(src_ids), dummy(tgt_ids), 0, ss, pair.first, pair.by_byte, topk_ids, topk_logprobs,
                 token_logprobs, k, eot, pairs=pairs)
    covered = (tr.ids >= 0).any(axis=1)
    return _full_row(enc, tr.ids, tr.logprobs, covered, np.ones(len(tgt_ids), bool), tr.kept, tr.one_to_one,
                     "mined", k)


class TeacherRows:
    """One teacher part's shard, read once, with per-row access to its nested columns."""

    def __init__(self, table: pa.Table, k: int):
        self.table, self.k = table, k
        self.row_of = {rid: j for j, rid in enumerate(table["id"].to_pylist())}
        self._cols: dict = {}

    def column(self, name: str) -> list:
        if name not in self._cols:
            c = self.table[name]
            numeric = name.startswith("token_") or name in ("lookahead_rows", "lookahead_logprobs")
            self._cols[name] = (unnest(c, self.k) if name.startswith("topk") else
                                unnest(c) if numeric else c.to_pylist())
        return self._cols[name]

    def row(self, j: int) -> dict:
        out = {name: self.column(name)[j] for name in ("response", "ce", "text_nll", "text_bytes", "token_ids",
                                                        "token_logprobs", "topk_ids", "topk_logprobs")}
        texts = self.column("lookahead_texts")[j]
        out["lookahead"] = None if texts is None else (self.column("lookahead_rows")[j], texts,
                                                       self.column("lookahead_logprobs")[j])
        return out


# --------------------------------------------------------------------------------------------
# the stage


class AlignStage(Stage):
    name = "align"
    needs = ("normalize", "score", "teacher")

    def parts(self, cfg, plan):
        from profuser.vocab_map import MAP_VERSION

        t = cfg.target
        common = {"target": {**model_deps(t), "max_length": t.max_length or cfg.data.max_length},
                  "overlength": cfg.data.overlength, "vocab_mapping": cfg.prep.vocab_mapping,
                  "version": [ALIGN_VERSION, MAP_VERSION]}
        teacher = lambda mode: {k: v for k, v in upstream_hashes(plan, "teacher").items()  # noqa: E731
                                if k.startswith(f"teacher/{mode}/")}
        return {
            # MinCE compares every source's training row; the order of the sources breaks ties
            "training": {"upstream": {**upstream_hashes(plan, "normalize"), **teacher("training")}, "mince": cfg.prep.mince,
                         "sources": [m.name for m in cfg.sources], **common},
            "inference": {"upstream": {**upstream_hashes(plan, "normalize", "score"), **teacher("inference")},
                          **common},
        }

    def run(self, ctx: Context, todo: dict[str, list[int]]) -> None:
        from profuser.chat import end_of_turn_id
        from profuser.models import load_chat_tokenizer

        cfg, stage_dir = ctx.cfg, ctx.stage_dir(self.name)
        if not todo:
            return
        tcm = load_chat_tokenizer(cfg.target)
        tgt = Target(tcm, end_of_turn_id(tcm.tokenizer, tcm.template), cfg.target.max_length or cfg.data.max_length)
        pairs = Pairs(ctx, tgt)
        for m in cfg.sources:  # every pair up front: tables are cached, and each shard records them all
            pairs[m.name]
        norm = ctx.stage_dir("normalize")
        jobs = [(m, i) for m in PREP_MODES for i in todo.get(m, [])]
        bar = Progress(ctx, sum(norm.num_rows("records", i) for _, i in jobs), f"align -> {cfg.target.name}")
        for mode, i in sorted(jobs, key=lambda j: (j[1], PREP_MODES.index(j[0]))):
            self._shard(ctx, stage_dir, pairs, tgt, mode, i, read_records(ctx, i), bar)
        bar.close()

    def _candidates(self, ctx: Context, mode: str, i: int, records: list[dict]):
        """Per record id: the ranked (source, TeacherRows, row index, info) candidates of this mode."""
        from profuser.selection import bits_per_byte, mince_value, rank_sources

        cfg, teacher_dir, k = ctx.cfg, ctx.stage_dir("teacher"), ctx.cfg.prep.topk
        out: dict[str, list] = {}
        if mode == "training":
            parts = {m.name: TeacherRows(teacher_dir.read(f"training/{m.name}", i), k) for m in cfg.sources}
            for rec in records:
                values, info = {}, {}
                for src, rows in parts.items():
                    j = rows.row_of.get(rec["id"])
                    if j is None:
                        continue
                    ce, nll, nb = (rows.column(c)[j] for c in ("ce", "text_nll", "text_bytes"))
                    values[src] = mince_value(ce, nll, nb, cfg.prep.mince)
                    info[src] = {"teacher_score": values[src], "ce": ce, "bpb": bits_per_byte(nll, nb),
                                 "votes": None, "mean_z": None}
                out[rec["id"]] = [(s, parts[s], parts[s].row_of[rec["id"]], info[s]) for s in rank_sources(values)]
            return out
        scores = {r["id"]: r for r in ctx.stage_dir("score").read("scores", i).to_pylist()}
        parts: dict[str, TeacherRows] = {}
        for rec in records:
            sc = scores.get(rec["id"])
            if not sc or sc["winner"] is None:
                continue
            src = sc["winner"]
            if src not in parts:
                parts[src] = TeacherRows(teacher_dir.read(f"inference/{src}", i), k)
            j = parts[src].row_of.get(rec["id"])
            if j is None:
                out[rec["id"]] = []  # the teacher stage could not use it (see its rejects)
                continue
            c = sc["sources"].index(src)
            row = parts[src]
            out[rec["id"]] = [(src, row, j, {"teacher_score": sc["votes"][c], "ce": row.column("ce")[j],
                                             "bpb": bits_per_byte(row.column("text_nll")[j], row.column("text_bytes")[j]),
                                             "votes": sc["votes"][c], "mean_z": sc["mean_z"][c]})]
        return out

    def _shard(self, ctx, stage_dir, pairs: "Pairs", tgt: Target, mode: str, i: int, records: list[dict],
               bar: Progress) -> None:
        t0 = time.time()
        cands = self._candidates(ctx, mode, i, records)
        rows, rejects = [], []
        stats = {m.name: dict.fromkeys(STAT_KEYS, 0) for m in ctx.cfg.sources}
        choice = {m.name: {"first": 0, "taught": 0} for m in ctx.cfg.sources}
        n_in = 0
        # rounds: every sample still without a row tries its next-ranked source; the samples of a
        # round are prepared one by one and projected together per source (project_rows)
        todo: list[tuple[dict, int]] = []
        found: dict[str, tuple[int, dict]] = {}  # record id -> (rank, row)
        why: dict[str, list[dict]] = {}  # record id -> its reject lines, in rank order
        for rec in records:
            if rec["id"] not in cands:
                bar.update(1, 0)
                continue
            n_in += 1
            ranked = cands[rec["id"]]
            if not ranked:
                why[rec["id"]] = [{"id": rec["id"], "mode": mode, "kind": "missing_teacher_row", "reason": (
                    "no source has a training row for this id (see the teacher stage's rejects)" if mode == "training"
                    else "the inference winner has no teacher row for this id (see the teacher stage's rejects)")}]
                bar.update(1, 0)
                continue
            choice[ranked[0][0]]["first"] += 1
            todo.append((rec, 0))
        nxt: list[tuple[dict, int]] = []

        def settle(rec: dict, rank: int, out) -> None:  # out: the row, or the Reject that stopped it
            ranked = cands[rec["id"]]
            src = ranked[rank][0]
            if isinstance(out, dict) and out["n_transferred"] == 0:
                out = Reject("no_transfer", f"{src}: no target response position received a distribution")
            if isinstance(out, Reject):
                then = ("the target's own problem: no other source can help" if out.target_side else
                        f"falling back to {ranked[rank + 1][0]}" if rank + 1 < len(ranked) else
                        "no other source to fall back to" if mode == "training" else
                        "only the winner's distributions exist in inference mode: no inference mode for this sample")
                why.setdefault(rec["id"], []).append({"id": rec["id"], "mode": mode, "source": src, "kind": out.kind,
                                                      "reason": f"{out.detail} ({then})"})
                if not out.target_side and rank + 1 < len(ranked):
                    nxt.append((rec, rank + 1))
                else:
                    bar.update(1, 0)
                return
            found[rec["id"]] = (rank, out)
            bar.update(1, out["n_response"])

        while todo:
            waiting: dict[str, list[tuple[dict, int, PendingRow]]] = {}
            for rec, rank in todo:
                src, table, j, _ = cands[rec["id"]][rank]
                row = table.row(j)
                try:
                    ready = prepare_sample(pairs[src], tgt, ctx.cfg.data.overlength, rec["messages"], row["response"],
                                           np.asarray(row["token_ids"], dtype=np.int64), row["token_logprobs"],
                                           row["topk_ids"], row["topk_logprobs"], row["lookahead"])
                except Reject as e:
                    settle(rec, rank, e)
                    continue
                if not isinstance(ready, PendingRow):
                    settle(rec, rank, ready)
                    continue
                waiting.setdefault(src, []).append((rec, rank, ready))
            for src, group in waiting.items():  # project_rows batches them by target tokens
                for (rec, rank, _), out in zip(group, project_rows(pairs[src], [p for *_, p in group])):
                    settle(rec, rank, out)
            todo = list(nxt)
            nxt.clear()
        for rec in records:  # rows, reject lines and statistics in record order
            rejects += why.get(rec["id"], [])
            if rec["id"] not in found:
                continue
            rank, out = found[rec["id"]]
            src, _, _, info = cands[rec["id"]][rank]
            rows.append({"id": rec["id"], "mode": mode, "source": src, "rank": rank, **info, **out})
            st = stats[src]
            st["rows"] += 1
            st["fallback_rows"] += rank > 0
            st["response_positions"] += out["n_response"]
            st["text_positions"] += out["n_text"]
            st["text_transferred"] += out["n_text_transferred"]
            st["aligned"] += out["n_aligned"]
            st["transferred"] += out["n_transferred"]
            st["kept_mass_sum"] += out["kept_mass_sum"]
            st["mass_sum"] += out["mass_sum"]
            st["copy_rows"] += out["method"] == "copy"
            st["lookahead"] += out["n_lookahead"]
            choice[src]["taught"] += 1
        stage_dir.commit(mode, i, to_table(rows, ALIGN_SCHEMA),
                         sidecar_info(n_in, len(rows), rejects, time.time() - t0,
                                      sum(s["response_positions"] for s in stats.values()), align=stats, choice=choice,
                                      pairs=pairs.info()))

    def finalize(self, ctx, stage_dir, parts, rejects):
        from profuser.prep.stats import collect_stats, log_stats

        cfg = ctx.cfg
        n = len(next(iter(parts.values()))["shards"]) if parts else 0
        sources = [m.name for m in cfg.sources]
        agg = {m: {s: dict.fromkeys(STAT_KEYS, 0) for s in sources} for m in PREP_MODES}
        choice = {m: {s: {"first": 0, "taught": 0} for s in sources} for m in PREP_MODES}
        pair_info: dict = {}
        for m in PREP_MODES:
            for i in range(n):
                side = stage_dir.sidecar(m, i)
                for s in sources:
                    for key in STAT_KEYS:
                        agg[m][s][key] += side.get("align", {}).get(s, {}).get(key, 0)
                    for key in ("first", "taught"):
                        choice[m][s][key] += side.get("choice", {}).get(s, {}).get(key, 0)
                for s, info in (side.get("pairs") or {}).items():
                    pair_info.setdefault(s, info)
        pairs = {}
        for s in sources:
            entry: dict = {"source": s, "target": cfg.target.name, "vocab_mapping": cfg.prep.vocab_mapping,
                           **pair_info.get(s, {})}
            total = {key: sum(agg[m][s][key] for m in PREP_MODES) for key in STAT_KEYS}
            for m in PREP_MODES:
                entry[m] = pair_summary(agg[m][s])
            entry["all"] = pair_summary(total)
            pairs[f"{s}->{cfg.target.name}"] = entry
        for key, e in pairs.items():
            a = e["all"]
            if not a["rows"]:
                continue
            ctx.say(f"align {key}: {a['rows']} rows ({a['fallback_rows']} as fallback teacher), distributions at "
                    f"{_pct(a['transferred_share'])} of {a['response_positions']} target response positions "
                    f"({_pct(a['text_share'])} of the {a['text_positions']} holding response text or the end of turn; "
                    f"1:1 spans alone: {_pct(a['aligned_share'])}), top-k mass carried {_pct(a['kept_mass'])}, "
                    f"mean stored mass {_fmt(a['mass'])} ({'copy' if e.get('copy_ids') else cfg.prep.vocab_mapping} "
                    f"vocabulary map, {_pct(e.get('mapped_share'))} of source tokens mapped)"
                    + (f"; word lookahead at {_pct(a['lookahead_share'])} of the positions" if a["lookahead"] else ""))
        for m in PREP_MODES:
            total = sum(c["taught"] for c in choice[m].values())
            if total:
                ctx.say(f"align: {m} teachers: " + ", ".join(
                    f"{s} {c['taught']} ({c['taught'] / total:.0%}; first choice {c['first']})"
                    for s, c in choice[m].items()))
        selection = {m: {s: dict(c) for s, c in choice[m].items()} for m in PREP_MODES}
        log_align_stats(ctx, pairs, _row_shares(ctx, stage_dir, n))
        log_stats(ctx, collect_stats(ctx, selection))
        return {"pairs": pairs, "selection": selection, "mince": cfg.prep.mince}


def _row_shares(ctx, stage_dir, n: int) -> dict:
    out: dict = {m.name: [] for m in ctx.cfg.sources}
    for m in PREP_MODES:
        for i in range(n):
            t = stage_dir.read(m, i, ["source", "n_transferred", "n_response"])
            for s, tr, rs in zip(*t.to_pydict().values()):
                if rs:
                    out[s].append(tr / rs)
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def pair_summary(a: dict) -> dict:
    """Counts of one source -> target pair plus the shares the stage reports."""
    rp, tr, tp = a["response_positions"], a["transferred"], a["text_positions"]
    return {**{k: a[k] for k in STAT_KEYS if not k.endswith("_sum")},
            "transferred_share": tr / rp if rp else None,
            "text_share": a["text_transferred"] / tp if tp else None,
            "aligned_share": a["aligned"] / rp if rp else None,
            "lookahead_share": a["lookahead"] / rp if rp else None,
            "kept_mass": a["kept_mass_sum"] / tr if tr else None,
            "mass": a["mass_sum"] / tr if tr else None}


def log_align_stats(ctx, pairs: dict, shares: dict) -> Optional[str]:
    """The per-pair statistics to W&B (a `<run>-align` run, same project; offline without an API key)."""
    from profuser.config import wandb_mode
    from profuser.prep.stats import start_prep_run

    run = start_prep_run(ctx.cfg, "align")
    if run is None:
        return None
    import wandb

    cols = ["source", "target", "mode", "rows", "fallback_rows", "response_positions", "transferred_share",
            "text_share", "aligned_share", "kept_mass", "mass", "mapped_share"]
    data = [[e["source"], e["target"], m, e[m]["rows"], e[m]["fallback_rows"], e[m]["response_positions"],
             e[m]["transferred_share"], e[m]["text_share"], e[m]["aligned_share"], e[m]["kept_mass"], e[m]["mass"],
             e.get("mapped_share")] for e in pairs.values() for m in (*PREP_MODES, "all")]
    log = {"prep/align/pairs": wandb.Table(columns=cols, data=data)}
    for src, v in shares.items():
        if v:
            log[f"prep/align/transferred_share_per_row/{src}"] = wandb.Histogram(v)
    run.log(log)
    flat = {}
    for e in pairs.values():
        for m in (*PREP_MODES, "all"):
            for key in ("transferred_share", "text_share", "aligned_share", "kept_mass", "mass"):
                if e[m][key] is not None:
                    flat[f"prep/align/{key}/{m}/{e['source']}"] = e[m][key]
    run.summary.update(flat)
    where = run.dir
    run.finish()
    ctx.say(f"alignment statistics logged to W&B ({wandb_mode(ctx.cfg.wandb)})")
    return where
