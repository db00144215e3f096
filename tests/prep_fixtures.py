"""Helpers for the data-prep tests: stage-output comparison, a reader for W&B offline run files,
test-only rule scorers, and builders of deliberately better or broken copies of tiny models."""
from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import numpy as np

from profuser.prep.read import part_table
from wandb_offline import read_wandb_records
from profuser.prep.shards import StageDir

STAGES = ("normalize", "generate", "score", "teacher")


def manifest(run_dir, stage: str) -> dict:
    return StageDir(Path(run_dir) / "prep", stage).manifest()


def rejects(run_dir, stage: str) -> list[dict]:
    p = Path(run_dir) / "prep" / stage / "rejects.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def rows_by_key(run_dir, stage: str, part: str, key=("id",)) -> dict:
    return {tuple(r[k] for k in key): r for r in part_table(run_dir, stage, part).to_pylist()}


def assert_same_prep(a, b, ce_tol: float = 1e-5) -> None:
    """Two prep runs hold the same records, generations, scores and teacher rows, and (when both ran
    align) the same teacher choices."""
    for stage in STAGES:
        pa_, pb_ = manifest(a, stage)["parts"], manifest(b, stage)["parts"]
        assert sorted(pa_) == sorted(pb_), stage
        assert {p: v["hash"] for p, v in pa_.items()} == {p: v["hash"] for p, v in pb_.items()}, stage
        for part in pa_:
            ra, rb = rows_by_key(a, stage, part), rows_by_key(b, stage, part)
            assert sorted(ra) == sorted(rb), f"{stage}/{part}: different records"
            for k in ra:
                x, y = ra[k], rb[k]
                if stage != "teacher":
                    assert x == y, f"{stage}/{part} {k}: {x} != {y}"
                    continue
                assert x["token_ids"] == y["token_ids"] and x["response"] == y["response"], (part, k)
                assert abs(x["ce"] - y["ce"]) <= ce_tol, (part, k, x["ce"], y["ce"])
                assert abs(x["text_nll"] - y["text_nll"]) <= ce_tol * max(1, x["text_tokens"]), (part, k)
                assert (x["text_bytes"], x["text_tokens"]) == (y["text_bytes"], y["text_tokens"]), (part, k)
                assert x["topk_ids"] == y["topk_ids"], (part, k)
                la, lb = np.array(x["topk_logprobs"], np.float32), np.array(y["topk_logprobs"], np.float32)
                np.testing.assert_allclose(la, lb, rtol=1e-3, atol=1e-3)
                np.testing.assert_allclose(np.array(x["token_logprobs"], np.float32),
                                           np.array(y["token_logprobs"], np.float32), rtol=1e-3, atol=1e-3)
        assert sorted(rejects(a, stage), key=json.dumps) == sorted(rejects(b, stage), key=json.dumps), stage
    aa, ab = manifest(a, "align"), manifest(b, "align")
    if aa and ab:
        assert aa["selection"] == ab["selection"]


# --------------------------------------------------------------------------------------------
# W&B offline run files (LevelDB-style log of protobuf Records)


def wandb_run_file(run_dir, run_name=None) -> Path:
    """The .wandb file of the offline run under run_dir/wandb: the only one, or the one named run_name."""
    files = sorted(glob.glob(str(Path(run_dir) / "wandb" / "offline-run-*" / "run-*.wandb")))
    if run_name is None:
        assert len(files) == 1, files
        return Path(files[0])
    named = [f for f in files if any(r.WhichOneof("record_type") == "run" and r.run.display_name == run_name
                                     for r in read_wandb_records(Path(f)))]
    assert len(named) == 1, (run_name, files)
    return Path(named[0])


def wandbread_wandb_records(run_dir, run_name=None) -> list:
    """Every protobuf Record of the (single, or named) offline W&B run under run_dir/wandb."""
    return read_wandb_records(wandb_run_file(run_dir, run_name))


def wandb_history(run_dir, run_name=None) -> dict:
    """Flattened key -> parsed value over all history records of the offline run."""
    hist = {}
    for r in wandbread_wandb_records(run_dir, run_name):
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                hist["/".join(item.nested_key) if item.nested_key else item.key] = json.loads(item.value_json)
    return hist


def wandb_table(run_dir, key: str, run_name=None) -> dict:
    """A logged wandb.Table, read from the run's media files."""
    hist = wandb_history(run_dir, run_name)
    run = wandb_run_file(run_dir, run_name).parent
    return json.loads((run / "files" / hist[f"{key}/path"]).read_text())


# --------------------------------------------------------------------------------------------
# test-only rule scorers (referenced by import path "prep_fixtures:...")


def raise_on_capital(record: dict, response: str) -> float:
    """Fails on every record asking for a capital (a scorer with a bug on part of the data)."""
    if "capital" in record["messages"][-1]["content"]:
        raise ValueError("this scorer cannot score capitals")
    return float(len(response) % 7)


def fail_first_record(record: dict, response: str) -> float:
    if record["id"] == "tiny-000":
        raise RuntimeError("scorer bug on tiny-000")
    return 0.0


# --------------------------------------------------------------------------------------------
# models made better or broken on purpose


def fine_tune(src: Path, dst: Path, records: list[dict], steps: int = 150, lr: float = 3e-3, seed: int = 0) -> float:
    """A copy of `src` trained on the records' references (full batch, AdamW); returns the final loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from profuser.chat import encode_chat, resolve_template
    from profuser.constants import IGNORE_INDEX

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(src)
    template, _ = resolve_template(tok, None)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    encs = [encode_chat(tok, template, r["messages"][:-1], r["messages"][-1]["content"]) for r in records]
    width = max(len(e.input_ids) for e in encs)
    pad = tok.pad_token_id or 0
    ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in encs])
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in encs])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in encs])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return float(loss.detach())


def cached_fine_tune(src: Path, cache_dir: Path, records: list[dict], steps: int, lr: float) -> Path:
    """`fine_tune` into cache_dir/<key>, once per (source files, records, steps, lr); built in a
    temp dir and renamed so that concurrent sessions never see a half-written model."""
    import hashlib
    import os
    import tempfile

    from profuser.prep.shards import fingerprint

    key = hashlib.sha256(json.dumps([fingerprint(src), records, steps, lr]).encode()).hexdigest()[:12]
    dst = cache_dir / f"tuned-{src.name}-{key}"
    if (dst / "config.json").exists():
        return dst
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tuned-", dir=cache_dir))
    fine_tune(src, tmp / "m", records, steps, lr)
    try:
        os.rename(tmp / "m", dst)
    except OSError:
        pass  # another session finished first
    shutil.rmtree(tmp, ignore_errors=True)
    return dst


def tiny_reward_model(tokenizer_dir: Path, dst: Path, seed: int = 0) -> Path:
    """A random 1-label Llama sequence classifier with the tiny ChatML tokenizer (a real reward-model
    code path: AutoModelForSequenceClassification + the model's own chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def mute_model(src: Path, dst: Path) -> Path:
    """A copy of a GPT-NeoX tiny model that ends its turn at once (empty generations): the final
    norm outputs a constant vector that only the end-of-turn row of the output layer aligns with."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from profuser.chat import end_of_turn_id, resolve_template

    tok = AutoTokenizer.from_pretrained(src)
    eot = end_of_turn_id(tok, resolve_template(tok, None)[0])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    norm, head = model.gpt_neox.final_layer_norm, model.get_output_embeddings()
    with torch.no_grad():
        v = torch.randn(norm.bias.shape[0])
        norm.weight.zero_()
        norm.bias.copy_(v)
        head.weight.mul_(0.01)
        head.weight[eot] = v
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def poison_token(src: Path, dst: Path, token_id: int, value: float = float("nan")) -> Path:
    """A copy whose input embedding of `token_id` is NaN: any sequence containing it has NaN logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[token_id] = value
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst
