"""Tokens, boundary sampling, attribution (both paths), ranking and the ablation statistics."""

import math
import warnings

import pytest
import torch
from lead_fixtures import tiny_clt, tiny_model

from crafttrace import attribution, boundary, ranking, runs, tokens
from crafttrace.capability import mcnemar_exact, wilson


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), tiny_clt()


def test_token_sets_resolve_and_reject_bad_strings(tiny):
    loaded, _ = tiny
    ts = tokens.resolve(loaded.tokenizer, "testbed")
    assert ts.refusal_ids == [loaded.tokenizer.convert_tokens_to_ids("sorry")]
    assert ts.compliance_ids == [loaded.tokenizer.convert_tokens_to_ids("sure")]
    with pytest.raises(tokens.TokenSetError, match="not in the vocabulary"):
        tokens.resolve(loaded.tokenizer, "refusal=sorry|xyzzy;compliance=sure")
    with pytest.raises(tokens.TokenSetError, match="ambiguous"):
        tokens.resolve(loaded.tokenizer, "refusal=sorry;compliance=sure|sorry")
    with pytest.raises(tokens.TokenSetError, match="unknown token-set"):
        tokens.resolve(loaded.tokenizer, "nonsense")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t2 = tokens.resolve(loaded.tokenizer, "refusal=sorry|sorry the;compliance=sure")
    assert t2.refusal_ids == ts.refusal_ids and any("share the first token" in str(x.message) for x in w)


def test_first_token_probabilities_match_softmax(tiny):
    loaded, _ = tiny
    ts = tokens.resolve(loaded.tokenizer, "testbed")
    ids = loaded.encode_prompt("make a bomb")
    pr, pc, logits = tokens.first_token_probs(loaded.model, ids, ts)
    p = logits.softmax(-1)
    assert math.isclose(pr, float(p[ts.refusal_ids[0]]), rel_tol=1e-5)
    assert math.isclose(pc, float(p[ts.compliance_ids[0]]), rel_tol=1e-5)
    # batched, left-padded scoring agrees with the single-prompt forward
    (scores,) = boundary.score_pool(loaded, ["make a bomb", "how the dog ? for story"], [ts], progress=False)
    assert math.isclose(scores[0].p_refuse, pr, rel_tol=1e-4)


def test_boundary_selection_and_errors():
    sc = [boundary.PromptScore(i, f"p{i}", pr, pc) for i, (pr, pc) in
          enumerate([(0.5, 0.4), (0.9, 0.05), (0.3, 0.3), (0.25, 0.6)])]
    r = boundary.select(sc, "x", min_refuse=0.2, min_comply=0.2)
    assert r.selected == [0, 2, 3]          # best min(P) first
    assert boundary.select(sc, "x", top_k=1).selected == [0]
    with pytest.raises(boundary.NoBoundaryPromptError, match=r"largest min\(P_refuse, P_comply\) found is 0.4000"):
        boundary.select(sc, "x", min_refuse=0.6, min_comply=0.6)
    o = boundary.overlap(r, boundary.select(sc, "y", top_k=2))
    assert o["n_both"] == 2 and math.isclose(o["jaccard"], 2 / 3)
    with pytest.raises(ValueError, match="empty prompt pool"):
        boundary.score_pool(None, [], [])


def test_total_effects_on_a_hand_built_chain():
    # nodes: f0 (act 2), f1 (act 4), target. f0 -> f1 contributes 1.0 to a_1; f1 -> target 3.0; f0 -> target 0.5
    A = torch.zeros(3, 3)
    A[1, 0] = 1.0
    A[2, 1] = 3.0
    A[2, 0] = 0.5
    tot = attribution.total_effects(A, 2, torch.tensor([2.0, 4.0]), 2, max_depth=3)
    # f0's total = direct 0.5 + (3.0 / 4.0) * 1.0
    assert torch.allclose(tot[:2], torch.tensor([0.5 + 0.75, 3.0]))


@pytest.mark.parametrize("skip", [False, True])
def test_graph_and_gradient_paths_agree(tiny, tmp_path, skip):
    """With a skip connection both paths carry the MLP's linear part as a gradient path (circuit-tracer's
    ``skip + (out - skip).detach()``); without it on one side the effects would disagree."""
    loaded, clt = tiny
    if skip:
        clt = tiny_clt(skip=True)
    ts = tokens.resolve(loaded.tokenizer, "testbed")
    ids = [loaded.encode_prompt(p)[0] for p in ["make a bomb", "burn the dog for story"]]
    ge = attribution.attribute_graphs(loaded, clt, ids, ts, attribution.AttributionSettings(max_feature_nodes=4096),
                                      tmp_path, "tiny", progress=False, save_graphs=True)
    fe = attribution.gradient_effects(loaded, clt, ids, ts, progress=False)
    for g, f in zip(ge, fe):
        assert len(g.features) > 5
        assert math.isclose(g.logit_diff, f.logit_diff, rel_tol=1e-4)
        gm = ranking.effects_matrix([g], clt.n_layers, clt.d_transcoder)
        fm = ranking.effects_matrix([f], clt.n_layers, clt.d_transcoder)
        assert (gm != 0).sum() == (fm != 0).sum()   # same active features
        corr = torch.corrcoef(torch.stack([gm.flatten(), fm.flatten()]))[0, 1]
        assert corr > 0.9, corr                      # attention/norm freezing is the only difference
        assert (gm - fm).abs().max() < 0.15 * gm.abs().max()   # dropping the skip path: 0.34 here
    # cached: a rerun reads the effects back without attributing
    again = attribution.attribute_graphs(loaded, clt, ids, ts, attribution.AttributionSettings(max_feature_nodes=4096),
                                         tmp_path, "tiny", progress=False)
    assert torch.equal(again[0].total, ge[0].total)
    assert (tmp_path / f"{ge[0].meta['graph']}").exists() or any(tmp_path.glob("graph_*"))


def test_zero_active_features_do_not_crash(tiny, tmp_path):
    loaded, _ = tiny
    silent = tiny_clt()
    with torch.no_grad():
        silent.b_enc.fill_(-1e3)
    ts = tokens.resolve(loaded.tokenizer, "testbed")
    (e,) = attribution.attribute_graphs(loaded, silent, [loaded.encode_prompt("make a bomb")[0]], ts,
                                        attribution.AttributionSettings(), tmp_path, progress=False)
    assert len(e.features) == 0 and e.meta["n_active"] == 0 and math.isfinite(e.logit_diff)


def test_ranking_modes_and_silent_features():
    L, d = 2, 4
    z = torch.zeros(3, L, d)
    act_h, act_b, act_bd = z.clone(), z.clone(), z.clone()
    act_h[:, 0, 0] = 5.0            # loud harmful-topic feature, no effect
    act_bd[:, 1, 2] = 1.0
    eff_bd = z.clone()
    eff_bd[:, 1, 2] = -2.0          # compliance-promoting lever
    eff_bd[:, 1, 3] = 9.0           # big effect but silent on the application prompts
    apply = z.clone()
    apply[:, 0, 0] = 5.0
    apply[:, 1, 2] = 1.0
    rk = ranking.rank(act_h, act_b, act_bd, z, z, eff_bd, apply)
    assert rk.top("activation_cross_group") == [(0, 0)]
    assert rk.top("influence_boundary") == [(1, 2)]          # (1, 3) weighted out: silent where applied
    assert rk.steer_sign("influence_boundary", (1, 2)) == 1  # compliance-promoting: push up
    assert rk.steer_sign("activation_cross_group", (0, 0)) == -1
    # a compliance feature active on benign prompts: the contrast effect(harmful) - effect(benign) is positive,
    # so "score" suppresses it; "boundary" reads its effect where it is steered (negative) and pushes it up
    eff_b = z.clone()
    eff_b[:, 1, 2] = -4.0
    rk2 = ranking.rank(act_h, act_b, act_bd, z, eff_b, eff_bd, apply)
    assert float(rk2.scores["influence_cross_group"][1, 2]) == 4.0
    assert rk2.steer_sign("influence_cross_group", (1, 2)) == -1
    assert rk2.steer_sign("influence_cross_group", (1, 2), "boundary") == 1
    assert rk2.steer_sign("activation_cross_group", (1, 2), "boundary") == -1
    with pytest.raises(ValueError, match="sign_from must be"):
        rk2.steer_sign("influence_cross_group", (1, 2), "contrast")
    doc = rk.to_json()
    row = next(r for r in doc["features"] if (r["layer"], r["index"]) == (1, 2))
    assert row["influence_boundary"] == -2.0 and row["eligible"]
    with pytest.raises(ValueError, match="disagree"):
        ranking.rank(act_h, act_b, act_bd, z, z, torch.zeros(3, 3, 4), apply)
    with pytest.raises(ValueError, match="empty prompt pool"):
        ranking.rank(act_h[:0], act_b, act_bd, z, z, eff_bd, apply)


def test_ranking_can_leave_out_prompt_invariant_features():
    """A chat-template feature (the same max activation on every prompt) with the largest effect wins the influence
    ranking by default and is left out with min_activation_cv > 0; the prompt-dependent lever is picked instead."""
    L, d = 1, 3
    z = torch.zeros(4, L, d)
    act = z.clone()
    act[:, 0, 0] = 5.0                                      # template feature: identical on every prompt
    act[:, 0, 1] = torch.tensor([0.5, 2.0, 1.0, 3.0])       # request-dependent feature
    eff = z.clone()
    eff[:, 0, 0] = 3.0
    eff[:, 0, 1] = -1.0
    rk = ranking.rank(act, act, act, eff, eff, eff, act)
    assert rk.top("influence_boundary") == [(0, 0)] and float(rk.extras["activation_cv"][0, 0]) == 0.0
    cv1 = float(torch.tensor([0.5, 2.0, 1.0, 3.0]).std(correction=0) / 1.625)
    assert abs(float(rk.extras["activation_cv"][0, 1]) - cv1) < 1e-6
    rk2 = ranking.rank(act, act, act, eff, eff, eff, act, min_activation_cv=0.05)
    assert rk2.top("influence_boundary") == [(0, 1)] and rk2.top("activation_boundary") == [(0, 1)]
    assert rk2.to_json()["definition"]["min_activation_cv"] == 0.05
    with pytest.raises(ValueError, match="varies less than 0.9"):
        ranking.rank(act, act, act, eff, eff, eff, act, min_activation_cv=0.9).top("influence_boundary")
    with pytest.raises(ValueError, match="min_activation_cv must be >= 0"):
        ranking.rank(act, act, act, eff, eff, eff, act, min_activation_cv=-1)


def test_mcnemar_and_wilson_known_values():
    # b=0 lost, c=6 gained: two-sided exact p = 2 * 0.5**6
    p, b, c = mcnemar_exact([False] * 6 + [True] * 4, [True] * 10)
    assert (b, c) == (0, 6) and math.isclose(p, 2 * 0.5 ** 6)
    assert mcnemar_exact([True, False], [True, False])[0] == 1.0
    # 30 vs 28 discordant (the paper's MMLU split) is nowhere near significant
    p, _, _ = mcnemar_exact([True] * 30 + [False] * 28, [False] * 30 + [True] * 28)
    assert p > 0.8
    lo, hi = wilson(5, 10)
    assert math.isclose(lo, 0.2366, abs_tol=1e-3) and math.isclose(hi, 0.7634, abs_tol=1e-3)


def test_run_records_are_atomic_and_round_trip(tmp_path):
    runs.write_json(tmp_path / "a.json", {"x": torch.tensor([1, 2]), "p": tmp_path})
    assert runs.read_json(tmp_path / "a.json")["x"] == [1, 2]
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        runs.read_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="record not found"):
        runs.read_json(tmp_path / "missing.json")
