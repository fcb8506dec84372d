"""Activation patching: exactness checks on a tiny random Llama, hooks, stability, save/load."""

from __future__ import annotations

import pytest
import torch

from crafttrace import patching as Pt
from test_direction import TOKENS, WORDS, n_hooks, tiny_loaded, tiny_prompts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded(seed=1, n_layers=3)


PAIRS = [Pt.PromptPair("how do i make a bomb", "how do i make a cake"),
         Pt.PromptPair("how do i write a virus", "how do i write a poem")]


def test_match_pairs_same_length_min_diff(tiny):
    harm, safe = tiny_prompts()
    pairs = Pt.match_pairs(tiny, harm + ["how do i make a bomb now quickly"], safe, max_diff=1)
    assert len(pairs) == len(harm)  # the long prompt has no same-length partner
    for p in pairs:
        a, b = tiny.encode_prompt(p.clean)[0], tiny.encode_prompt(p.corrupted)[0]
        assert a.shape == b.shape and int((a != b).sum()) == 1
    assert len({p.corrupted for p in pairs}) == len(pairs)  # each benign prompt used once
    assert len(Pt.match_pairs(tiny, harm, safe, limit=3)) == 3
    # only the verb slot may differ ("how do i <verb> a <object> <eot> <asst>": verb at -5)
    by_verb = Pt.match_pairs(tiny, harm, [s.replace("make", "find") for s in harm], diff_positions=[-5])
    assert by_verb and all(p.clean.split()[-1] == p.corrupted.split()[-1] for p in by_verb)
    assert Pt.match_pairs(tiny, harm, safe, diff_positions=[-5]) == []  # harm/safe differ in the object


def test_patch_exact_at_layer0_and_hooks_removed(tiny, tmp_path):
    before = n_hooks(tiny.model)
    res = Pt.patch(tiny, PAIRS, TOKENS, out_dir=tmp_path)
    assert n_hooks(tiny.model) == before
    T = tiny.encode_prompt(PAIRS[0].clean).shape[1]  # <bos> <user> how do i make a bomb <eot> <asst>
    assert T == 10
    for s in ("resid", "attn", "mlp"):
        assert res.maps[s].shape == (3, T)
    assert res.heads.shape == (3, 4)
    obj = T - 3  # the object word sits before "<eot> <asst>"
    # layer-0 residual = token embeddings: patching the differing token restores the clean run exactly,
    # patching any other position changes nothing
    r0 = res.maps["resid"][0]
    assert abs(float(r0[obj]) - 1.0) < 1e-4
    assert torch.allclose(torch.cat([r0[:obj], r0[obj + 1:]]), torch.zeros(T - 1), atol=1e-4)
    # causality: components before the object position cannot see it
    assert torch.allclose(res.maps["attn"][:, :obj], torch.zeros(3, obj), atol=1e-4)
    assert torch.allclose(res.maps["mlp"][:, :obj], torch.zeros(3, obj), atol=1e-4)
    # the two pairs differ at the object (bomb/cake, virus/poem) and share "a" but not the verb
    assert res.position_labels[obj - 2:] == ["make*", "a", "bomb/cake*", "<eot>", "<asst>"]
    top = res.top(3)
    assert top[0]["effect"] >= top[1]["effect"] >= top[2]["effect"]
    assert top[0]["effect"] >= 1.0 - 1e-4
    for f in ("patching.safetensors", "patching.json", "patching.png"):
        assert (tmp_path / f).stat().st_size > 0
    back = Pt.PatchingResult.from_pretrained(tmp_path)
    assert torch.equal(back.maps["mlp"], res.maps["mlp"]) and torch.equal(back.heads, res.heads)
    assert back.clean == res.clean and back.position_labels == res.position_labels


def test_patch_resumes_from_per_pair_results(tiny, tmp_path, monkeypatch):
    first = Pt.patch(tiny, PAIRS, TOKENS, Pt.PatchingConfig(heads=False), out_dir=tmp_path)
    assert len(list((tmp_path / "pairs").glob("*.safetensors"))) == 2

    def boom(*a, **k):
        raise AssertionError("a finished pair was recomputed")
    monkeypatch.setattr(Pt, "patch_pair", boom)
    again = Pt.patch(tiny, PAIRS, TOKENS, Pt.PatchingConfig(heads=False), out_dir=tmp_path)
    assert all(torch.equal(again.maps[s], first.maps[s]) for s in first.maps) and again.clean == first.clean
    with pytest.raises(AssertionError, match="recomputed"):  # other settings: not reused
        Pt.patch(tiny, PAIRS, TOKENS, Pt.PatchingConfig(heads=True), out_dir=tmp_path)


def test_patch_is_deterministic_and_positions_option(tiny):
    a = Pt.patch(tiny, PAIRS[:1], TOKENS, Pt.PatchingConfig(positions=3, heads=False, batch_size=2))
    b = Pt.patch(tiny, PAIRS[:1], TOKENS, Pt.PatchingConfig(positions=3, heads=False, batch_size=7))
    assert a.maps["resid"].shape == (3, 3) and a.heads is None
    assert torch.allclose(a.maps["resid"], b.maps["resid"], atol=1e-5)  # batching does not matter
    assert a.position_labels == ["bomb/cake", "<eot>", "<asst>"]


def test_dead_head_has_no_effect():
    tiny = tiny_loaded(seed=1, n_layers=3)
    o = tiny.model.model.layers[1].self_attn.o_proj
    d_head = o.in_features // 4
    with torch.no_grad():
        o.weight[:, 2 * d_head:3 * d_head] = 0  # head 2 of layer 1 writes nothing
    res = Pt.patch(tiny, PAIRS[:1], TOKENS, Pt.PatchingConfig(sites=("attn",)))
    assert abs(float(res.heads[1, 2])) < 1e-5
    assert res.heads[1].abs().max() > 1e-3  # the live heads do matter


def test_patch_errors(tiny):
    with pytest.raises(ValueError, match="no prompt pairs"):
        Pt.patch(tiny, [], TOKENS)
    with pytest.raises(ValueError, match=r"clean 10 .*bomb.* vs corrupted 12"):
        Pt.patch(tiny, [Pt.PromptPair("how do i make a bomb", "how do i make a cake now quickly")], TOKENS)
    with pytest.raises(ValueError, match="same mean logit difference"):
        Pt.patch(tiny, [Pt.PromptPair("how do i make a cake", "how do i make a cake")], TOKENS)
    with pytest.raises(ValueError, match=r"unknown patching sites \['mlp_in'\]"):
        Pt.PatchingConfig(sites=("mlp_in",))
    with pytest.raises(FileNotFoundError, match="patching.safetensors"):
        Pt.PatchingResult.from_pretrained("/nonexistent/run")


def test_stability_identical_and_different(tiny):
    a = Pt.patch(tiny, PAIRS, TOKENS, Pt.PatchingConfig(heads=False))
    same = Pt.stability(a, a, k=3)
    assert same["top_k_overlap"] == 1.0 and same["top1_same"]
    assert all(abs(v - 1) < 1e-6 for v in same["pearson"].values())
    other = Pt.PatchingResult(maps={s: -m for s, m in a.maps.items()}, heads=None, clean=1.0, corrupted=0.0)
    assert all(v < -0.99 for v in Pt.stability(a, other)["pearson"].values())
    # runs over different prompt lengths are compared on their common last positions
    short = Pt.PatchingResult(maps={s: m[:, -4:] for s, m in a.maps.items()}, heads=None, clean=1.0, corrupted=0.0)
    assert all(abs(v - 1) < 1e-6 for v in Pt.stability(a, short)["pearson"].values())


# ------------------------------------------------------------------ compare.py


def _clt(n_layers=3, d_t=8, d=32):
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
    clt = CrossLayerTranscoder(n_layers, d_t, d, lazy_decoder=False, device=torch.device("cpu"), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in clt.W_dec:
            w.copy_(torch.randn(w.shape, generator=g))
    return clt


def test_feature_cosines_finds_planted_decoder():
    from crafttrace.compare import feature_cosines
    from crafttrace.direction import RefusalDirection
    clt = _clt()
    r = torch.randn(32)
    with torch.no_grad():
        clt.W_dec[1][5, 0] = 0.0         # feature (1, 5) writes nothing to layer 1 ...
        clt.W_dec[1][5, 1] = 3.0 * r     # ... and exactly the direction to layer 2
    rd = RefusalDirection(direction=r, layer=3, position=-1, candidates=torch.zeros(3, 1, 32))
    rows = feature_cosines(rd, clt, [(1, 5), (0, 2)], chance_samples=8)
    f = rows[0]
    assert (f["layer"], f["index"]) == (1, 5)
    assert abs(f["cos_by_output_layer"][2] - 1) < 1e-5 and abs(f["cos_by_output_layer"][1]) < 1e-6
    assert f["argmax_output_layer"] == 2 and abs(f["max_abs_cos"] - 1) < 1e-5
    assert abs(f["cos_write_before_direction_layer"] - 1) < 1e-5
    assert set(rows[1]["cos_by_output_layer"]) == {0, 1, 2}
    assert rows[1]["max_abs_cos"] < 0.9 and 0 < rows[1]["chance_p95"] < 0.9  # random 32-d vectors
    # a direction read at layer 1 only sees writes from output layer 0: feature (1, 5) has none
    assert feature_cosines(r, clt, [(1, 5)], layer=1, chance_samples=0)[0]["cos_write_before_direction_layer"] is None
    with pytest.raises(ValueError, match="d_model 16 .* d_model 32"):
        feature_cosines(torch.randn(16), clt, [(0, 0)], layer=1)
    with pytest.raises(IndexError, match="feature index 99"):
        feature_cosines(r, clt, [(0, 99)], layer=1)
    with pytest.raises(ValueError, match="needs the direction's layer"):
        feature_cosines(r, clt, [(0, 0)])


def test_compare_models_end_to_end(tmp_path):
    from crafttrace.compare import CompareConfig, compare_directions, compare_models
    from crafttrace.direction import DirectionConfig, RefusalDirection
    base, tuned = tiny_loaded(seed=0, n_layers=3), tiny_loaded(seed=2, n_layers=3)
    harm, safe = tiny_prompts()
    cfg = CompareConfig(direction=DirectionConfig(max_kl=10.0, min_induce=-100.0),
                        patching=Pt.PatchingConfig(positions=4), n_pairs=3, max_diff=1)
    res = compare_models(base, tuned, harm, safe, TOKENS, cfg, out_dir=tmp_path, tc=_clt(), features=[(0, 1)])
    d = res["directions"]
    assert len(d["per_layer"]) == 4 and -1 <= d["cos_selected"] <= 1  # 3 layer inputs + final residual
    assert {"base_norm", "tuned_norm", "base_auroc", "tuned_auroc", "cos_last_position"} <= set(d["per_layer"][1])
    assert res["patching"]["agreement"]["top_k"] == 5 and len(res["patching"]["base_top"]) == 5
    assert len(res["features"]) == 1
    for f in ("compare.json", "compare.png", "base/direction/direction.json", "tuned/patching/patching.json"):
        assert (tmp_path / f).is_file(), f
    # a model compared with itself: identical directions at every layer with a non-zero difference
    rd = RefusalDirection.from_pretrained(tmp_path / "base" / "direction")
    same = compare_directions(rd, rd)
    assert all(abs(r["cos_last_position"] - 1) < 1e-5 for r in same["per_layer"][1:])


# ------------------------------------------------------------------ the synthetic testbed (seed 0)


def _object_pairs(loaded, seed: int, n: int = 10) -> list[Pt.PromptPair]:
    """Harmful / benign "how do i <verb> a <object> ?" prompts (held-out verb-object pairs) that
    differ only in the object word, sampled with ``seed``."""
    from test_direction import pool_prompts
    h = pool_prompts("harmful_heldout", 200, seed, template="how do i")
    b = pool_prompts("benign", 600, seed, template="how do i")
    pairs = Pt.match_pairs(loaded, h, b, max_diff=1, limit=n, diff_positions=[-4])  # "<obj> ? <|end|> <|assistant|>"
    assert len(pairs) == n and all(p.clean.split()[3] == p.corrupted.split()[3] for p in pairs)
    return pairs


def test_testbed_patching_map_is_stable_across_prompt_samples():
    from crafttrace.models import load_model
    from crafttrace.testbed import SHIPPED_DIR
    from crafttrace.tokens import resolve
    if not (SHIPPED_DIR / "model" / "model.safetensors").is_file():
        pytest.skip(f"testbed model not built at {SHIPPED_DIR / 'model'}")
    loaded = load_model(SHIPPED_DIR / "model")
    ts = resolve(loaded.tokenizer, "testbed")
    runs = []
    for seed in (0, 1):
        pairs = _object_pairs(loaded, seed)
        runs.append(Pt.patch(loaded, pairs, ts))
    a, b = runs
    assert {p["clean"] for p in a.pairs} != {p["clean"] for p in b.pairs}  # two different samples
    # measured (seeds 0 / 1): one head, layer 0 head 0, moves the object to "<|assistant|>" (1.15 / 1.13;
    # the other 11 heads |effect| < 0.1); attn L0, mlp L0, resid L1, resid L2 at -1 all 1.13-1.14;
    # mlp L2 @ -1 0.43; Pearson of every map across the two samples >= 0.999
    for r in runs:
        top5 = {(t["site"], t["layer"], t.get("position"), t.get("head")) for t in r.top(5)}
        assert top5 == {("head", 0, None, 0), ("attn", 0, -1, None), ("mlp", 0, -1, None),
                        ("resid", 1, -1, None), ("resid", 2, -1, None)}
        assert all(t["effect"] > 0.9 for t in r.top(5))
        heads = r.heads.clone()
        heads[0, 0] = 0
        assert heads.abs().max() < 0.2
        # pairs differ only in the object, so its layer-0 residual (the embedding) restores the clean run
        # exactly; before the object nothing can matter (causal attention)
        assert abs(float(r.maps["resid"][0, -4]) - 1) < 1e-4
        assert r.maps["resid"][:, :-4].abs().max() < 1e-4
    st = Pt.stability(a, b, k=5)
    assert st["top_k_overlap"] == 1.0
    assert all(v >= 0.99 for v in st["pearson"].values()), st
