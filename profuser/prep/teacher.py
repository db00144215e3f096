"""Stage 4, teacher: each source teacher-forced on the ground truth (training mode) and the score
winner on its own response (inference mode); per response token its top-k next-token distribution.
It must never materialize a batch's [N, V] logits, nor cast logits to a half type before the top-k.

Parts: `training/<source>` holds every source's rows on the reference, so the align stage can rank
them by MinCE (profuser.selection) and the winner's distributions need no second pass;
`inference/<source>` holds the rows of the prompts that source won in the score stage. A winner whose
response equals the reference reuses its training row, and identical sequences inside a shard are
computed once.

Rows follow docs/ARCHITECTURE.md, "Stage contracts" (label-aligned: row r of topk_* is the distribution over
token_ids[r]). Besides the top-k, each row keeps what MinCE compares: `ce` (nats per own response
token, end of turn included: the paper's rule) and `text_nll`/`text_bytes` (NLL of only the tokens
that encode the response text, and its UTF-8 bytes: bits per byte, comparable across tokenizers),
and `token_logprobs`, the log-prob of every response token (the chain rule of profuser.transfer).
With `prep.lookahead.enabled`, a source whose tokenizer is not the target's also gets its word
outcomes at every response word start (profuser.lookahead.word_starts and word_outcomes:
`lookahead_rows`, `lookahead_texts`, `lookahead_logprobs`; null otherwise).

How it runs at the hardware's speed:
- The sequences of a shard (both modes) are sorted by length and grouped by a token budget
  (`plan_batches`: sequences x longest <= prep.batch_tokens, at most prep.batch_size, padding at
  most a tenth of the real tokens); results go back to record order.
- The model body runs once per batch; the vocabulary projection (lm_head) is applied only to the
  positions that predict a response token, `prep.chunk_tokens` of them at a time, each chunk cast to
  fp32 for the log-sum-exp, the top-k and the label's log-prob. No [N, V] logits tensor exists for
  a batch (a 262k vocabulary fits); nothing is cast to a half type before the top-k; log-probs are
  rounded to float16 only for storage. A model whose head cannot be split off this way (checked once
  against its own forward) uses its forward with a `logits_to_keep` mask instead.
- On a GPU, batch b+1 is queued before batch b's results are copied back (pinned memory, async),
  the next shard is read and chat-encoded by a helper thread, and Arrow conversion and Parquet
  writes happen on a writer thread: the GPU does not wait for the CPU side.
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from profuser.constants import PREP_MODES
from profuser.lookahead import COST_KEYS, OUTCOMES_VERSION, tree_note
from profuser.models import split_head
from profuser.prep.formats import teacher_table
from profuser.prep.stages import (Context, Progress, Stage, free_memory, model_deps, read_records, sidecar_info,
                                   upstream_hashes)

log = logging.getLogger("profuser")

TEACHER_VERSION = 3  # bump when the rows change (2: text_nll/text_bytes/token_logprobs; 3: lookahead_*)


@dataclass
class TeacherOut:
    ce: float  # mean over the response tokens, nats
    topk_ids: np.ndarray  # [R, k] int32
    topk_logprobs: np.ndarray  # [R, k] float16
    nll: np.ndarray  # [R] float64: -log p(token r), computed in fp32


# --------------------------------------------------------------------------------------------
# batching


MAX_PADDING = 0.1  # a batch stops growing when its padding would exceed this share of its real tokens


def plan_batches(lengths: list[int], batch_tokens: int, max_seqs: int) -> list[list[int]]:
    """Indices of `lengths` grouped into batches, longest first (ties in index order). A batch takes
    the next sequence while its padded size (sequences x its longest) stays within batch_tokens, it
    has fewer than max_seqs sequences, and its padding stays within MAX_PADDING of its real tokens;
    a sequence longer than the budget goes alone. At scale the budget decides (sorted neighbours have
    nearly equal lengths); with few, unequal sequences the padding rule splits them instead."""
    order = sorted(range(len(lengths)), key=lambda j: (-lengths[j], j))
    out: list[list[int]] = []
    real = 0
    for j in order:
        b = out[-1] if out else None
        if b is not None and len(b) < max_seqs:
            padded = (len(b) + 1) * lengths[b[0]]
            if padded <= batch_tokens and padded - (real + lengths[j]) <= MAX_PADDING * (real + lengths[j]):
                b.append(j)
                real += lengths[j]
                continue
        out.append([j])
        real = lengths[j]
    return out


# --------------------------------------------------------------------------------------------
# the forward pass: body once, vocabulary projection per chunk of response positions


def response_logits(model, input_ids, attention_mask, keep):
    """Logits [N, V] (model dtype) at the N positions where `keep` [B, T] is True (the fallback when
    the head cannot be split off)."""
    if getattr(model, "_profuser_mask_logits", True):
        try:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                           use_cache=False).logits
            if logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
                return logits
            if logits.dim() == 3 and logits.shape[:2] == keep.shape:  # the model ignored the mask
                model._profuser_mask_logits = False
                return logits[keep]
        except (TypeError, ValueError, IndexError, RuntimeError) as e:
            import torch

            if isinstance(e, torch.OutOfMemoryError):
                raise
        model._profuser_mask_logits = False  # this architecture cannot slice by mask: full logits
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[keep]


def _topk_chunks(rows, n: int, labels, k: int, chunk: int):
    """fp32 per chunk of `chunk` rows, where rows(s, e) gives the logits of rows s..e-1 in any dtype:
    (nll [n], topk ids [n, k] int32, topk log-probs [n, k]) on the logits' device."""
    import torch

    nll, ids, lps = [], [], []
    for s in range(0, n, chunk):
        x = rows(s, min(s + chunk, n)).float()
        lse = torch.logsumexp(x, dim=-1)
        v, i = x.topk(k, dim=-1)
        lps.append(v - lse[:, None])
        ids.append(i.to(torch.int32))
        nll.append(lse - x.gather(1, labels[s:s + chunk, None]).squeeze(1))
        del x
    if not nll:
        return torch.empty(0), torch.empty((0, k), dtype=torch.int32), torch.empty((0, k))
    return torch.cat(nll), torch.cat(ids), torch.cat(lps)


def topk_from_logits(logits, labels, k: int, chunk: int):
    """fp32 per chunk of rows: (nll [N] fp32, topk ids [N, k] int32, topk log-probs [N, k] fp32), on CPU."""
    nll, ids, lps = _topk_chunks(lambda s, e: logits[s:e], logits.shape[0], labels, k, chunk)
    return nll.cpu(), ids.cpu(), lps.cpu()


class _Launched:
    """One batch's results on its device, on their way to the host (pinned memory, async on CUDA)."""

    def __init__(self, idx: list[int], n_resp: list[int], tensors):
        import torch

        self.idx, self.n_resp = idx, n_resp
        self.event = None
        if tensors[0].device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors):
                h.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            tensors = host
        self.tensors = tensors

    def collect(self) -> list[TeacherOut]:
        if self.event is not None:
            self.event.synchronize()
        nll, ids, lps = (t.numpy() for t in self.tensors)
        nll64 = nll.astype(np.float64)
        out, start = [], 0
        for r in self.n_resp:
            out.append(TeacherOut(float(nll64[start:start + r].sum() / r) if r else float("nan"), ids[start:start + r],
                                  lps[start:start + r].astype(np.float16), nll64[start:start + r]))
            start += r
        return out


def _launch(model, head, seqs: list[list[int]], n_resp: list[int], k: int, chunk: int, pad_id: int,
            idx: list[int]) -> _Launched:
    """Queue one batch (right padding): for each sequence, its last n_resp tokens' NLL and top-k
    log-probs. Position t predicts token t+1, so a sequence's final token is never an input."""
    import torch

    device = next(model.parameters()).device
    width = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    keep = torch.zeros((len(seqs), width), dtype=torch.bool)
    labels = []
    for b, (s, r) in enumerate(zip(seqs, n_resp)):
        n = len(s) - 1
        ids[b, :n] = torch.tensor(s[:-1])
        mask[b, :n] = 1
        keep[b, n - r:n] = True
        labels += s[len(s) - r:]
    cuda = device.type == "cuda"
    rows = keep.view(-1).nonzero().squeeze(1)  # flat positions, found on the host: no device sync
    ids, mask, keep, rows = (t.pin_memory().to(device, non_blocking=True) if cuda else t
                             for t in (ids, mask, keep, rows))
    labels = torch.tensor(labels, dtype=torch.long).to(device, non_blocking=cuda)
    with torch.no_grad():
        if head is not None:
            body, project = head
            hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # [N, H]
            res = _topk_chunks(lambda s, e: project(hidden[s:e]), hidden.shape[0], labels, k, chunk)
            del hidden
        else:
            logits = response_logits(model, ids, mask, keep)
            res = _topk_chunks(lambda s, e: logits[s:e], logits.shape[0], labels, k, chunk)
            del logits
    return _Launched(idx, n_resp, res)


def forward_batches(model, seqs: list[list[int]], n_resp: list[int], batches: list[list[int]], k: int,
                    chunk: int = 1024, pad_id: int = 0) -> Iterator[tuple[list[int], list[TeacherOut]]]:
    """(indices, outputs) per batch of `batches` (indices into seqs), in that order. Batch b+1 is
    queued on the device before batch b's results are read on the host."""
    if not batches:
        return
    head = split_head(model, seqs[batches[0][0]])
    pending: Optional[_Launched] = None
    for idx in batches:
        nxt = _launch(model, head, [seqs[j] for j in idx], [n_resp[j] for j in idx], k, chunk, pad_id, idx)
        if pending is not None:
            yield pending.idx, pending.collect()
        pending = nxt
    yield pending.idx, pending.collect()


def teacher_forward(model, seqs: list[list[int]], n_resp: list[int], k: int, chunk: int = 1024,
                    pad_id: int = 0) -> list[TeacherOut]:
    """Teacher-force one batch: for each sequence, its last n_resp tokens' mean CE and top-k log-probs."""
    ((_, out),) = forward_batches(model, seqs, n_resp, [list(range(len(seqs)))], k, chunk, pad_id)
    return out


def lookahead_outcomes(chat_model, enc, text, prep, cost: Optional[dict] = None, tree: Optional[bool] = None):
    """The teacher stage's word lookahead on one rendering `enc` (profuser.chat.Encoded) of a
    response: profuser.lookahead.word_outcomes at its word starts (`text`: the response tokens that
    encode response text), with prep.topk, prep.lookahead's beam, prep.batch_tokens and the source's
    end of turn (profuser.chat.end_of_turn_id, an outcome of its own). `cost`, `tree`: as
    word_outcomes takes them."""
    from profuser.chat import end_of_turn_id
    from profuser.lookahead import word_classes, word_outcomes, word_starts

    tok, la, P = chat_model.tokenizer, prep.lookahead, enc.prompt_len
    classes = word_classes(tok)
    starts = word_starts(enc.input_ids[P:], text, classes)
    return word_outcomes(chat_model.model, list(enc.input_ids), P, starts, classes, prep.topk, la.branch, la.beam,
                         la.steps, la.min_prob, tok.pad_token_id or 0, prep.batch_tokens, cost=cost, tree=tree,
                         eot=end_of_turn_id(tok, chat_model.template))


@dataclass
class _Item:
    """One (record, response) of one mode, encoded for this source."""

    rec: dict
    mode: str
    response: str
    enc: object  # profuser.chat.Encoded
    text: np.ndarray  # [R] bool: the token encodes response text (text_nll)


@dataclass
class _ShardJob:
    """A shard's CPU-side preparation (read and chat-encoded by the helper thread)."""

    i: int
    records: list
    items: dict = field(default_factory=dict)  # mode -> [_Item] in record order
    rejects: dict = field(default_factory=dict)  # mode -> [reject line]
    n_in: dict = field(default_factory=dict)  # mode -> records considered
    reused: dict = field(default_factory=dict)  # id -> training row read back from an earlier run


class TeacherStage(Stage):
    name = "teacher"
    needs = ("normalize", "score")

    def parts(self, cfg, plan):
        out = {}
        for m in cfg.sources:
            common = {"model": model_deps(m), "max_length": m.max_length or cfg.data.max_length,
                      "overlength": cfg.data.overlength, "topk": cfg.prep.topk, "version": TEACHER_VERSION}
            if cfg.prep.lookahead.enabled:  # which sources need it depends on the target's tokenizer
                common["lookahead"] = {**cfg.prep.lookahead.model_dump(), "target": model_deps(cfg.target),
                                       "version": OUTCOMES_VERSION}
            out[f"training/{m.name}"] = {"upstream": upstream_hashes(plan, "normalize"), **common}
            out[f"inference/{m.name}"] = {"upstream": upstream_hashes(plan, "normalize", "score"), **common}
        return out

    def group(self, part: str) -> str:
        return part.split("/", 1)[1]  # both modes of a source on one rank: one model load, row reuse

    # CPU side of one shard (helper thread) ------------------------------------------------
    def _encode(self, ctx: Context, chat_model, items: list[tuple[dict, str]], mode: str, cache: dict
                ) -> tuple[list[_Item], list[dict]]:
        from profuser.chat import OverLength, encode_chat

        cfg, src = ctx.cfg, chat_model.name
        max_len = chat_model.spec.max_length or cfg.data.max_length
        special = chat_model.tokenizer.all_special_ids
        out, rejects = [], []
        for rec, resp in items:
            key = (rec["id"], resp)
            if key not in cache:
                try:
                    enc = encode_chat(chat_model.tokenizer, chat_model.template, rec["messages"], resp, max_len,
                                      cfg.data.overlength)
                    cache[key] = (enc, enc.text_tokens(resp, special))
                except OverLength as e:
                    cache[key] = ("over_length", f"{src}: {e} (data.overlength={cfg.data.overlength})")
                except Exception as e:  # noqa: BLE001 — a template that cannot render this response
                    cache[key] = ("template_error", f"{src}: {type(e).__name__}: {e}")
            enc, extra = cache[key]
            if isinstance(enc, str):
                rejects.append({"id": rec["id"], "mode": mode, "source": src, "kind": enc, "reason": extra})
                continue
            out.append(_Item(rec, mode, resp, enc, extra))
        return out, rejects

    def _prepare(self, ctx: Context, chat_model, i: int, training: bool, inference: bool) -> _ShardJob:
        src, stage_dir = chat_model.name, ctx.stage_dir(self.name)
        job = _ShardJob(i, read_records(ctx, i))
        cache: dict = {}
        if training:
            job.n_in["training"] = len(job.records)
            job.items["training"], job.rejects["training"] = self._encode(
                ctx, chat_model, [(r, r["reference"]) for r in job.records], "training", cache)
        if inference:
            won = {r["id"] for r in ctx.stage_dir("score").read("scores", i, ["id", "winner"]).to_pylist()
                   if r["winner"] == src}
            gens = {r["id"]: r["response"] for r in
                    ctx.stage_dir("generate").read(src, i, ["id", "response"]).to_pylist() if r["id"] in won}
            items = [(r, gens[r["id"]]) for r in job.records if r["id"] in won]
            job.n_in["inference"] = len(items)
            same = {r["id"] for r, resp in items if resp == r["reference"]}
            if same and not training:  # the training shard was finished in an earlier run: reuse its rows
                job.reused = {r["id"]: r for r in stage_dir.read(f"training/{src}", i).to_pylist() if r["id"] in same}
            job.items["inference"], job.rejects["inference"] = self._encode(
                ctx, chat_model, [it for it in items if it[0]["id"] not in job.reused], "inference", cache)
        return job

    # device side of one shard (main thread) -----------------------------------------------
    def _forward(self, ctx: Context, chat_model, job: _ShardJob, bar: Progress) -> tuple[dict, dict]:
        """Every unique sequence of the shard (both modes) forwarded once, length-sorted batches.
        Returns ({sequence: TeacherOut}, {mode: tokens forwarded for sequences it needed first})."""
        cfg = ctx.cfg
        seqs: dict = {}
        first: dict = {}
        for mode, items in job.items.items():
            for it in items:
                u = tuple(it.enc.input_ids)
                if u not in seqs:
                    seqs[u] = len(u) - it.enc.prompt_len
                    first[u] = mode
        unique = list(seqs)
        batches = plan_batches([len(u) - 1 for u in unique], cfg.prep.batch_tokens, cfg.prep.batch_size)
        results = {}
        pad = chat_model.tokenizer.pad_token_id or 0
        for idx, outs in forward_batches(chat_model.model, [list(u) for u in unique], [seqs[u] for u in unique], batches,
                                         cfg.prep.topk, cfg.prep.chunk_tokens, pad):
            for j, o in zip(idx, outs):
                results[unique[j]] = o
            bar.update(0, sum(len(unique[j]) - 1 for j in idx))
        forwarded = {m: 0 for m in job.items}
        for u in unique:
            forwarded[first[u]] += len(u) - 1
        return results, forwarded

    def _lookahead(self, ctx: Context, chat_model, job: _ShardJob, bar: Progress) -> tuple[dict, dict]:
        """Word outcomes of every unique sequence of the shard ({sequence: Outcomes}) and their cost
        (the bar's postfix counts the sequences done: this is the long part of the shard)."""
        out: dict = {}
        cost: dict = {}
        t0 = time.time()
        n = len({tuple(it.enc.input_ids) for items in job.items.values() for it in items})
        for items in job.items.values():
            for it in items:
                u = tuple(it.enc.input_ids)
                if u in out:
                    continue
                bar.bar.set_postfix_str(f"shard {job.i}: word lookahead {len(out)}/{n} sequences", refresh=True)
                out[u] = lookahead_outcomes(chat_model, it.enc, it.text, ctx.cfg.prep, cost)
        cost["seconds"] = round(time.time() - t0, 3)
        return out, cost

    def _rows(self, chat_model, items: list[_Item], results: dict, rejects: list[dict],
              outcomes: Optional[dict] = None) -> list[dict]:
        rows = []
        for it in items:
            o = results[tuple(it.enc.input_ids)]
            oc = (outcomes or {}).get(tuple(it.enc.input_ids))
            if not math.isfinite(o.ce) or np.isnan(o.topk_logprobs).any():
                what = f"CE is {o.ce}" if not math.isfinite(o.ce) else "NaN in the top-k log-probs"
                rejects.append({"id": it.rec["id"], "mode": it.mode, "source": chat_model.name, "kind": "non_finite_ce",
                                "reason": f"{chat_model.name} teacher-forced on the {it.mode} response: {what}"})
                continue
            rows.append({"id": it.rec["id"], "mode": it.mode, "source": chat_model.name, "response": it.response,
                         "ce": o.ce, "text_nll": float(o.nll[it.text].sum()),
                         "text_bytes": len(it.response.encode("utf-8", "surrogatepass")),
                         "text_tokens": int(it.text.sum()), "token_ids": it.enc.input_ids[it.enc.prompt_len:],
                         "token_logprobs": (-o.nll).astype(np.float16), "topk_ids": o.topk_ids,
                         "topk_logprobs": o.topk_logprobs,
                         "lookahead_rows": None if oc is None else np.asarray(oc.rows, dtype=np.int32),
                         "lookahead_texts": None if oc is None else oc.texts,
                         "lookahead_logprobs": None if oc is None else np.asarray(oc.logprobs, dtype=np.float32)})
        return rows

    def _shard(self, ctx: Context, chat_model, job: _ShardJob, bar: Progress, write, lookahead: bool = False) -> None:
        src, k = chat_model.name, ctx.cfg.prep.topk
        t0 = time.time()
        results, forwarded = self._forward(ctx, chat_model, job, bar)
        outcomes, la_cost = self._lookahead(ctx, chat_model, job, bar) if lookahead else (None, None)
        seconds = time.time() - t0
        total = sum(forwarded.values())
        share = {m: seconds * (f / total if total else 1 / len(forwarded)) for m, f in forwarded.items()}
        train_rows = None
        if "training" in job.items:
            rejects = job.rejects["training"]
            train_rows = self._rows(chat_model, job.items["training"], results, rejects, outcomes)
            write(f"training/{src}", job.i, train_rows, k,
                  sidecar_info(job.n_in["training"], len(train_rows), rejects, share["training"],
                               sum(len(r["token_ids"]) for r in train_rows),
                               forward_tokens=forwarded["training"], lookahead=la_cost,
                               tok_per_s=round(total / max(seconds, 1e-9), 1)))
        if "inference" in job.items:
            rejects = job.rejects["inference"]
            rows = self._rows(chat_model, job.items["inference"], results, rejects, outcomes)
            by_id = {r["id"]: r for r in rows}
            by_id.update({i: {**r, "mode": "inference"} for i, r in job.reused.items()})
            reused = len(job.reused)
            if train_rows is not None:  # a response equal to the reference is the training sequence, forwarded once
                done = {r["id"] for r in train_rows}
                reused += sum(it.response == it.rec["reference"] and it.rec["id"] in done
                              for it in job.items["inference"])
            rows = [by_id[r["id"]] for r in job.records if r["id"] in by_id]  # record order
            write(f"inference/{src}", job.i, [_as_arrays(r, k) for r in rows], k,
                  sidecar_info(job.n_in["inference"], len(rows), rejects, share["inference"],
                               sum(len(r["token_ids"]) for r in rows), reused=reused,
                               forward_tokens=forwarded["inference"],
                               tok_per_s=round(total / max(seconds, 1e-9), 1)))
        bar.update(len(job.records), 0)

    def _wants_lookahead(self, ctx: Context, chat_model) -> bool:
        """prep.lookahead runs for a source whose tokenizer is not the target's (the align stage copies or
        projects identical vocabularies as they are) and when both give offsets (MinED pairs 1:1 only)."""
        from profuser.align import same_tokenizer
        from profuser.models import has_offsets, load_chat_tokenizer

        if getattr(self, "_target_tok", None) is None:
            self._target_tok = load_chat_tokenizer(ctx.cfg.target).tokenizer
        tgt, src = self._target_tok, chat_model.tokenizer
        why = ("same tokenizer as the target" if same_tokenizer(src, tgt) else
               None if has_offsets(src) and has_offsets(tgt) else "a tokenizer without offsets")
        if not ctx.cfg.prep.lookahead.enabled:
            if why is None:  # it would run: say what it would give
                ctx.say(f"teacher: {chat_model.name}: word lookahead off (prep.lookahead.enabled is false); its "
                        "tokenizer is not the target's, so prep.lookahead.enabled=true would teach the target whole "
                        "words where the rule maps first pieces (README, 'Whole words': its gain and its cost)")
            return False
        on = "on" + tree_note(chat_model.model)
        ctx.say(f"teacher: {chat_model.name}: word lookahead " + (f"off ({why})" if why else on))
        return why is None

    def run(self, ctx: Context, todo: dict[str, list[int]]) -> None:
        stage_dir = ctx.stage_dir(self.name)
        writer = ThreadPoolExecutor(1, thread_name_prefix="teacher-write")  # Arrow + Parquet off the compute thread
        reader = ThreadPoolExecutor(1, thread_name_prefix="teacher-read")  # the next shard's reading and encoding
        writes: list[Future] = []  # in submission order, which is the (single) writer's completion order

        def drain(limit: int) -> None:
            """Wait until at most `limit` writes are pending; a failed write raises here."""
            while writes and (writes[0].done() or len(writes) > limit):
                writes.pop(0).result()

        def write(part: str, i: int, rows: list[dict], k: int, info: dict) -> None:
            writes.append(writer.submit(lambda: stage_dir.commit(part, i, teacher_table(rows), info)))
            drain(2)  # bounds the rows held in memory

        try:
            for spec in ctx.cfg.sources:
                src = spec.name
                tr, inf = set(todo.get(f"training/{src}", [])), set(todo.get(f"inference/{src}", []))
                if not tr and not inf:
                    continue
                chat_model = ctx.loader(spec)
                lookahead = self._wants_lookahead(ctx, chat_model)
                shards = sorted(tr | inf)
                bar = Progress(ctx, sum(ctx.stage_dir("normalize").num_rows("records", i) for i in shards),
                               f"teacher {src}")
                nxt = reader.submit(self._prepare, ctx, chat_model, shards[0], shards[0] in tr, shards[0] in inf)
                for n, i in enumerate(shards):
                    job = nxt.result()
                    if n + 1 < len(shards):
                        j = shards[n + 1]
                        nxt = reader.submit(self._prepare, ctx, chat_model, j, j in tr, j in inf)
                    self._shard(ctx, chat_model, job, bar, write, lookahead)
                bar.close()
                drain(0)
                del chat_model, job, nxt
                free_memory()
        finally:
            reader.shutdown(wait=True)
            writer.shutdown(wait=True)
        drain(0)

    def finalize(self, ctx, stage_dir, parts, rejects):
        """Per-source summary lines: mean bits per byte and nats per token on the ground truth, and
        the forward throughput per part."""
        import pyarrow.compute as pc

        n = ctx.stage_dir("normalize").manifest()["n_shards"]
        for m in ctx.cfg.sources:
            tables = [stage_dir.read(f"training/{m.name}", i, ["ce", "text_nll", "text_bytes"]) for i in range(n)]
            table = pa.concat_tables(tables) if tables else None
            if table is None or table.num_rows == 0:
                continue
            nll, nb = pc.sum(table["text_nll"]).as_py(), pc.sum(table["text_bytes"]).as_py()
            ctx.say(f"teacher: {m.name} on the ground truths: {nll / (math.log(2) * nb):.3f} bits per byte of "
                    f"response text, {pc.mean(table['ce']).as_py():.3f} nats per own token (mean over "
                    f"{table.num_rows} responses)")
        speed = {}
        for part, v in parts.items():
            fwd = sum(stage_dir.sidecar(part, i).get("forward_tokens", 0) for i in range(n))
            speed[part] = {"forward_tokens": fwd, "response_tokens": v.get("tokens", 0), "seconds": v.get("seconds", 0),
                           "tok_per_s": round(fwd / v["seconds"], 1) if v.get("seconds") else None}
        lookahead: dict = {}
        for m in ctx.cfg.sources:
            la = [stage_dir.sidecar(f"training/{m.name}", i).get("lookahead") for i in range(n)]
            la = [c for c in la if c]
            if la:
                tot = {key: sum(c.get(key, 0) for c in la) for key in COST_KEYS + ("seconds",)}
                lookahead[m.name] = tot
                ws = max(tot["word_starts"], 1)
                slow = tot["sequences"] - tot["tree_sequences"]
                ctx.say(f"teacher: {m.name}: word lookahead at {tot['word_starts']:,} word starts: "
                        f"{tot['outcomes'] / ws:.1f} outcomes, {tot['beam_tokens'] / ws:.1f} beam tokens and "
                        f"{tot['prefill_tokens'] / ws:.1f} context tokens per word start ({tot['seconds']:.1f}s)"
                        + (f"; {slow:,} of {tot['sequences']:,} sequences prefilled every word start's context "
                           "(no token tree on this model there: see the 'word lookahead on' line)" if slow else ""))
        for m in ctx.cfg.sources:
            ps = [speed.get(f"{mode}/{m.name}", {}) for mode in PREP_MODES]
            fwd, sec = sum(p.get("forward_tokens", 0) for p in ps), sum(p.get("seconds", 0) for p in ps)
            if sec:
                ctx.say(f"teacher: {m.name}: {fwd / sec:,.0f} tok/s forwarded ({fwd:,} tokens in {sec:.1f}s)")
        return {"throughput": speed, "lookahead": lookahead}


def _as_arrays(row: dict, k: int) -> dict:
    """A row read back from Parquet (nested lists) in the in-memory form teacher_table takes."""
    if isinstance(row["topk_ids"], np.ndarray):
        return row
    return {**row, "topk_ids": np.asarray(row["topk_ids"], dtype=np.int32).reshape(-1, k),
            "topk_logprobs": np.asarray(row["topk_logprobs"], dtype=np.float16).reshape(-1, k),
            "token_logprobs": np.asarray(row["token_logprobs"], dtype=np.float16)}
