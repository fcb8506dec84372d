"""Drift check: a null checkpoint scores exactly no drift, a large perturbation is flagged, errors are clear."""

import pytest
import torch
from lead_fixtures import tiny_clt, tiny_model

from test_monitor import B, H  # the tiny vocabulary's harmful / benign prompts

from crafttrace import drift, ranking, runs


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    loaded, clt = tiny_model(), tiny_clt()
    act = ranking.max_activations(loaded, clt, [loaded.encode_prompt(p)[0] for p in H + B], progress=False)
    eff = torch.randn(len(H + B), 2, 16, generator=torch.Generator().manual_seed(0))
    rk = ranking.rank(act, act, act, eff, eff, eff, act)
    cfg = drift.DriftConfig(harmful=H, benign=B, top_k=4, batch_size=8)
    return loaded, clt, rk, cfg


def test_identical_checkpoint_is_not_flagged(tiny, tmp_path):
    loaded, clt, rk, cfg = tiny
    res = drift.run_drift(loaded, drift.perturb(loaded, 0.0), clt, rk, tmp_path, cfg=cfg, progress=False)
    assert not res["regression"] and res["reasons"] == []
    assert res["activation_rel"] == 0 and res["steering_rel"] == 0 and res["sign_flips"] == 0
    assert res["influence_cos"] == pytest.approx(1.0) and res["direction_cos_min"] == pytest.approx(1.0)
    for f in ("drift.json", "drift.md", "drift.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert "no regression flagged" in (tmp_path / "drift.md").read_text()
    assert runs.read_json(tmp_path / "drift.json")["regression"] is False


def test_large_perturbation_is_flagged_small_one_moves_less(tiny, tmp_path):
    loaded, clt, rk, cfg = tiny
    big = drift.run_drift(loaded, drift.perturb(loaded, 1.0, seed=1), clt, rk, tmp_path / "big", cfg=cfg,
                          progress=False)
    assert big["regression"] and big["reasons"]
    assert big["activation_rel"] > cfg.thresholds.activation_rel
    assert big["direction_cos_min"] < cfg.thresholds.direction_cos
    small = drift.run_drift(loaded, drift.perturb(loaded, 0.01, seed=1), clt, rk, tmp_path / "small", cfg=cfg,
                            progress=False)
    assert 0 < small["activation_rel"] < big["activation_rel"]
    assert small["direction_cos_min"] > big["direction_cos_min"]
    assert "REGRESSION" in (tmp_path / "big" / "drift.md").read_text()


def test_finetune_and_perturb_make_new_checkpoints(tiny):
    loaded, _, _, _ = tiny
    before = [p.clone() for p in loaded.model.parameters()]
    ft = drift.finetune(loaded, ["how the cake ? sure the cake", "make a cake sure"], steps=3, lr=1e-2, batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.model.parameters()))  # the original is untouched
    assert any(not torch.equal(a, b) for a, b in zip(before, ft.model.parameters()))
    assert not any(p.requires_grad for p in ft.model.parameters())
    with pytest.raises(ValueError, match="rel_std"):
        drift.perturb(loaded, -1.0)
    with pytest.raises(ValueError, match="at least one text"):
        drift.finetune(loaded, [])


def test_mismatched_checkpoints_and_config_errors(tiny, tmp_path):
    loaded, clt, rk, cfg = tiny
    other = tiny_model(n_layers=3)
    with pytest.raises(ValueError, match="differ in num_hidden_layers: 2 vs 3"):
        drift.run_drift(loaded, other, clt, rk, tmp_path, cfg=cfg, progress=False)
    with pytest.raises(ValueError, match="differ in d_transcoder: 16 vs 8"):
        drift.run_drift(loaded, loaded, clt, rk, tmp_path, clt_b=tiny_clt(d_t=8), cfg=cfg, progress=False)
    with pytest.raises(ValueError, match="unknown drift thresholds keys"):
        drift.DriftConfig.from_dict({"thresholds": {"cos": 0.5}})
    assert drift.DriftConfig.from_dict({"thresholds": {"direction_cos": 0.5}}).thresholds.direction_cos == 0.5


TESTBED = __import__("pathlib").Path(__file__).resolve().parents[1] / "transcoders" / "testbed"


@pytest.mark.slow
@pytest.mark.skipif(not (TESTBED / "model").exists(), reason="testbed artifact not built")
def test_testbed_benign_finetune_that_erases_refusal_is_flagged(tmp_path):
    from crafttrace.ablation import AblationConfig, run_ablation
    from crafttrace.testbed import language as L
    from crafttrace.testbed import load_testbed
    loaded, clt = load_testbed(0, build_if_missing=False)
    run_ablation(loaded, clt, AblationConfig(influence_path="grad"), tmp_path, rank_only=True, progress=False)
    rk = tmp_path / "ranking.json"
    null = drift.run_drift(loaded, drift.perturb(loaded, 0.0), clt, rk, tmp_path / "null", progress=False)
    assert not null["regression"]
    texts = [loaded.format_prompt(e.prompt) + " " + e.response for e in L.training_examples(400, seed=5)
             if e.label == "benign"]
    ft = drift.finetune(loaded, texts, steps=200, lr=1e-3)
    res = drift.run_drift(loaded, ft, clt, rk, tmp_path / "ft", progress=False)
    assert res["regression"] and res["refusal_harmful"][1] < res["refusal_harmful"][0]
