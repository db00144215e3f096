"""benchmarks/bench_lookahead_replay.py: the replay feeds the model what the teacher stage's lookahead
fed it (the same forwards, the same vocabulary rows), from a trace recorded on a tiny fixture teacher
by the hook bench_lookahead.py --trace uses; its command runs end to end on CPU."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TEXTS = ["The cat sat on the mat. Then it slept all day long.", "A dog ran far, and then it came back home."]


@pytest.fixture(scope="module")
def replay():
    sys.path.insert(0, str(BENCH))  # bench_lookahead_replay imports bench_prep's SHAPES
    spec = importlib.util.spec_from_file_location("bench_lookahead_replay", BENCH / "bench_lookahead_replay.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_replay_feeds_what_the_lookahead_fed(replay, tmp_path, capsys):
    from profuser.chat import BUILTIN_TEMPLATES, encode_chat
    from profuser.config import LookaheadConfig, PrepConfig
    from profuser.prep.teacher import lookahead_outcomes
    from profuser.tiny import build_model, build_tokenizer

    tok = build_tokenizer("chatml_bpe")
    model = build_model("llama", len(tok), 3, tok, hidden=64, layers=2).eval()
    cm = SimpleNamespace(tokenizer=tok, model=model, template=BUILTIN_TEMPLATES["chatml"])
    prep = PrepConfig(topk=6, batch_tokens=3 * 8 * 3, lookahead=LookaheadConfig(branch=3, beam=8, steps=3,
                                                                                min_prob=0.0))
    encs = [encode_chat(tok, cm.template, [{"role": "user", "content": "A sentence?"}], t) for t in TEXTS]
    text = [e.text_tokens(t, tok.all_special_ids) for e, t in zip(encs, TEXTS)]
    lookahead_outcomes(cm, encs[0], text[0], prep)  # the token tree's one-token check runs once per model
    tracer, cost, trace = replay.ForwardTrace(model), {}, []
    for e, tx in zip(encs, text):
        _, entry = tracer.sequence(lambda: lookahead_outcomes(cm, e, tx, prep, cost), e, cost)
        trace.append(entry)
    assert cost["tree_sequences"] == 2 and cost["word_starts"] > 10
    for entry in trace:  # the shared forward of the sequence, then one batch-1 row per step
        fw = entry["forwards"]
        assert fw[0][0] == 1 and fw[0][2] == 0 and all(b == 1 and past >= fw[0][1] for b, _, past in fw[1:])
    assert sum(len(x["forwards"]) for x in trace) == cost["forwards"]
    assert sum(fed for x in trace for _, fed, _ in x["forwards"][1:]) == cost["beam_tokens"]
    doc = {"teacher": "fixture", "vocab": len(tok), "lookahead": prep.lookahead.model_dump(exclude={"enabled"}),
           "topk": prep.topk, "batch_tokens": prep.batch_tokens,
           "teacher_sequences": [[len(e.input_ids), len(e.input_ids) - e.prompt_len] for e in encs],
           "lookahead_sequences": trace}
    # every fed row and every word start's first row projected onto the vocabulary, as the stage did
    assert replay.replay(model, doc, "cpu") == cost["beam_tokens"] + cost["word_starts"]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(doc))
    replay.main(["--trace", str(path), "--shape", "tiny", "--rounds", "1", "--threads", "1"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["forwards"] == cost["forwards"] and got["vocabulary_rows"] == cost["beam_tokens"] + cost["word_starts"]
    assert got["ratio_replay_over_teacher_forward"] > 0
    broken = dict(doc, lookahead_sequences=[dict(trace[0], forwards=[[2, 5, 0]] + trace[0]["forwards"][1:])])
    with pytest.raises(SystemExit, match="not a token tree"):
        replay.replay(model, broken, "cpu")
