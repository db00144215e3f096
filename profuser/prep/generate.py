"""Stage 2, generate: every source answers every prompt with its own chat template.

Generation stops at the template's end-of-turn token (or the model's EOS) or after
`max_new_tokens`. Each row records the response text, how many tokens it took and why it ended
("stop" or "length"); an empty response is rejected.

Seeds are per record: record j of source s samples with `record_seed(run seed, s, id_j)`, and every
draw is a pure function of that seed, the step and the scores (`SeededSampler`: temperature, top-k,
top-p, then the Gumbel-max trick with counter-based noise). So a response does not depend on which
prompts share its batch, on the batch size, on their order or on the number of processes; with
left padding and positions from the attention mask, batched fp32 decoding gives the tokens of one
prompt at a time (tests/test_generate.py), up to float ties.

Backends:
- `hf`: prompts sorted by length. On a CUDA device (`continuous_batching: auto`), transformers'
  continuous batching (`init_continuous_batching`; a finished row's slot is refilled at once) with
  the same sampler as a per-request logits processor; else static left-padded batches of
  `batch_size` through `model.generate`. A model that continuous batching cannot run falls back to
  static batches (logged once).
- `vllm`: one engine per rank on that rank's local GPUs (`profuser.prep.vllm_backend`), the same
  per-record seeds as vLLM request seeds; imported only when chosen.

Never shares a sample between sources or records: each (source, record) draws with its own seed.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import pyarrow as pa

from profuser.prep.formats import GENERATE_SCHEMA
from profuser.prep.stages import (Context, Progress, Stage, free_memory, model_deps, read_records, sidecar_info,
                                   upstream_hashes)

log = logging.getLogger("profuser")

def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


def record_seed(seed: int, source: str, record_id: str) -> int:
    """The sampling seed of one record for one source (32 bits)."""
    return derive_seed(seed, source, record_id)


# --------------------------------------------------------------------------------------------
# per-record sampling: counter-based noise, so a draw never depends on the rest of the batch

M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32, split in 16-bit halves so that int64 tensors never
    overflow; the same arithmetic on Python ints and torch int64 tensors."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & M32


def mix32(x):
    """MurmurHash3's 32-bit finalizer (a bijection with full avalanche), on ints or int64 tensors."""
    x = x & M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def draw_key(seed, step):
    """The 32-bit key of a record's draw at generation step `step` (0 = first new token)."""
    return mix32(mix32(seed) ^ mix32(_mul32(step & M32, 0x9E3779B1) ^ 0x7F4A7C15))


class SeededSampler:
    """One draw per row from softmax(filtered scores / temperature), reproducible per row key.

    Returns scores whose argmax is the draw: temperature, then top-k, then top-p (the order and the
    rules of transformers' warpers), then + Gumbel noise -log(-log u) with u = hash(key, token id)
    (Gumbel-max: argmax of logits + Gumbel noise is distributed as softmax(logits)). Greedy decoding
    of the returned scores is sampling; no generator state is kept, so rows are independent."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self._vocab_hash = None

    def vocab_hash(self, vocab: int, device):
        """Per-token hash, computed once per vocabulary size and device (before any CUDA graph capture)."""
        import torch

        h = self._vocab_hash
        if h is None or h.shape[0] != vocab or h.device != torch.device(device):
            h = self._vocab_hash = mix32(torch.arange(vocab, dtype=torch.int64, device=device) * 2 + 1)
        return h

    def noise(self, keys, vocab: int):
        """Gumbel noise [B, V] float32 for row keys [B] (int64 in [0, 2**32))."""
        import torch

        bits = mix32(mix32(keys[:, None] ^ self.vocab_hash(vocab, keys.device)[None, :]) + keys[:, None])
        u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # 24 bits: exact in float32, in (0, 1)
        return -torch.log(-torch.log(u))

    def filter(self, scores):
        """Temperature, top-k, top-p on fp32 scores [B, V]; removed tokens get -inf."""
        import torch

        scores = scores / self.temperature
        if self.top_k and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_s, idx = torch.sort(scores, descending=False, dim=-1)
            cum = sorted_s.softmax(dim=-1).cumsum(dim=-1)
            remove = cum <= (1 - self.top_p)
            remove[..., -1:] = False  # keep at least the most probable token
            scores = scores.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
        return scores

    def __call__(self, scores, keys):
        return self.filter(scores.float()) + self.noise(keys, scores.shape[-1])


def _static_processor(sampler: SeededSampler, seeds, width: int):
    """A transformers LogitsProcessor applying `sampler` to a left-padded static batch: row r draws
    with key draw_key(seeds[r], step), step = tokens generated so far."""
    from transformers import LogitsProcessor

    class RecordSeedSampling(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return sampler(scores, draw_key(seeds, input_ids.shape[1] - width))

    return RecordSeedSampling()


def _continuous_processor(sampler: SeededSampler):
    """The same sampler as a per-request continuous-batching processor: each request carries its
    `record_seed`; its step is the position being predicted minus its prompt length."""
    from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

    class CBRecordSeedSampling(ContinuousBatchingLogitsProcessor):
        supported_kwargs = {"record_seed": int}
        ignored_kwargs = ()

        def fill_defaults(self, int32_tensor) -> None:
            int32_tensor.fill_(0)

        def prepare_tensor_args(self, requests_with_new_token):
            import torch

            keys = []
            for fs in requests_with_new_token:
                st = fs.state
                prompt = st._true_initial_tokens or len(st.initial_tokens)  # soft resets move tokens to the prompt
                key = draw_key(int(st.logit_processor_kwargs.get("record_seed", 0)), st.position_offset - prompt)
                keys.append(key - (1 << 32) if key >= 1 << 31 else key)  # stored as int32
            return torch.tensor(keys, dtype=torch.int32)

        def __call__(self, scores, tensor_arg):
            import torch

            return sampler(scores, tensor_arg[: scores.shape[0]].to(torch.int64) & M32)

    return CBRecordSeedSampling()


# --------------------------------------------------------------------------------------------
# generators


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens before the stop token
    finish_reason: str


def stop_ids(chat_model) -> list[int]:
    """End-of-turn of the template first, then the tokenizer's and the model's EOS ids."""
    from profuser.chat import end_of_turn_id

    ids = [end_of_turn_id(chat_model.tokenizer, chat_model.template), chat_model.tokenizer.eos_token_id]
    gc = getattr(chat_model.model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids += eos if isinstance(eos, list) else [eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _cut(tokens: list[int], stop: set[int]) -> Generation:
    for t, x in enumerate(tokens):
        if x in stop:
            return Generation(tokens[:t], "stop")
    return Generation(tokens, "length")


def per_prompt_seeds(seed: Union[int, Sequence[int]], n: int) -> list[int]:
    """One seed per prompt: the list given, or seeds derived from (seed, prompt index)."""
    if isinstance(seed, int):
        return [derive_seed(seed, j) for j in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return seeds


def use_continuous_batching(setting: str, model, device) -> bool:
    """Whether the hf backend runs transformers' continuous batching: `on`, or `auto` on CUDA."""
    if setting == "off" or not hasattr(model, "init_continuous_batching"):
        return False
    return setting == "on" or getattr(device, "type", str(device)) == "cuda"


OnBatch = Optional[Callable[[int, int], None]]


class HFGenerator:
    """transformers generation: continuous batching or static left-padded batches, per-record seeds."""

    def __init__(self, chat_model, gcfg):
        self.model, self.tok, self.g = chat_model.model, chat_model.tokenizer, gcfg
        self.stop = stop_ids(chat_model)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.stop[0]
        self.device = next(self.model.parameters()).device
        self.sampler = SeededSampler(gcfg.temperature, gcfg.top_k, gcfg.top_p) if gcfg.do_sample else None
        self.continuous = use_continuous_batching(getattr(gcfg, "continuous_batching", "off"), self.model, self.device)
        self.mode = "continuous" if self.continuous else "static"

    def generate(self, prompts: list[list[int]], seed: Union[int, Sequence[int]] = 0, on_batch: OnBatch = None
                 ) -> list[Generation]:
        """Responses in prompt order. `seed`: one seed per prompt (the stage passes per-record seeds),
        or an int from which per-prompt seeds are derived."""
        seeds = per_prompt_seeds(seed, len(prompts))
        if self.continuous and prompts:
            try:
                return self._continuous(prompts, seeds, on_batch)
            except Exception as e:  # noqa: BLE001 — an architecture continuous batching cannot run
                log.warning("continuous batching failed for this model (%s: %s); using static batches",
                            type(e).__name__, e)
                self.continuous, self.mode = False, "static"
        return self._static(prompts, seeds, on_batch)

    def _generation_kwargs(self) -> dict:
        # sampling is done by the per-record processor on top of greedy selection
        return dict(max_new_tokens=self.g.max_new_tokens, do_sample=False, eos_token_id=self.stop,
                    pad_token_id=self.pad)

    def _static(self, prompts, seeds, on_batch: OnBatch) -> list[Generation]:
        import torch
        from transformers import LogitsProcessorList

        order = sorted(range(len(prompts)), key=lambda j: (len(prompts[j]), j))  # similar lengths share a batch
        out: list = [None] * len(prompts)
        stop = set(self.stop)
        for start in range(0, len(order), self.g.batch_size):
            idx = order[start:start + self.g.batch_size]
            width = max(len(prompts[j]) for j in idx)
            ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, j in enumerate(idx):
                ids[r, width - len(prompts[j]):] = torch.tensor(prompts[j])
                mask[r, width - len(prompts[j]):] = 1
            kw = self._generation_kwargs()
            if self.sampler is not None:
                keys = torch.tensor([seeds[j] for j in idx], dtype=torch.int64, device=self.device)
                kw["logits_processor"] = LogitsProcessorList([_static_processor(self.sampler, keys, width)])
            with torch.no_grad():
                seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kw)
            new = seqs[:, width:].tolist()
            for r, j in enumerate(idx):
                out[j] = _cut(new[r], stop)
            if on_batch:
                on_batch(len(idx), sum(len(out[j].token_ids) for j in idx))
        return out

    def continuous_config(self, prompts: list[list[int]]):
        """Continuous-batching sizes: `batch_size` requests at once; on CUDA the KV cache is sized from
        free memory by transformers, elsewhere from the prompts (its memory probe is CUDA-only)."""
        from transformers import ContinuousBatchingConfig

        kw = dict(max_requests_per_batch=self.g.batch_size)
        if self.device.type != "cuda":
            page = 64
            longest = max(len(p) for p in prompts) + self.g.max_new_tokens
            per_request = -(-longest // page) + 1
            kw.update(page_size=page, num_blocks=per_request * min(self.g.batch_size, len(prompts)) + 2,
                      max_batch_tokens=max(256, min(4096, longest * 2)), use_cuda_graph=False)
        return ContinuousBatchingConfig(**kw)

    def _continuous(self, prompts, seeds, on_batch: OnBatch) -> list[Generation]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.continuous_batching.cb_logits_processors import (
            ContinuousBatchingLogitsProcessorList)

        gc = GenerationConfig(**self._generation_kwargs())
        manager = self.model.init_continuous_batching(generation_config=gc,
                                                      continuous_batching_config=self.continuous_config(prompts))
        if self.sampler is not None:
            procs = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([_continuous_processor(self.sampler)]))
            procs.tensors_required = 1  # one int32 row of per-request keys
            manager.logit_processor = procs
        order = sorted(range(len(prompts)), key=lambda j: (len(prompts[j]), j))
        stop, out = set(self.stop), [None] * len(prompts)
        try:
            with torch.no_grad():
                if not manager.warmed_up:
                    manager.warmup()
                manager.start()
                for j in order:
                    kw = {"record_seed": seeds[j]} if self.sampler is not None else {}
                    manager.add_request(input_ids=list(prompts[j]), request_id=str(j),
                                        max_new_tokens=self.g.max_new_tokens, eos_token_id=self.stop, **kw)
                done = 0
                while done < len(prompts):
                    res = manager.get_result(timeout=1)
                    if res is None:
                        if not manager.is_running():
                            raise RuntimeError("the continuous-batching loop stopped before every request finished")
                        continue
                    if not res.is_finished():
                        continue
                    if res.error is not None:
                        raise RuntimeError(f"request {res.request_id}: {res.error}")
                    j = int(res.request_id)
                    out[j] = _cut(list(res.generated_tokens)[: self.g.max_new_tokens], stop)
                    done += 1
                    if on_batch:
                        on_batch(1, len(out[j].token_ids))
        finally:
            manager.stop(block=True, timeout=30)
            manager.destroy()
        return out


def prompt_ids(chat_model, messages: list[dict], max_length: int) -> tuple[list[int], int]:
    """The generation prompt's token ids, cut from the left to leave room for at least one new token."""
    from profuser.chat import render

    text = render(chat_model.tokenizer, chat_model.template, messages, add_generation_prompt=True)
    ids = chat_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = max(0, len(ids) - (max_length - 1))
    return ids[cut:], cut


def generate_deps(g) -> dict:
    """What a source's generations depend on in `prep.generate`: not the speed settings (batch size,
    continuous batching, vLLM memory/parallelism/graphs), which change float noise at most now that
    every draw is seeded per record."""
    d = g.model_dump()
    for k in ("batch_size", "continuous_batching"):
        d.pop(k, None)
    engine = d.pop("vllm", {})
    if g.backend == "vllm":
        d["vllm"] = {k: engine[k] for k in ("dtype", "max_model_len")}
    if g.do_sample:
        d["seeds"] = "record"  # per-record draws (seed, source, id); batch-seeded outputs are invalid
    return d


class GenerateStage(Stage):
    name = "generate"
    needs = ("normalize",)

    def parts(self, cfg, plan):
        g = generate_deps(cfg.prep.generate)
        return {m.name: {"upstream": upstream_hashes(plan, "normalize"), "model": model_deps(m),
                         "max_length": m.max_length or cfg.data.max_length, "generate": g, "seed": cfg.seed}
                for m in cfg.sources}

    def run(self, ctx: Context, todo: dict[str, list[int]]) -> None:
        cfg, stage_dir = ctx.cfg, ctx.stage_dir(self.name)
        for spec in cfg.sources:
            shards = todo.get(spec.name)
            if not shards:
                continue
            max_len = spec.max_length or cfg.data.max_length
            if cfg.prep.generate.backend == "vllm":
                from profuser.models import load_chat_tokenizer
                from profuser.prep.vllm_backend import VLLMGenerator

                chat_model = load_chat_tokenizer(spec)
                gen = VLLMGenerator(spec, chat_model, cfg.prep.generate, max_len, cfg.seed, ctx.log)
            else:
                chat_model = ctx.loader(spec)
                gen = HFGenerator(chat_model, cfg.prep.generate)
            ctx.log(f"generate {spec.name}: backend {cfg.prep.generate.backend}"
                    + (f" ({gen.mode} batching)" if isinstance(gen, HFGenerator) else ""))
            n_rec = sum(ctx.stage_dir("normalize").num_rows("records", i) for i in shards)
            bar = Progress(ctx, n_rec, f"generate {spec.name}")
            try:
                for i in shards:
                    self._shard(ctx, stage_dir, spec, chat_model, gen, i, max_len, bar)
            finally:
                bar.close()
                close = getattr(gen, "close", None)
                if close is not None:
                    close()  # vLLM: shut the engine down before the next source's engine starts
                del gen, chat_model
                free_memory()

    def _shard(self, ctx, stage_dir, spec, chat_model, gen, i: int, max_len: int, bar) -> None:
        cfg = ctx.cfg
        t0 = time.time()
        records = read_records(ctx, i)
        prompts, truncated = [], 0
        for rec in records:
            ids, cut = prompt_ids(chat_model, rec["messages"], max_len)
            prompts.append(ids)
            truncated += cut > 0
        seeds = [record_seed(cfg.seed, spec.name, rec["id"]) for rec in records]
        gens = gen.generate(prompts, seeds, on_batch=bar.update)
        seconds = time.time() - t0
        rows, rejects = [], []
        for rec, g in zip(records, gens):
            text = chat_model.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
            if not text:
                rejects.append({"id": rec["id"], "source": spec.name, "kind": "empty_generation",
                                "reason": f"{spec.name} generated no text (finish_reason={g.finish_reason}, "
                                          f"{len(g.token_ids)} tokens before the stop)"})
                continue
            rows.append({"id": rec["id"], "response": text, "n_tokens": len(g.token_ids),
                         "finish_reason": g.finish_reason})
        tokens = sum(len(g.token_ids) for g in gens)
        stage_dir.commit(spec.name, i, pa.Table.from_pylist(rows, schema=GENERATE_SCHEMA),
                         sidecar_info(len(records), len(rows), rejects, time.time() - t0, tokens,
                                      prompt_truncated=truncated, generate_seconds=round(seconds, 3),
                                      tok_per_s=round(tokens / max(seconds, 1e-9), 1),
                                      finish={"stop": sum(g.finish_reason == "stop" for g in gens),
                                              "length": sum(g.finish_reason == "length" for g in gens)}))

    def finalize(self, ctx, stage_dir, parts, rejects):
        return {"throughput": throughput(parts)}


def throughput(parts: dict) -> dict:
    """tok/s per part from the manifest's summed shard seconds and tokens (this rank's compute time,
    model loading excluded)."""
    return {p: {"tokens": v.get("tokens", 0), "seconds": v.get("seconds", 0.0),
                "tok_per_s": round(v.get("tokens", 0) / v["seconds"], 1) if v.get("seconds") else None}
            for p, v in parts.items()}
