"""Stage 4, teacher: each source teacher-forced on the ground truth (training mode) and the score
winner on its own response (inference mode); per response token its top-k next-token distribution.

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

The forward pass computes logits only at the positions that predict a response token (a boolean
`logits_to_keep` mask, so no [B, T, V] tensor for the prompt), then works through them
`prep.chunk_tokens` rows at a time in fp32: log-sum-exp, top-k, and the label's log-prob. Nothing
is cast to a half type before the top-k; log-probs are rounded to float16 only for storage.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from profuser.prep.stages import (Context, Progress, Stage, free_memory, model_deps, read_records, sidecar_info,
                                   up)

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("mode", pa.string()),  # "training" | "inference"
    pa.field("source", pa.string()),
    pa.field("response", pa.string()),
    pa.field("ce", pa.float64()),  # mean token CE over the response tokens (nats), template tail included
    pa.field("n_tokens", pa.int32()),  # R
    pa.field("text_nll", pa.float64()),  # NLL (nats) summed over the tokens that encode the response text
    pa.field("text_bytes", pa.int32()),  # UTF-8 bytes of the response text
    pa.field("text_tokens", pa.int32()),  # tokens counted in text_nll
    pa.field("token_ids", pa.list_(pa.int32())),  # [R] the source's response token ids, incl. end of turn
    pa.field("token_logprobs", pa.list_(pa.float16())),  # [R] log-prob of token_ids[r] (full vocab)
    pa.field("topk_ids", pa.list_(pa.list_(pa.int32()))),  # [R, k]
    pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16()))),  # [R, k], log-softmax over the full vocab
])
TEACHER_VERSION = 2  # bump when the rows change (2: text_nll/text_bytes/token_logprobs)


@dataclass
class TeacherOut:
    ce: float  # mean over the response tokens, nats
    topk_ids: np.ndarray  # [R, k] int32
    topk_logprobs: np.ndarray  # [R, k] float16
    nll: np.ndarray  # [R] float64: -log p(token r), computed in fp32


def response_logits(model, input_ids, attention_mask, keep):
    """Logits [N, V] (model dtype) at the N positions where `keep` [B, T] is True."""
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


def topk_from_logits(logits, labels, k: int, chunk: int):
    """fp32 per chunk of rows: (nll [N] fp32, topk ids [N, k] int32, topk log-probs [N, k] fp32)."""
    import torch

    nll, ids, lps = [], [], []
    for s in range(0, logits.shape[0], chunk):
        x = logits[s:s + chunk].float()
        lse = torch.logsumexp(x, dim=-1)
        v, i = x.topk(k, dim=-1)
        lps.append(v - lse[:, None])
        ids.append(i.to(torch.int32))
        nll.append(lse - x.gather(1, labels[s:s + chunk, None]).squeeze(1))
    cat = (lambda t: torch.cat(t).cpu()) if nll else (lambda t: torch.empty(0))
    return cat(nll), cat(ids), cat(lps)


def teacher_forward(model, seqs: list[list[int]], n_resp: list[int], k: int, chunk: int = 1024,
                    pad_id: int = 0) -> list[TeacherOut]:
    """Teacher-force a batch (right padding): for each sequence, its last n_resp tokens' mean CE and
    top-k log-probs. Position t predicts token t+1, so a sequence's final token is never an input."""
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
    with torch.no_grad():
        logits = response_logits(model, ids.to(device), mask.to(device), keep.to(device))
        nll, top_ids, top_lps = topk_from_logits(logits, torch.tensor(labels, device=device), k, chunk)
    out, at = [], 0
    nll64 = nll.double().numpy()
    for r in n_resp:
        out.append(TeacherOut(float(nll64[at:at + r].sum() / r) if r else float("nan"),
                              top_ids[at:at + r].numpy(), top_lps[at:at + r].numpy().astype(np.float16),
                              nll64[at:at + r]))
        at += r
    return out


def _nested(arrays: list[np.ndarray], dtype: pa.DataType, k: int) -> pa.Array:
    """[R_i, k] arrays -> list<list<dtype>> without Python-level lists."""
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    rows = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int32)
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, int(rows[-1]) * k + 1, k, dtype=np.int32)),
                                     pa.array(flat.astype(dtype.to_pandas_dtype()), type=dtype))
    return pa.ListArray.from_arrays(pa.array(rows), inner)


def rows_to_table(rows: list[dict], k: int) -> pa.Table:
    tok = [np.asarray(r["token_ids"], dtype=np.int32) for r in rows]
    tok_off = pa.array(np.concatenate([[0], np.cumsum([len(t) for t in tok])]).astype(np.int32))
    tlp = [np.asarray(r["token_logprobs"], dtype=np.float16) for r in rows]
    flat = lambda xs, dt: pa.array(np.concatenate(xs) if xs else np.zeros(0, dt))  # noqa: E731
    return pa.Table.from_arrays([
        pa.array([r["id"] for r in rows], pa.string()),
        pa.array([r["mode"] for r in rows], pa.string()),
        pa.array([r["source"] for r in rows], pa.string()),
        pa.array([r["response"] for r in rows], pa.string()),
        pa.array([r["ce"] for r in rows], pa.float64()),
        pa.array([len(t) for t in tok], pa.int32()),
        pa.array([r["text_nll"] for r in rows], pa.float64()),
        pa.array([r["text_bytes"] for r in rows], pa.int32()),
        pa.array([r["text_tokens"] for r in rows], pa.int32()),
        pa.ListArray.from_arrays(tok_off, flat(tok, np.int32)),
        pa.ListArray.from_arrays(tok_off, flat(tlp, np.float16)),
        _nested([r["topk_ids"] for r in rows], pa.int32(), k),
        _nested([r["topk_logprobs"] for r in rows], pa.float16(), k),
    ], schema=SCHEMA)


class TeacherStage(Stage):
    name = "teacher"
    needs = ("normalize", "score")

    def parts(self, cfg, plan):
        out = {}
        for m in cfg.sources:
            common = {"model": model_deps(m), "max_length": m.max_length or cfg.data.max_length,
                      "overlength": cfg.data.overlength, "topk": cfg.prep.topk, "version": TEACHER_VERSION}
            out[f"training/{m.name}"] = {"upstream": up(plan, "normalize"), **common}
            out[f"inference/{m.name}"] = {"upstream": {**up(plan, "normalize"), **up(plan, "score")}, **common}
        return out

    def group(self, part: str) -> str:
        return part.split("/", 1)[1]  # both modes of a source on one rank: one model load, row reuse

    # one source on a list of (record, response) ------------------------------------------
    def _compute(self, ctx: Context, cm, items: list[tuple[dict, str]], mode: str, bar: Progress):
        """Rows (in item order) and rejects; identical sequences are forwarded once."""
        from profuser.chat import OverLength, encode_chat

        cfg, src = ctx.cfg, cm.name
        max_len = cm.spec.max_length or cfg.data.max_length
        encoded, rejects = [], []
        for rec, resp in items:
            try:
                enc = encode_chat(cm.tokenizer, cm.template, rec["messages"], resp, max_len, cfg.data.overlength)
            except OverLength as e:
                rejects.append({"id": rec["id"], "mode": mode, "source": src, "kind": "over_length",
                                "reason": f"{src}: {e} (data.overlength={cfg.data.overlength})"})
                continue
            except Exception as e:  # noqa: BLE001 — a template that cannot render this response
                rejects.append({"id": rec["id"], "mode": mode, "source": src, "kind": "template_error",
                                "reason": f"{src}: {type(e).__name__}: {e}"})
                continue
            encoded.append((rec, resp, enc))
        unique = list(dict.fromkeys(tuple(e.input_ids) for _, _, e in encoded))
        n_resp = {u: len(u) - e.prompt_len for _, _, e in encoded for u in [tuple(e.input_ids)]}
        order = sorted(range(len(unique)), key=lambda j: (-len(unique[j]), j))  # similar lengths together
        results = {}
        pad = cm.tokenizer.pad_token_id or 0
        for s in range(0, len(order), cfg.prep.batch_size):
            batch = [unique[j] for j in order[s:s + cfg.prep.batch_size]]
            outs = teacher_forward(cm.model, [list(u) for u in batch], [n_resp[u] for u in batch], cfg.prep.topk,
                                   cfg.prep.chunk_tokens, pad)
            results.update(zip(batch, outs))
            bar.update(0, sum(n_resp[u] for u in batch))
        rows = []
        special = cm.tokenizer.all_special_ids
        for rec, resp, enc in encoded:
            o = results[tuple(enc.input_ids)]
            if not math.isfinite(o.ce) or np.isnan(o.topk_logprobs).any():
                what = f"CE is {o.ce}" if not math.isfinite(o.ce) else "NaN in the top-k log-probs"
                rejects.append({"id": rec["id"], "mode": mode, "source": src, "kind": "non_finite_ce",
                                "reason": f"{src} teacher-forced on the {mode} response: {what}"})
                continue
            text = np.asarray(enc.text_tokens(resp, special), dtype=bool)
            rows.append({"id": rec["id"], "mode": mode, "source": src, "response": resp, "ce": o.ce,
                         "text_nll": float(o.nll[text].sum()), "text_bytes": len(resp.encode("utf-8", "surrogatepass")),
                         "text_tokens": int(text.sum()), "token_ids": enc.input_ids[enc.prompt_len:],
                         "token_logprobs": (-o.nll).astype(np.float16), "topk_ids": o.topk_ids,
                         "topk_logprobs": o.topk_logprobs})
        return rows, rejects

    def run(self, ctx: Context, todo: dict[str, list[int]]) -> None:
        cfg, sd = ctx.cfg, ctx.stage_dir(self.name)
        k = cfg.prep.topk
        for spec in cfg.sources:
            src = spec.name
            tr, inf = todo.get(f"training/{src}", []), todo.get(f"inference/{src}", [])
            if not tr and not inf:
                continue
            cm = ctx.loader(spec)
            shards = sorted(set(tr) | set(inf))
            bar = Progress(ctx, sum(ctx.stage_dir("normalize").num_rows("records", i) for i in shards), f"teacher {src}")
            for i in shards:
                records = read_records(ctx, i)
                train_rows = None
                if i in tr:
                    t0 = time.time()
                    train_rows, rejects = self._compute(ctx, cm, [(r, r["reference"]) for r in records], "training", bar)
                    sd.commit(f"training/{src}", i, rows_to_table(train_rows, k),
                              sidecar_info(len(records), len(train_rows), rejects, time.time() - t0,
                                           sum(len(r["token_ids"]) for r in train_rows)))
                if i in inf:
                    t0 = time.time()
                    won = {r["id"] for r in ctx.stage_dir("score").read("scores", i, ["id", "winner"]).to_pylist()
                           if r["winner"] == src}
                    gens = {r["id"]: r["response"] for r in
                            ctx.stage_dir("generate").read(src, i, ["id", "response"]).to_pylist() if r["id"] in won}
                    items = [(r, gens[r["id"]]) for r in records if r["id"] in won]
                    same = {r["id"] for r, resp in items if resp == r["reference"]}
                    if same and train_rows is None:  # training shard finished in an earlier run
                        train_rows = sd.read(f"training/{src}", i).to_pylist()
                    reuse = {r["id"]: {**r, "mode": "inference"} for r in (train_rows or []) if r["id"] in same}
                    rows, rejects = self._compute(ctx, cm, [it for it in items if it[0]["id"] not in reuse],
                                                  "inference", bar)
                    by_id = {**{r["id"]: r for r in rows}, **reuse}
                    rows = [by_id[r["id"]] for r, _ in items if r["id"] in by_id]  # record order
                    sd.commit(f"inference/{src}", i, rows_to_table([_as_arrays(r, k) for r in rows], k),
                              sidecar_info(len(items), len(rows), rejects, time.time() - t0,
                                           sum(len(r["token_ids"]) for r in rows), reused=len(reuse)))
                bar.update(len(records), 0)
            bar.close()
            del cm
            free_memory()

    def finalize(self, ctx, sd, parts, rejects):
        """Per-source summary lines: mean bits per byte and nats per token on the ground truth."""
        import pyarrow.compute as pc

        n = ctx.stage_dir("normalize").manifest()["n_shards"]
        for m in ctx.cfg.sources:
            tables = [sd.read(f"training/{m.name}", i, ["ce", "text_nll", "text_bytes"]) for i in range(n)]
            table = pa.concat_tables(tables) if tables else None
            if table is None or table.num_rows == 0:
                continue
            nll, nb = pc.sum(table["text_nll"]).as_py(), pc.sum(table["text_bytes"]).as_py()
            ctx.say(f"teacher: {m.name} on the ground truths: {nll / (math.log(2) * nb):.3f} bits per byte of "
                    f"response text, {pc.mean(table['ce']).as_py():.3f} nats per own token (mean over "
                    f"{table.num_rows} responses)")
        return {}


def _as_arrays(row: dict, k: int) -> dict:
    """A row read back from Parquet (nested lists) in the in-memory form rows_to_table takes."""
    if isinstance(row["topk_ids"], np.ndarray):
        return row
    return {**row, "topk_ids": np.asarray(row["topk_ids"], dtype=np.int32).reshape(-1, k),
            "topk_logprobs": np.asarray(row["topk_logprobs"], dtype=np.float16).reshape(-1, k),
            "token_logprobs": np.asarray(row["token_logprobs"], dtype=np.float16)}
