"""The generate stage's vLLM backend: one engine per rank on that rank's local GPUs.

What needs no vLLM is plain functions, tested without it: which GPUs a rank's engine gets
(`engine_devices`), the engine's arguments (`engine_args`), the requests and their per-record
sampling parameters (`requests`, `sampling_kwargs`), reading the outputs (`parse_outputs`) and
shutting an engine down (`shutdown_engine`). `VLLMGenerator` puts them together; it is the only
part that imports vLLM.

Placement: launchers start one process per GPU but do not all pin it. torchrun sets LOCAL_RANK
and leaves every GPU visible; the deepspeed launcher sets CUDA_VISIBLE_DEVICES to the node's whole
list; some schedulers give each task its own GPU(s). A vLLM engine always starts on the first
visible device, so without help every rank's engine lands on GPU 0. The engine of local rank r with
tensor_parallel_size t therefore sees GPUs [r*t, (r+1)*t) of what is visible; when exactly t GPUs
are visible, the rank is already pinned. CUDA_VISIBLE_DEVICES is changed only while the engine
starts (its worker processes inherit it) and restored after, so the rest of this process (the
teacher stage on cuda:LOCAL_RANK) keeps seeing the whole node.

Never imports vllm unless this backend is selected (it is an optional dependency).
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from typing import Callable, Mapping, Optional, Sequence

from profuser.prep.generate import Generation, _cut, stop_ids


class DevicePlacementError(RuntimeError):
    pass


def _env_int(env: Mapping[str, str], *names: str, default: int) -> int:
    for n in names:
        if env.get(n):
            return int(env[n])
    return default


def engine_devices(env: Mapping[str, str], tensor_parallel_size: int = 1,
                   device_count: Optional[int] = None) -> Optional[str]:
    """The CUDA_VISIBLE_DEVICES value for this rank's engine, or None to leave it as it is.

    `env` is the process environment (LOCAL_RANK; LOCAL_WORLD_SIZE from torchrun or LOCAL_SIZE from
    the deepspeed launcher; CUDA_VISIBLE_DEVICES); `device_count` is how many GPUs the node has when
    CUDA_VISIBLE_DEVICES is unset."""
    t = tensor_parallel_size
    local_rank = _env_int(env, "LOCAL_RANK", default=0)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=1)
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is not None and raw.strip() != "":
        visible = [d.strip() for d in raw.split(",") if d.strip()]
    elif device_count is not None:
        visible = [str(i) for i in range(device_count)]
    else:
        visible = None
    if local_world == 1 and local_rank == 0:
        return None  # no launcher, or one process per node: the engine takes the first t visible GPUs
    if visible is None:
        raise DevicePlacementError("cannot tell which GPUs this node has (CUDA_VISIBLE_DEVICES unset and no "
                                   "device count)")
    if len(visible) == t:
        return None  # this rank is already pinned to its GPU(s)
    need = local_world * t
    if need > len(visible):
        raise DevicePlacementError(
            f"local rank {local_rank} of {local_world} needs {t} GPU(s) for its vLLM engine "
            f"(prep.generate.vllm.tensor_parallel_size={t}), but {len(visible)} are visible "
            f"({','.join(visible)}); launch at most {len(visible) // t} processes per node")
    return ",".join(visible[local_rank * t:(local_rank + 1) * t])


@contextmanager
def visible_devices(value: Optional[str], environ=os.environ):
    """Set CUDA_VISIBLE_DEVICES to `value` inside the block (nothing when None), then restore it."""
    if value is None:
        yield
        return
    old = environ.get("CUDA_VISIBLE_DEVICES")
    environ["CUDA_VISIBLE_DEVICES"] = value
    try:
        yield
    finally:
        if old is None:
            environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            environ["CUDA_VISIBLE_DEVICES"] = old


def engine_args(spec, gcfg, max_length: int, run_seed: int) -> dict:
    """Keyword arguments of `vllm.LLM` for source `spec` under `prep.generate` (`gcfg`).

    The context is sized for the longest prompt the stage sends (max_length - 1 tokens) plus
    max_new_tokens unless `vllm.max_model_len` says otherwise; a GGUF source passes its tokenizer
    directory when the config names one."""
    v = gcfg.vllm
    dtype = v.dtype if v.dtype != "auto" else (spec.dtype if spec.dtype != "auto" else "auto")
    return {
        "model": spec.path,
        "tokenizer": spec.tokenizer or None,
        "trust_remote_code": spec.trust_remote_code,
        "dtype": dtype,
        "seed": run_seed if v.seed is None else v.seed,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "max_model_len": v.max_model_len or (max_length + gcfg.max_new_tokens),
        "tensor_parallel_size": v.tensor_parallel_size,
        "enforce_eager": v.enforce_eager,
        # never unpickle unless allowed (a GGUF file is no pickle)
        "load_format": "auto" if spec.allow_pickle or str(spec.path).endswith(".gguf") else "safetensors",
    }


def sampling_kwargs(gcfg, seeds: Sequence[int], stop: Sequence[int]) -> list[dict]:
    """`vllm.SamplingParams` keyword arguments, one per prompt, each with its record's seed. Greedy
    is temperature 0; the stage decodes token ids itself (detokenize off)."""
    g = gcfg
    base = {"max_tokens": g.max_new_tokens, "stop_token_ids": list(stop), "detokenize": False, "n": 1}
    if g.do_sample:
        base.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k if g.top_k else -1)
    else:
        base.update(temperature=0.0, top_p=1.0, top_k=-1)
    return [{**base, "seed": int(s)} for s in seeds]


def requests(prompts: Sequence[Sequence[int]]) -> list[dict]:
    """Token-id prompts in vLLM's input form."""
    return [{"prompt_token_ids": list(p)} for p in prompts]


def parse_outputs(outputs, stop: Sequence[int]) -> list[Generation]:
    """vLLM RequestOutputs (input order) -> Generations: tokens before the first stop token, and
    "stop" when the engine stopped on one even if it left it out of the token ids."""
    stop_set, out = set(stop), []
    for o in outputs:
        c = o.outputs[0]
        g = _cut(list(c.token_ids), stop_set)
        if g.finish_reason == "length" and getattr(c, "finish_reason", None) == "stop":
            g = Generation(g.token_ids, "stop")
        out.append(g)
    return out


def shutdown_engine(llm) -> list[str]:
    """Stop an engine and give its GPU memory back; returns what was called (for logs and tests).

    vLLM has no single teardown call across versions: `LLM.shutdown()` where it exists, else the V1
    engine core's `shutdown()`, then the model-parallel and distributed state is destroyed, the
    object dropped and the CUDA cache emptied."""
    done = []
    engine = getattr(llm, "llm_engine", None)
    for name, obj in (("LLM.shutdown", llm), ("engine_core.shutdown", getattr(engine, "engine_core", None)),
                      ("llm_engine.shutdown", engine)):
        fn = getattr(obj, "shutdown", None) if obj is not None else None
        if callable(fn):
            fn()
            done.append(name)
            break
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    except Exception:  # noqa: BLE001 — absent in this vLLM version
        pass
    else:
        for fn in (destroy_model_parallel, destroy_distributed_environment):
            try:
                fn()
                done.append(fn.__name__)
            except Exception:  # noqa: BLE001 — nothing to destroy
                pass
    del engine
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
            done.append("empty_cache")
    except Exception:  # noqa: BLE001
        pass
    return done


class VLLMGenerator:
    """vLLM offline engine for one source on this rank's GPUs; `close()` shuts it down."""

    mode = "vllm"

    def __init__(self, spec, chat_model, gcfg, max_length: int, run_seed: int, say: Callable[[str], None] = print,
                 environ=os.environ):
        from vllm import LLM  # noqa: imported only for this backend

        from profuser.models import check_no_pickle

        check_no_pickle(spec.path, spec.allow_pickle, spec.name)
        self.g, self.stop = gcfg, stop_ids(chat_model)
        count = None
        if not environ.get("CUDA_VISIBLE_DEVICES"):
            import torch  # counts devices without creating a CUDA context

            count = torch.cuda.device_count()
        devices = engine_devices(environ, gcfg.vllm.tensor_parallel_size, count)
        args = engine_args(spec, gcfg, max_length, run_seed)
        say(f"vllm engine for {spec.name}: CUDA_VISIBLE_DEVICES={devices or environ.get('CUDA_VISIBLE_DEVICES', '(all)')} "
            f"{ {k: v for k, v in args.items() if k not in ('model', 'tokenizer')} }")
        with visible_devices(devices, environ):
            self.llm = LLM(**{k: v for k, v in args.items() if v is not None})
        self.say = say

    def generate(self, prompts: list[list[int]], seed, on_batch=None) -> list[Generation]:
        from vllm import SamplingParams

        from profuser.prep.generate import per_prompt_seeds

        seeds = per_prompt_seeds(seed, len(prompts))
        params = [SamplingParams(**kw) for kw in sampling_kwargs(self.g, seeds, self.stop)]
        outs = self.llm.generate(requests(prompts), params, use_tqdm=False)
        res = parse_outputs(outs, self.stop)
        if on_batch:
            on_batch(len(res), sum(len(r.token_ids) for r in res))
        return res

    def close(self) -> None:
        if getattr(self, "llm", None) is None:
            return
        done = shutdown_engine(self.llm)
        self.llm = None
        gc.collect()
        self.say(f"vllm engine shut down ({', '.join(done) or 'dropped'})")
