"""The `profuser` command as a user runs it."""
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "profuser.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300)


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0 and "check" in out.stdout
    out = run("check", "--help")
    assert "--load-weights" in out.stdout and "key.sub=value" in out.stdout


def test_check_tiny_example_ready(tiny_suite, tmp_path):
    """examples/tiny.yaml as shipped, with the models built by `python -m profuser.tiny .tiny`."""
    (tmp_path / ".tiny").symlink_to(tiny_suite)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "tiny.yaml").write_text((REPO / "examples" / "tiny.yaml").read_text())
    out = run("check", "examples/tiny.yaml", "--load-weights", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    for text in ("chatml_bpe", "vicuna_spm", "gemma_unigram", "target", "TokenizersBackend", "<end_of_turn>",
                 "24 rows -> 24 accepted, 0 rejected", "READY", "attention=sdpa"):
        assert text in out.stdout, text
    assert (tmp_path / "runs" / "tiny" / "config.yaml").exists()


def test_check_reports_every_problem_and_fails(tiny_config, tmp_path):
    tiny_config["sources"][0]["chat_template"] = "no-such-template"
    tiny_config["sources"][1]["path"] = str(tmp_path / "missing-model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": ""}\nnot json\n')
    tiny_config["data"]["path"] = str(bad)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config))
    out = run("check", str(cfg))
    assert out.returncode == 1
    assert "NOT READY" in out.stdout and "no-such-template" in out.stdout
    assert "sources.1.path" in out.stdout and "missing-model" in out.stdout
    assert "2 rows -> 0 accepted, 2 rejected" in out.stdout and "empty_response" in out.stdout
    assert "no usable records" in out.stdout


def test_config_error_exit_code(tiny_config, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config))
    out = run("check", str(cfg), "prep.topk=-1")
    assert out.returncode == 2 and "prep.topk" in out.stderr and "-1" in out.stderr
