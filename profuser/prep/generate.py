"""Stage 2, generate: every source answers every prompt with its own chat template.

Batched, left-padded, greedy or seeded sampling; generation stops at the template's end-of-turn
token (or the model's EOS) or after `max_new_tokens`. Each row records the response text, how many
tokens it took and why it ended ("stop" or "length"); an empty response is rejected. Sampling seeds
derive from (seed, source, shard, batch), and batches are formed inside a shard, so the output does
not depend on how many processes ran. Backend `hf` runs everywhere; `vllm` is imported only when
chosen.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import pyarrow as pa

from profuser.prep.stages import Context, Progress, Stage, free_memory, model_deps, read_records, sidecar_info, up

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("response", pa.string()),
    pa.field("n_tokens", pa.int32()),  # generated tokens, not counting the stop token
    pa.field("finish_reason", pa.string()),  # "stop" (end of turn / EOS) or "length" (max_new_tokens)
])


def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens before the stop token
    finish_reason: str


def stop_ids(cm) -> list[int]:
    """End-of-turn of the template first, then the tokenizer's and the model's EOS ids."""
    from profuser.chat import end_of_turn_id

    ids = [end_of_turn_id(cm.tokenizer, cm.template), cm.tokenizer.eos_token_id]
    gc = getattr(cm.model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids += eos if isinstance(eos, list) else [eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _cut(tokens: list[int], stop: set[int]) -> Generation:
    for t, x in enumerate(tokens):
        if x in stop:
            return Generation(tokens[:t], "stop")
    return Generation(tokens, "length")


class HFGenerator:
    """transformers `generate`, batched with left padding."""

    def __init__(self, cm, gcfg):
        self.model, self.tok, self.g = cm.model, cm.tokenizer, gcfg
        self.stop = stop_ids(cm)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.stop[0]

    def _kwargs(self) -> dict:
        g = self.g
        kw = dict(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, eos_token_id=self.stop, pad_token_id=self.pad)
        if g.do_sample:  # set explicitly: unset values would be filled from the model's and global defaults
            kw.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        return kw

    def generate(self, prompts: list[list[int]], seed: int, on_batch=None) -> list[Generation]:
        import torch

        device = next(self.model.parameters()).device
        order = sorted(range(len(prompts)), key=lambda j: (len(prompts[j]), j))  # similar lengths share a batch
        out: list = [None] * len(prompts)
        stop = set(self.stop)
        for b, start in enumerate(range(0, len(order), self.g.batch_size)):
            idx = order[start:start + self.g.batch_size]
            width = max(len(prompts[j]) for j in idx)
            ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, j in enumerate(idx):
                ids[r, width - len(prompts[j]):] = torch.tensor(prompts[j])
                mask[r, width - len(prompts[j]):] = 1
            torch.manual_seed(seed + b)
            with torch.no_grad():
                seqs = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **self._kwargs())
            new = seqs[:, width:].tolist()
            for r, j in enumerate(idx):
                out[j] = _cut(new[r], stop)
            if on_batch:
                on_batch(len(idx), sum(len(out[j].token_ids) for j in idx))
        return out


class VLLMGenerator:
    """vLLM offline engine (GPU). One engine per process, pinned to this rank's local GPU."""

    def __init__(self, spec, cm, gcfg, local_rank: int, world: int):
        if world > 1 and "CUDA_VISIBLE_DEVICES" in os.environ:
            visible = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[local_rank % len(visible)]
        from vllm import LLM  # noqa: imported only for this backend

        from profuser.models import check_no_pickle

        check_no_pickle(spec.path, spec.allow_pickle, spec.name)
        dtype = "auto" if spec.dtype == "auto" else spec.dtype
        self.llm = LLM(model=spec.path, tokenizer=spec.tokenizer or None, dtype=dtype,
                       trust_remote_code=spec.trust_remote_code,
                       load_format="auto" if spec.allow_pickle else "safetensors")
        self.g, self.stop = gcfg, stop_ids(cm)

    def generate(self, prompts: list[list[int]], seed: int, on_batch=None) -> list[Generation]:
        from vllm import SamplingParams

        g = self.g
        params = [SamplingParams(max_tokens=g.max_new_tokens, temperature=g.temperature if g.do_sample else 0.0,
                                 top_p=g.top_p if g.do_sample else 1.0, top_k=g.top_k if g.do_sample and g.top_k else -1,
                                 seed=seed + j, stop_token_ids=self.stop) for j in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        stop = set(self.stop)
        res = [_cut(list(o.outputs[0].token_ids), stop) for o in outs]
        if on_batch:
            on_batch(len(res), sum(len(r.token_ids) for r in res))
        return res


def prompt_ids(cm, messages: list[dict], max_length: int) -> tuple[list[int], int]:
    """The generation prompt's token ids, cut from the left to leave room for at least one new token."""
    from profuser.chat import render

    text = render(cm.tokenizer, cm.template, messages, add_generation_prompt=True)
    ids = cm.tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = max(0, len(ids) - (max_length - 1))
    return ids[cut:], cut


class GenerateStage(Stage):
    name = "generate"
    needs = ("normalize",)

    def parts(self, cfg, plan):
        from dataclasses import asdict

        g = asdict(cfg.prep.generate)
        g.pop("batch_size")  # changes speed, not results (beyond float noise)
        return {m.name: {"upstream": up(plan, "normalize"), "model": model_deps(m),
                         "max_length": m.max_length or cfg.data.max_length, "generate": g, "seed": cfg.seed}
                for m in cfg.sources}

    def run(self, ctx: Context, todo: dict[str, list[int]]) -> None:
        cfg, sd = ctx.cfg, ctx.stage_dir(self.name)
        for spec in cfg.sources:
            shards = todo.get(spec.name)
            if not shards:
                continue
            if cfg.prep.generate.backend == "vllm":
                from profuser.models import load_chat_tokenizer

                cm = load_chat_tokenizer(spec)
                gen = VLLMGenerator(spec, cm, cfg.prep.generate, ctx.dist.local_rank, ctx.dist.world)
            else:
                cm = ctx.loader(spec)
                gen = HFGenerator(cm, cfg.prep.generate)
            max_len = spec.max_length or cfg.data.max_length
            n_rec = sum(ctx.stage_dir("normalize").num_rows("records", i) for i in shards)
            bar = Progress(ctx, n_rec, f"generate {spec.name}")
            for i in shards:
                t0 = time.time()
                records = read_records(ctx, i)
                prompts, truncated = [], 0
                for rec in records:
                    ids, cut = prompt_ids(cm, rec["messages"], max_len)
                    prompts.append(ids)
                    truncated += cut > 0
                gens = gen.generate(prompts, derive_seed(cfg.seed, spec.name, i), on_batch=bar.update)
                rows, rejects = [], []
                for rec, g in zip(records, gens):
                    text = cm.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
                    if not text:
                        rejects.append({"id": rec["id"], "source": spec.name, "kind": "empty_generation",
                                        "reason": f"{spec.name} generated no text (finish_reason={g.finish_reason}, "
                                                  f"{len(g.token_ids)} tokens before the stop)"})
                        continue
                    rows.append({"id": rec["id"], "response": text, "n_tokens": len(g.token_ids),
                                 "finish_reason": g.finish_reason})
                tokens = sum(len(g.token_ids) for g in gens)
                sd.commit(spec.name, i, pa.Table.from_pylist(rows, schema=SCHEMA),
                          sidecar_info(len(records), len(rows), rejects, time.time() - t0, tokens,
                                       prompt_truncated=truncated,
                                       finish={"stop": sum(g.finish_reason == "stop" for g in gens),
                                               "length": sum(g.finish_reason == "length" for g in gens)}))
            bar.close()
            del gen, cm
            free_memory()
