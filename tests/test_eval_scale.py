"""`profuser eval` where it runs for real: rank split and gather, a real reward model as scorer on the
configured device, lm-eval on the loaded model with a local custom task, two processes under torchrun."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from profuser.config import ModelConfig, ScorerConfig, parse_config

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# rank split and gather (pure)


@pytest.mark.parametrize("n,world,shard", [(1, 2, 256), (7, 2, 256), (30, 3, 4), (100, 4, 8), (5, 8, 2), (12, 1, 3)])
def test_rank_share_covers_every_record_once(n, world, shard):
    from profuser.evaluate import rank_share
    from profuser.prep.stages import owner

    shares = [rank_share(n, r, world, shard) for r in range(world)]
    flat = sorted(j for s in shares for j in s)
    assert flat == list(range(n))
    if n >= world:
        assert all(shares), shares  # every rank has work when there is enough
    # prep's rule: block i of min(shard, ceil(n / world)) records on rank owner(.., i, ..)
    block = max(1, min(shard, -(-n // world)))
    for r, s in enumerate(shares):
        assert all(owner([""], "", j // block, -(-n // block), world) == r for j in s)


def test_merge_shares_restores_record_order():
    from profuser.evaluate import merge_shares

    parts = [{"index": [0, 1, 4], "ce_sum": [1.0, 2.0, 5.0], "score": {"em": [1, 0, 1]}},
             {"index": [2, 3], "ce_sum": [3.0, 4.0], "score": {"em": [0, 0]}}]
    out = merge_shares(parts, 5)
    assert out["ce_sum"] == [1.0, 2.0, 3.0, 4.0, 5.0] and out["score"]["em"] == [1, 0, 0, 0, 1]


# --------------------------------------------------------------------------------------------
# a real reward model


GOOD_WORDS = ["apple", "river", "music", "garden", "window", "silver", "planet", "forest", "pencil", "rocket"]
PROMPTS = ["Is this fine?", "Can you help?", "Do you agree?", "Shall we go?", "Is it ready?", "Will it work?",
           "Should I try?", "Are you sure?"]


def _rm_pairs(rng, prompts, words):
    """(prompt, preferred, other): the preferred response says yes, the other no, same words after."""
    out = []
    for _ in range(64):
        p, w = rng.choice(prompts), rng.choice(words)
        out.append((p, f"Yes, the {w} is here.", f"No, the {w} is here."))
    return out


@pytest.fixture(scope="module")
def yes_reward_model(tiny_suite, tmp_path_factory) -> Path:
    """A tiny Llama sequence-classification reward model trained (Bradley-Terry, 120 steps) to score
    answers that say "Yes" above answers that say "No" — a scorer built to prefer one kind."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from profuser.chat import render

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_suite / "models" / "chatml_bpe")
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                               pad_token_id=tok.pad_token_id, max_position_embeddings=256)
    model = AutoModelForSequenceClassification.from_config(cfg)
    pairs = _rm_pairs(random.Random(0), PROMPTS[:6], GOOD_WORDS[:7])
    text = lambda p, r: render(tok, tok.chat_template, [{"role": "user", "content": p},  # noqa: E731
                                                        {"role": "assistant", "content": r}], False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tok.padding_side = "right"
    for step in range(120):
        batch = pairs[(step * 16) % 64:(step * 16) % 64 + 16]
        enc = tok([text(p, g) for p, g, _ in batch] + [text(p, b) for p, _, b in batch], padding=True,
                  add_special_tokens=False, return_tensors="pt")
        r = model(**enc).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(r[:16] - r[16:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    out = tmp_path_factory.mktemp("rm") / "yes_rm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_reward_model_scorer_ranks_the_preferred_kind_first(yes_reward_model):
    from profuser.prep.score import build_scorer, pick_winner, score_safely

    import numpy as np

    sc = build_scorer(ScorerConfig(type="reward_model", name="rm", path=str(yes_reward_model), batch_size=4), "cpu")
    assert sc.model.device.type == "cpu"
    # prompts and words the reward model never saw
    test = _rm_pairs(random.Random(1), PROMPTS[6:], GOOD_WORDS[7:])[:12]
    recs = [{"messages": [{"role": "user", "content": p}], "reference": ""} for p, _, _ in test]
    good = score_safely(sc, recs, [g for _, g, _ in test])
    bad = score_safely(sc, recs, [b for _, _, b in test])
    assert all(g > b for g, b in zip(good, bad)), list(zip(good, bad))
    # the vote between candidates picks the preferred one, whichever position it has
    for g, b in zip(good, bad):
        assert pick_winner(np.array([[b, g]]))[0] == 1 and pick_winner(np.array([[g, b]]))[0] == 0
    # batching (right padding) does not change a score
    one = build_scorer(ScorerConfig(type="reward_model", name="rm", path=str(yes_reward_model), batch_size=1), "cpu")
    assert score_safely(one, recs, [g for _, g, _ in test]) == pytest.approx(good, abs=1e-4)


def test_eval_with_a_reward_model_scorer_on_the_configured_device(tiny_config, yes_reward_model):
    from profuser.evaluate import evaluate

    tiny_config["target"]["device"] = "cpu"
    tiny_config["scorers"] = [{"name": "rm", "type": "reward_model", "path": str(yes_reward_model), "batch_size": 4}]
    tiny_config["eval"] = {"max_new_tokens": 6, "batch_size": 4}
    cfg = parse_config(tiny_config)
    r = evaluate(cfg, "target")
    assert r["device"] == "cpu" and r["world_size"] == 1
    assert set(r["scores"]) == {"rm"} and r["scores"]["rm"] == r["scores"]["rm"]  # finite mean
    assert set(r["win_rate"]) == {"chatml_bpe", "vicuna_spm", "gemma_unigram"}
    # every source's answers were cached once and serve the next evaluation
    cached = sorted(p.stem for p in (Path(cfg.run_dir) / "eval" / "sources").glob("*.jsonl"))
    assert cached == ["chatml_bpe", "gemma_unigram", "vicuna_spm"]


# --------------------------------------------------------------------------------------------
# lm-eval on the loaded model, a local task


def _greedy(cm, prompts_ids, max_new):
    from profuser.config import GenerateConfig
    from profuser.prep.generate import HFGenerator

    gens = HFGenerator(cm, GenerateConfig(max_new_tokens=max_new, batch_size=4)).generate(prompts_ids, seed=0)
    return [cm.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip() for g in gens]


def test_lm_eval_local_task_on_the_loaded_model(tiny_config, tiny_models, tmp_path):
    """A generate_until task from a YAML file over a local JSONL (no download). The answers are the
    model's own greedy outputs for some documents, computed here by profuser's generator, with and
    without the chat template; lm-eval's exact_match must equal the share we compute."""
    pytest.importorskip("lm_eval")
    from profuser.chat import render
    from profuser.evaluate import evaluate
    from profuser.models import load_chat_model

    questions = ["What is 2 plus 3?", "Name a colour.", "Spell dog backwards.", "Capital of Peru?",
                 "Say hi.", "Count to three.", "Why is the sky blue?", "Reverse the word planet."]
    cm = load_chat_model(ModelConfig(path=str(tiny_models["target"]), name="target"), device="cpu")
    chat = _greedy(cm, [cm.tokenizer(render(cm.tokenizer, cm.template, [{"role": "user", "content": q}], True),
                                     add_special_tokens=False)["input_ids"] for q in questions], 8)
    plain = _greedy(cm, [cm.tokenizer(q)["input_ids"] for q in questions], 8)
    answers = [chat[i] if i % 2 == 0 else plain[i] for i in range(len(questions))]
    answers[1] = "an answer no model gives"
    want_chat = sum(a == c for a, c in zip(answers, chat)) / len(answers)
    want_plain = sum(a == p for a, p in zip(answers, plain)) / len(answers)
    assert want_chat != want_plain, (chat, plain)  # the template changes the answers, so the check can tell

    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(questions, answers)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "profuser_local.yaml").write_text(LOCAL_TASK.format(data=data))
    tiny_config["eval"] = {"max_new_tokens": 4, "batch_size": 4, "lm_eval_tasks": ["profuser_local"],
                           "lm_eval_include_path": str(tasks)}
    for use_template, want in ((True, want_chat), (False, want_plain)):
        tiny_config["eval"]["lm_eval_chat_template"] = use_template
        cfg = parse_config(tiny_config)
        r = evaluate(cfg, "target", out=str(tmp_path / f"res-{use_template}.json"), compare_sources=False)
        got = r["lm_eval"]["results"]["profuser_local"]
        assert got["exact_match,none"] == pytest.approx(want), (use_template, got, answers, chat, plain)
        assert r["lm_eval"]["config"]["device"] == "cpu" and r["lm_eval"]["config"]["batch_size"] == 4
        assert r["lm_eval"]["n_samples"]["profuser_local"]["effective"] == len(questions)


LOCAL_TASK = """task: profuser_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
"""


# --------------------------------------------------------------------------------------------
# two processes under a launcher


@pytest.mark.slow
def test_eval_under_torchrun_splits_and_gathers(tiny_config, tmp_path):
    """`profuser eval` with 2 CPU processes (torchrun): each rank evaluates its blocks, rank 0 writes
    results.json — the same numbers as one process."""
    import yaml

    from profuser.evaluate import evaluate
    from profuser.prep.dist import free_port

    tiny_config["scorers"] = [{"name": "exact_match", "type": "rule", "function": "profuser.rules:exact_match"},
                              {"name": "token_f1", "type": "rule", "function": "profuser.rules:token_f1"}]
    tiny_config["eval"] = {"max_new_tokens": 6, "batch_size": 2}
    tiny_config["prep"]["shard_size"] = 2  # 6 records: blocks of 2 on ranks 0, 1, 0
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    one = evaluate(parse_config(tiny_config), "target", out=str(tmp_path / "one.json"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "profuser.cli",
                          "eval", str(path), "--model", "target", "--out", str(tmp_path / "two.json"),
                          f"run_dir={tmp_path / 'run2'}"],  # no source cache there: ranks generate their share
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("results written to") == 1  # rank 0 reports
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["n_records"] == one["n_records"] == 6
    assert two["ce"] == pytest.approx(one["ce"], rel=1e-5)
    assert two["scores"] == pytest.approx(one["scores"]) and two["win_rate"] == pytest.approx(one["win_rate"])
    assert [s["response"] for s in two["samples"]] == [s["response"] for s in one["samples"]]
    for src in ("chatml_bpe", "vicuna_spm", "gemma_unigram"):  # rank 0 wrote every source's whole cache
        a, b = (Path(d) / "eval" / "sources" / f"{src}.jsonl" for d in (tiny_config["run_dir"], tmp_path / "run2"))
        assert a.read_text() == b.read_text()
