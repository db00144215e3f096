"""Training-set fixtures for the trainer tests: build-stage rows made from the tiny suite.

Rows have exactly the build output's schema (docs/ARCHITECTURE.md, "Stage contracts"). The target's chat template
encodes each sample; the teacher distributions are real: two tiny source models that share the
target's tokenizer (chatml_bpe, and a second one of another architecture built here) are
teacher-forced on the sequence, the one with the lower mean CE on the response wins (MinCE), and
its label-aligned top-k log-probs are stored. Inference rows train on a different response text.

Also a helper to run training in a subprocess that kills itself (SIGKILL) right after a given
checkpoint is complete, for the resume test:

    python tests/train_fixtures.py kill-after STEP CONFIG [key.sub=value ...] [--data DIR]
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from profuser.constants import MODES

REPO = Path(__file__).resolve().parents[1]


def second_teacher(root: Path) -> Path:
    """A Mistral-architecture source with chatml_bpe's tokenizer (built once under root)."""
    from profuser.tiny import build_one

    out = root / "chatml_bpe_b"
    if not (out / "config.json").exists():
        build_one("chatml_bpe_b", out, seed=7, arch="mistral", tokenizer_family="chatml_bpe")
    return out


def write_shards(rows: list[dict], out_dir: Path, n_shards: int = 2) -> list[Path]:
    """Write rows (sorted by id) as Parquet shards of the build stage's format; mode fields missing
    from a row are null."""
    from profuser.prep.formats import BUILD_FIELDS, BUILD_SCHEMA, to_table

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["id"])
    paths = []
    per = -(-len(rows) // n_shards)
    for s in range(n_shards):
        part = rows[s * per:(s + 1) * per]
        if not part:
            continue
        flat = [{"id": r["id"], "meta": json.dumps(r.get("meta", {})),
                 **{f"{m}_{f}": (r.get(m) or {}).get(f) for m in MODES for f in BUILD_FIELDS}} for r in part]
        path = out_dir / f"shard-{s:05d}.parquet"
        pq.write_table(to_table(flat, BUILD_SCHEMA), path)
        paths.append(path)
    return paths


@torch.no_grad()
def teacher_signal(model, input_ids: list[int], prompt_len: int, k: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean response CE, topk_ids [T, k], topk_logprobs [T, k]) label-aligned; prompt rows are -1."""
    ids = torch.tensor([input_ids])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # [T, V]; row t predicts token t + 1
    T = len(input_ids)
    top_lp, top_id = logp[:-1].topk(k, dim=-1)
    topk_ids = np.full((T, k), -1, dtype=np.int32)
    topk_lps = np.zeros((T, k), dtype=np.float32)
    start = max(prompt_len, 1)
    topk_ids[start:] = top_id[start - 1:].numpy()
    topk_lps[start:] = top_lp[start - 1:].numpy()
    targets = ids[0, start:]
    ce = float(-logp[start - 1:-1].gather(-1, targets[:, None]).mean())
    return ce, topk_ids, topk_lps


def build_rows(target_path: Path, teachers: dict[str, Path], records: list[dict], *, k: int = 5,
               no_inference=lambda i: False, hole_every: int = 7) -> list[dict]:
    """Build-stage rows for ``records`` (canonical: id, messages, reference)."""
    from transformers import AutoModelForCausalLM

    from profuser.chat import encode_chat
    from profuser.config import ModelConfig
    from profuser.models import load_chat_tokenizer

    target = load_chat_tokenizer(ModelConfig(path=str(target_path), name="target"))
    models = {n: AutoModelForCausalLM.from_pretrained(p).eval() for n, p in teachers.items()}
    rows = []
    for i, rec in enumerate(records):
        row = {"id": rec["id"], "meta": {"i": i}}
        for m in MODES:
            if m == "inference" and no_inference(i):
                continue
            response = rec["reference"] if m == "training" else f"Sure. {rec['reference']} Done."
            enc = encode_chat(target.tokenizer, target.template, rec["messages"], response)
            signals = {n: teacher_signal(mod, enc.input_ids, enc.prompt_len, k) for n, mod in models.items()}
            winner = min(signals, key=lambda n: signals[n][0])
            ce, ids, lps = signals[winner]
            if hole_every:  # some response positions without a teacher distribution: CE only there
                ids[enc.prompt_len::hole_every] = -1
            row[m] = {"input_ids": enc.input_ids, "labels": enc.labels, "teacher": winner, "teacher_score": -ce,
                      "topk_ids": ids, "topk_logprobs": lps}
        rows.append(row)
    return rows


def canonical_records(suite: Path, n: int) -> list[dict]:
    out = []
    for line in (suite / "data" / "train.jsonl").read_text().splitlines()[:n]:
        r = json.loads(line)
        out.append({"id": r["id"], "messages": r["messages"][:-1], "reference": r["messages"][-1]["content"]})
    return out


def make_training_set(suite: Path, out_dir: Path, teacher_root: Path, n: int = 8, **kw) -> list[dict]:
    """The tiny training set: n samples of the suite's train data, teachers chatml_bpe and chatml_bpe_b."""
    teachers = {"chatml_bpe": suite / "models" / "chatml_bpe", "chatml_bpe_b": second_teacher(teacher_root)}
    rows = build_rows(suite / "models" / "target", teachers, canonical_records(suite, n), **kw)
    write_shards(rows, out_dir)
    return rows


def cached_training_set(suite: Path, n: int = 8, no_inference: tuple[int, ...] = (4,)) -> Path:
    """make_training_set under the tests' cache (next to the tiny suite), built once per content.

    ``no_inference``: indices of the samples that have no inference mode (null columns).
    """
    import hashlib

    key = hashlib.sha256(Path(__file__).read_bytes() + f"{suite}|{n}|{sorted(no_inference)}".encode()).hexdigest()[:12]
    root = suite.parent / f"train-set-{key}"
    _build_once(root, lambda tmp: make_training_set(suite, tmp / "build", tmp, n=n,
                                                    no_inference=lambda i: i in no_inference))
    return root / "build"


def _build_once(out: Path, build) -> None:
    """Run build(tmp) in a temporary folder beside `out` and rename it to `out` (marked complete),
    unless a complete `out` exists; a concurrent builder that renamed first wins."""
    import shutil
    import tempfile

    if (out / ".complete").exists():
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, out)
        except OSError:  # built concurrently by another process
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tied_target(suite: Path) -> Path:
    """The tiny target (OLMo-2) with its output projection tied to the input embedding, built once
    next to the suite: the fused loss's projection weight then also gets the embedding's gradient."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = suite.parent / f"{suite.name}-tied-target"
    src = suite / "models" / "target"

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(src)
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.get_input_embeddings().weight
        model.save_pretrained(tmp)
        for f in src.iterdir():  # tokenizer and chat template
            if not (tmp / f.name).exists():
                shutil.copy(f, tmp / f.name)

    _build_once(out, build)
    return out


def run_config(suite: Path, run_dir: Path, wandb: bool = False, **train) -> dict:
    """A run config dict over the tiny suite with a fast, learnable train section (overridable)."""
    from conftest import tiny_config_dict

    cfg = tiny_config_dict(suite, run_dir)
    cfg["train"] = {"max_steps": 4, "learning_rate": 3e-3, "per_device_train_batch_size": 2,
                    "gradient_accumulation_steps": 2, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                    "logging_steps": 1, "save_steps": 1000, **train}
    cfg["wandb"] = {"mode": "offline", "project": "profuser-tests"} if wandb else {"enabled": False}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def kill_after(step: int, argv: list[str]) -> None:
    """``python -m profuser.train ARGV``, SIGKILLed as soon as checkpoint-``step`` is complete."""
    from transformers import TrainerCallback

    from profuser.config import load_config
    from profuser.train import train
    from profuser.train.__main__ import IntermixedParser, add_arguments
    from profuser.train.trainer import COMPLETE

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marker = Path(args.output_dir) / f"checkpoint-{step}" / COMPLETE
            if state.global_step > step and marker.exists():
                os.kill(os.getpid(), signal.SIGKILL)

    parser = IntermixedParser()
    add_arguments(parser)
    a = parser.parse_args(argv)
    train(load_config(a.config, a.overrides), data=a.data, callbacks=[Kill()])
    raise SystemExit("the run finished without being killed")


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the deepspeed launcher
    if len(argv) >= 3 and argv[0] == "kill-after":
        kill_after(int(argv[1]), argv[2:])
    else:
        sys.exit(__doc__)


def read_wandb_offline(run_dir: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of the single offline W&B run under run_dir/wandb, read from its .wandb file.

    The file is a LevelDB-style log (7-byte header, 32 KiB blocks of records: crc32, length, type)
    of ``wandb_internal_pb2.Record`` protobufs.
    """
    from wandb_offline import read_wandb_records

    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}/wandb"
    config, history = {}, []
    for rec in read_wandb_records(files[-1]):
        kind = rec.WhichOneof("record_type")
        updates = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else ()
        for u in updates:
            config[u.key] = json.loads(u.value_json)
        if kind == "history":
            history.append({"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json)
                            for i in rec.history.item})
    return config, history
