"""The CLI is a thin shell: each stage runs, writes its record, and bad input gets one clear error."""

import json

import pytest
from typer.testing import CliRunner

from crafttrace.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_on_every_subcommand():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("tokens", "boundary", "attribute", "rank", "steer", "evaluate", "capability", "ablation", "demo",
                "export", "view", "direction", "patch", "monitor", "audit", "drift", "train-clt"):
        assert cmd in r.output
        assert run(cmd, "--help").exit_code == 0, cmd


def test_tokens_and_boundary_stages(tmp_path):
    r = run("tokens", "--model", "testbed", "--set", "testbed", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "tokens.json").read_text())["refusal"] == ["sorry"]
    r = run("boundary", "--model", "testbed", "--pool", "testbed:framed_harmful", "--sets", "testbed",
            "--limit", "60", "--top-k", "5", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "boundary.json").read_text())
    assert len(doc["sets"]["testbed"]["selected"]) == 5


def test_bad_inputs_get_named_errors(tmp_path):
    r = run("tokens", "--model", "testbed", "--set", "refusal=sorry|xyzzy;compliance=sure", "--out", tmp_path)
    assert r.exit_code != 0 and "not in the vocabulary" in str(r.exception)
    r = run("boundary", "--model", "testbed", "--sets", "testbed", "--limit", "40", "--min-refuse", "0.9",
            "--min-comply", "0.9", "--out", tmp_path)
    assert r.exit_code == 2 and "largest min(P_refuse, P_comply) found" in r.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run("boundary", "--model", "testbed", "--pool", empty, "--out", tmp_path)
    assert r.exit_code != 0 and "empty" in str(r.exception).lower()
    r = run("steer", "2/99999", "--prompt", "burn the dog", "--model", "testbed", "--out", tmp_path)
    assert r.exit_code != 0 and "d_transcoder" in str(r.exception)
    r = run("steer", "two/3", "--prompt", "x", "--model", "testbed", "--out", tmp_path)
    assert r.exit_code == 2 and "LAYER/INDEX" in r.output


def test_transcoder_model_mismatch_is_named(tmp_path):
    from lead_fixtures import tiny_clt
    from crafttrace.transcoders import save_transcoder
    save_transcoder(tiny_clt(), tmp_path / "clt")
    r = run("attribute", "--model", "testbed", "--transcoder", tmp_path / "clt", "--prompt", "burn the dog",
            "--out", tmp_path)
    assert r.exit_code != 0
    assert "layers" in str(r.exception) and "d_model" in str(r.exception)


def test_steer_moves_the_first_token(tmp_path):
    r = run("steer", "2/0", "--value", "0", "--prompt", "burn the dog for a story", "--model", "testbed",
            "--out", tmp_path, "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "steer.json").read_text())
    assert doc["feature"] == [2, 0] and doc["base"]


def test_realbed_build_and_demo_route_to_the_real_language_testbed(tmp_path, monkeypatch):
    import crafttrace.cli as cli
    import crafttrace.realbed as realbed
    calls = []
    monkeypatch.setattr(realbed, "build_realbed", lambda out, **kw: calls.append(kw) or realbed.Realbed(
        tmp_path, realbed.RealbedConfig.preset("tiny"), {s: {} for s in kw["stages"]}, True))
    assert run("testbed", "build", "smollm2-safety", "--size", "tiny", "--ablation").exit_code == 0
    assert run("testbed", "build", "smollm2-safety", "--size", "tiny").exit_code == 0
    assert calls[0]["stages"] == realbed.DEFAULT_STAGES + ("ablation",) and calls[1]["stages"] == realbed.DEFAULT_STAGES
    seen = []
    monkeypatch.setattr(cli, "_run_ablation", lambda model, *a, **k: seen.append((model, k.get("demo"))))
    assert run("demo", "--testbed", "smollm2-safety:small", "--out", tmp_path).exit_code == 0
    assert seen == [("smollm2-safety:small", True)]
    r = run("demo", "--testbed", "gemma", "--out", tmp_path)
    assert r.exit_code != 0 and "unknown testbed 'gemma'" in r.output
