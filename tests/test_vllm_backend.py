"""The vLLM backend's pieces that need no vLLM: a rank's GPUs under each launcher, engine arguments,
requests, outputs, shutdown; and the generate stage driving a stand-in `vllm` module (one engine per
source, pinned while it starts, shut down before the next source's engine starts).

vLLM itself is not installed here and never ran in these tests; see README, "Performance"."""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from profuser.config import GenerateConfig, ModelConfig, parse_config
from profuser.prep.generate import record_seed
from profuser.prep.vllm_backend import (DevicePlacementError, engine_args, engine_devices, parse_outputs, requests,
                                        sampling_kwargs, shutdown_engine, visible_devices)


def test_a_ranks_engine_gets_its_own_gpus_under_every_launcher():
    # no launcher: one process, whatever is visible
    assert engine_devices({}, 1, device_count=8) is None
    assert engine_devices({"CUDA_VISIBLE_DEVICES": "2,3"}, 2) is None
    # torchrun: LOCAL_RANK / LOCAL_WORLD_SIZE, every GPU visible
    torchrun = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}
    assert engine_devices(torchrun, 1, device_count=4) == "2"
    assert engine_devices({**torchrun, "LOCAL_RANK": "0"}, 1, device_count=4) == "0"
    # deepspeed launcher: LOCAL_SIZE, CUDA_VISIBLE_DEVICES = the node's list for every rank
    ds = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CUDA_VISIBLE_DEVICES": "4,5"}
    assert engine_devices(ds, 1) == "5"
    # tensor parallel engines take consecutive GPUs
    assert engine_devices({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 2, device_count=4) == "2,3"
    assert engine_devices({"LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5"}, 3) == "3,4,5"
    # a scheduler that already pinned each task to its GPU
    assert engine_devices({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "7"}, 1) is None
    with pytest.raises(DevicePlacementError, match="tensor_parallel_size=2.*at most 2 processes per node"):
        engine_devices({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 2)
    with pytest.raises(DevicePlacementError, match="cannot tell"):
        engine_devices({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 1)


def test_visible_devices_is_restored():
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    with visible_devices("1", env):
        assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    env = {}
    with pytest.raises(RuntimeError):
        with visible_devices("3", env):
            assert env["CUDA_VISIBLE_DEVICES"] == "3"
            raise RuntimeError("engine failed to start")
    assert env == {}


def test_engine_arguments_come_from_the_config():
    cfg = parse_config({"run_dir": "/r", "sources": [{"path": "/m/a", "dtype": "bfloat16", "trust_remote_code": True}],
                        "target": {"path": "/m/t"}, "data": {"path": "/d", "max_length": 1024},
                        "prep": {"generate": {"backend": "vllm", "max_new_tokens": 256,
                                              "vllm": {"gpu_memory_utilization": 0.6, "tensor_parallel_size": 2,
                                                       "enforce_eager": True}}}})
    spec, g = cfg.sources[0], cfg.prep.generate
    assert engine_args(spec, g, 1024, cfg.seed) == {
        "model": "/m/a", "tokenizer": None, "trust_remote_code": True, "dtype": "bfloat16", "seed": 42,
        "gpu_memory_utilization": 0.6, "max_model_len": 1280, "tensor_parallel_size": 2, "enforce_eager": True,
        "load_format": "safetensors"}
    g.vllm.max_model_len, g.vllm.dtype, g.vllm.seed = 4096, "float16", 7
    a = engine_args(ModelConfig(path="/m/b.gguf", tokenizer="/tok"), g, 1024, 42)
    assert (a["max_model_len"], a["dtype"], a["seed"], a["tokenizer"]) == (4096, "float16", 7, "/tok")
    assert a["load_format"] == "auto"  # GGUF is not a pickle
    assert engine_args(ModelConfig(path="/m/d", allow_pickle=True), g, 1024, 42)["load_format"] == "auto"
    g.vllm.dtype = "auto"
    assert engine_args(ModelConfig(path="/m/c"), g, 1024, 42)["dtype"] == "auto"


def test_requests_carry_per_record_seeds_and_outputs_are_cut_at_the_stop():
    assert requests([[1, 2], [3]]) == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
    g = GenerateConfig(max_new_tokens=9, do_sample=True, temperature=0.8, top_p=0.9)
    kw = sampling_kwargs(g, [11, 12], [5, 6])
    assert [k["seed"] for k in kw] == [11, 12]
    assert kw[0] == {"max_tokens": 9, "stop_token_ids": [5, 6], "detokenize": False, "n": 1, "temperature": 0.8,
                     "top_p": 0.9, "top_k": -1, "seed": 11}
    greedy = sampling_kwargs(GenerateConfig(max_new_tokens=9), [1], [5])[0]
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0.0, 1.0, -1)

    out = lambda toks, why: types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=toks, finish_reason=why)])  # noqa: E731
    gens = parse_outputs([out([7, 8, 5], "stop"), out([7, 8], "stop"), out([7, 8, 9], "length")], [5, 6])
    assert [(g.token_ids, g.finish_reason) for g in gens] == [([7, 8], "stop"), ([7, 8], "stop"), ([7, 8, 9], "length")]


def test_shutdown_uses_what_the_engine_offers():
    calls = []
    core = types.SimpleNamespace(shutdown=lambda: calls.append("core"))
    llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=core))
    assert shutdown_engine(llm)[0] == "engine_core.shutdown" and calls == ["core"]
    llm.shutdown = lambda: calls.append("llm")
    assert shutdown_engine(llm)[0] == "LLM.shutdown" and calls == ["core", "llm"]


# --------------------------------------------------------------------------------------------
# the generate stage with a stand-in vllm module


@dataclass
class FakeVLLM:
    """Records what the stage does with `vllm.LLM`; answers with a few tokens of a real word."""

    word: list
    stop: int
    events: list = field(default_factory=list)
    seeds: list = field(default_factory=list)

    def module(self):
        fake = self

        class LLM:
            def __init__(self, **kw):
                self.name = Path(kw["model"]).name
                fake.events.append(("start", self.name, os.environ.get("CUDA_VISIBLE_DEVICES"), kw))

            def generate(self, prompts, params, use_tqdm=False):
                fake.events.append(("generate", self.name, len(prompts)))
                fake.seeds += [p.kw["seed"] for p in params]
                one = lambda: types.SimpleNamespace(token_ids=[*fake.word, fake.stop], finish_reason="stop")  # noqa: E731
                return [types.SimpleNamespace(outputs=[one()]) for _ in prompts]

            def shutdown(self):
                fake.events.append(("shutdown", self.name))

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


def test_generate_stage_runs_one_engine_per_source_and_shuts_each_down(tiny_suite, tmp_path, monkeypatch):
    from conftest import tiny_config_dict
    from profuser.models import load_chat_tokenizer
    from profuser.prep.read import part_table
    from profuser.prep.run import run_prep

    d = tiny_config_dict(tiny_suite, tmp_path / "run")
    d["data"]["limit"] = 6
    d["prep"]["generate"] = {"backend": "vllm", "max_new_tokens": 8, "do_sample": True,
                             "vllm": {"gpu_memory_utilization": 0.5}}
    d["wandb"] = {"enabled": False}
    cfg = parse_config(d)
    cm = load_chat_tokenizer(cfg.sources[0])
    fake = FakeVLLM(word=cm.tokenizer("hello", add_special_tokens=False)["input_ids"], stop=cm.tokenizer.eos_token_id)
    monkeypatch.setitem(sys.modules, "vllm", fake.module())
    # local rank 1 of 2 under torchrun-style variables (a single process here: WORLD_SIZE is unset)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # keeps prep from re-splitting this process's CPU threads
    run_prep(cfg, ["normalize", "generate"])

    names = [s.name for s in cfg.sources]
    kinds = [(e[0], e[1]) for e in fake.events]
    want = []
    for n in names:
        shards = [e for e in fake.events if e[0] == "generate" and e[1] == n]
        want += [("start", n), *[("generate", n)] * len(shards), ("shutdown", n)]
    assert kinds == want  # each engine shut down before the next source's engine starts
    starts = [e for e in fake.events if e[0] == "start"]
    assert all(e[2] == "1" for e in starts)  # pinned to this local rank's GPU while starting
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # and restored for the rest of the process
    assert all(e[3]["gpu_memory_utilization"] == 0.5 and e[3]["seed"] == cfg.seed for e in starts)
    ids = [r["id"] for r in part_table(Path(cfg.run_dir), "normalize", "records").to_pylist()]
    assert fake.seeds == [record_seed(cfg.seed, n, i) for n in names for i in ids]
    rows = part_table(Path(cfg.run_dir), "generate", names[0]).to_pylist()
    assert len(rows) == 6 and all(r["response"] == "hello" and r["finish_reason"] == "stop" for r in rows)
