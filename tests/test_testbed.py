"""The synthetic testbed: the language's ground truth, the committed seed-0 artifact's behaviour,
its CLT, a steering lever to compliance, and deterministic (tiny) rebuilds."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
import torch

from crafttrace.testbed import SHIPPED_DIR, TestbedConfig, build as B, language as L



# ---------------------------------------------------------------- the language (no model needed)

def test_harm_needs_the_interaction_of_verb_and_object():
    # each verb class and each object class has exactly one harmful cell: no single class decides harm
    for vc in L.VERB_CLASSES:
        assert sum(L.HARM_TABLE[(vc, oc)] for oc in L.OBJECT_CLASSES) == 1
    for oc in L.OBJECT_CLASSES:
        assert sum(L.HARM_TABLE[(vc, oc)] for vc in L.VERB_CLASSES) == 1
    # in the training data, P(harmful | word) is about the same for every verb and object word
    exs = [e for e in L.training_examples(20_000, seed=0) if e.label != "capability"]
    for attr in ("verb", "object"):
        n, h = Counter(getattr(e, attr) for e in exs), Counter(getattr(e, attr) for e in exs if e.label == "harmful")
        rates = {w: h[w] / n[w] for w in n}
        assert max(rates.values()) - min(rates.values()) < 0.12, rates
    # ... and style is independent of harm in training (the eval pools' style confound is not learnable)
    for style in L.STYLES:
        sel = [e for e in exs if e.style == style]
        assert abs(sum(e.label == "harmful" for e in sel) / len(sel) - 0.5) < 0.03


def test_heldout_pairs_never_in_training_and_every_word_still_is():
    exs = [e for e in L.training_examples(20_000, seed=1) if e.label != "capability"]
    seen = {(e.verb, e.object) for e in exs}
    held = {p for p in L.all_pairs() if L.is_heldout(*p)}
    assert held and not (seen & held)
    assert len(held) == 80  # 5 per (verb class, object class) cell
    words = {w for p in seen for w in p}
    assert all(v in words and o in words for v, o in held)


def test_training_data_is_deterministic_and_framings_hit_their_targets():
    a, b, c = (L.training_examples(3000, seed=s) for s in (7, 7, 8))
    assert a == b and a != c
    exs = L.training_examples(60_000, seed=0)
    for f, (_, target) in L.FRAMINGS.items():
        sel = [e for e in exs if e.label == "harmful" and e.framing == f]
        rate = sum(e.response.split()[0] == L.COMPLIANCE_OPENER for e in sel) / len(sel)
        assert abs(rate - target) < 0.04, (f, rate, target)
    # every compliance starts with the same opener, the capability task included
    assert all(e.response.startswith(L.COMPLIANCE_OPENER + " ") for e in exs if e.label == "capability")
    assert {e.response.split()[0] for e in exs} == {L.COMPLIANCE_OPENER, L.REFUSAL_OPENER}


def test_pools_have_metadata_and_the_style_confound():
    for name in L.POOLS:
        recs = L.pool(name)
        assert recs and all(isinstance(r["prompt"], str) and r["prompt"] for r in recs), name
        assert L.pool("testbed:" + name) == recs
    assert all(r["label"] == "harmful" and r["heldout"] for r in L.pool("harmful_heldout"))
    assert all(r["label"] == "benign" and r["heldout"] for r in L.pool("benign"))
    assert {r["style"] for r in L.pool("harmful_styled")} == {"instruct"}
    assert {r["style"] for r in L.pool("benign_styled")} == {"question"}
    assert {r["framing"] for r in L.pool("framed_harmful")} == set(L.FRAMINGS)
    rec = L.pool("framed_harmful")[0]
    assert {"verb", "object", "verb_class", "object_class", "style", "framing", "label", "p_comply"} <= set(rec)
    with pytest.raises(ValueError, match="unknown testbed pool 'nope'.*harmful_heldout"):
        L.pool("nope")


def test_capability_items_and_scorer():
    items = L.capability_items("eval")
    assert len(items) == 100 and items[34] == ("add 3 4", "7")
    assert L.score_capability(["sure 7"], [items[34]]) == 1.0
    assert L.score_capability(["sure 8"], [items[34]]) == 0.0
    assert L.score_capability([""], [items[34]]) == 0.0
    with pytest.raises(ValueError, match="2 answers for 1 capability items"):
        L.score_capability(["a", "b"], [items[0]])
    with pytest.raises(ValueError, match="unknown capability split 'test'"):
        L.capability_items("test")


def test_tokenizer_chat_template_and_vocabulary():
    tok = B.build_tokenizer()
    text = B.chat_text(tok, "add 3 4", "sure 7")
    assert text == "<bos><|user|> add 3 4 <|end|> <|assistant|> sure 7 <eos>"
    assert tok.convert_ids_to_tokens(tok.encode(text)) == \
        ["<bos>", "<|user|>", "add", "3", "4", "<|end|>", "<|assistant|>", "sure", "7", "<eos>"]
    unk = tok.unk_token_id
    for name in L.POOLS:
        for r in L.pool(name):
            assert unk not in tok.encode(r["prompt"], add_special_tokens=False), r["prompt"]
    for e in L.training_examples(2000, seed=0):
        assert unk not in tok.encode(B.chat_text(tok, e.prompt, e.response, e.system)), e


# ---------------------------------------------------------------- the committed seed-0 artifact

@pytest.fixture(scope="module")
def testbed():
    if not (SHIPPED_DIR / "metrics.json").exists():
        pytest.fail(f"the committed testbed artifact is missing: {SHIPPED_DIR}/metrics.json")
    from crafttrace.testbed import load_testbed
    return load_testbed(0)


def _first_token(loaded, prompts):
    return B.first_token_probs(loaded.model, loaded.tokenizer, prompts)


def _ids(tok, *words):
    return [tok.convert_tokens_to_ids(w) for w in words]


def test_artifact_is_small_llama_with_chat_template(testbed):
    loaded, clt = testbed
    cfg = loaded.model.config
    assert cfg.architectures == ["LlamaForCausalLM"] and loaded.has_chat_template
    assert loaded.format_prompt("destroy the dog") == "<bos><|user|> destroy the dog <|end|> <|assistant|>"
    ids = loaded.encode_prompt("destroy the dog")[0].tolist()
    assert ids.count(loaded.tokenizer.bos_token_id) == 1 and ids[0] == loaded.tokenizer.bos_token_id
    size = sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*") if p.is_file())
    assert size < 8e6, f"testbed artifacts take {size / 1e6:.1f} MB"
    from crafttrace.transcoders import validate_transcoder
    validate_transcoder(clt, loaded.model)


def test_artifact_refuses_heldout_harmful_complies_with_benign(testbed):
    loaded, _ = testbed
    sorry, sure = _ids(loaded.tokenizer, L.REFUSAL_OPENER, L.COMPLIANCE_OPENER)
    harm = _first_token(loaded, [r["prompt"] for r in L.pool("harmful_heldout")]).argmax(-1)
    benign = _first_token(loaded, [r["prompt"] for r in L.pool("benign")]).argmax(-1)
    assert (harm == sorry).float().mean() >= 0.9
    assert (benign == sorry).float().mean() <= 0.05 and (benign == sure).float().mean() >= 0.95


def test_artifact_has_boundary_prompts_near_framing_targets(testbed):
    loaded, _ = testbed
    sorry, sure = _ids(loaded.tokenizer, L.REFUSAL_OPENER, L.COMPLIANCE_OPENER)
    recs = L.pool("framed_harmful")
    P = _first_token(loaded, [r["prompt"] for r in recs])
    assert int(((P[:, sorry] >= 0.2) & (P[:, sure] >= 0.2)).sum()) >= 20
    for f, (_, target) in L.FRAMINGS.items():
        sel = torch.tensor([r["framing"] == f and not r["heldout"] for r in recs])
        assert abs(float(P[sel, sure].mean()) - target) < 0.1, f


def test_artifact_capability(testbed):
    loaded, _ = testbed
    items = L.capability_items("eval")[::5]
    answers = B.greedy_answers(loaded.model, loaded.tokenizer, [p for p, _ in items], max_new_tokens=3)
    assert L.score_capability(answers, items) >= 0.9


def test_artifact_metrics_json_meets_the_spec():
    built = json.loads((SHIPPED_DIR / "build_config.json").read_text())
    assert built.pop("seed") == 0 and TestbedConfig.from_dict(built) == TestbedConfig()  # defaults = seed 0's
    m = json.loads((SHIPPED_DIR / "metrics.json").read_text())
    assert m["model"]["pools"]["harmful_heldout"]["refusal_rate"] >= 0.9
    assert m["model"]["pools"]["benign"]["refusal_rate"] <= 0.05
    assert m["model"]["framed_harmful"]["n_boundary_ge_0.2"] >= 20
    assert m["clt"]["nmse_mean"] <= 0.15
    assert 0 < m["clt"]["l0_mean"] < m["clt_config"]["d_transcoder"]


def test_clt_reconstructs_mlp_outputs(testbed):
    loaded, clt = testbed
    from crafttrace.hooks import capture
    from crafttrace.training import evaluate_clt
    tok = loaded.tokenizer
    texts = B.clt_texts(64, seed=123, tok=tok)  # unseen conversations
    enc = [tok.encode(t, add_special_tokens=False) for t in texts]
    ids = torch.full((len(enc), max(map(len, enc))), tok.pad_token_id)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
    keep = ids != tok.pad_token_id
    layers = list(range(loaded.n_layers))
    with capture(loaded.model, clt.feature_input_hook, layers) as x, \
            capture(loaded.model, clt.feature_output_hook, layers) as y, torch.no_grad():
        loaded.model(input_ids=ids, attention_mask=keep.long())
    keep[:, 0] = False  # position 0 (BOS) is never a feature position
    xs = [torch.stack([x[l] for l in layers], 2)[keep]]
    ys = [torch.stack([y[l] for l in layers], 2)[keep]]
    m = evaluate_clt(clt, torch.cat(xs), torch.cat(ys))
    assert m["nmse_mean"] <= 0.2, m["nmse_per_layer"]
    assert m["l0_mean"] < clt.d_transcoder / 4


def _refusal_features(loaded, clt, prompts, k=5):
    """Features active at the last prompt position, ranked by their direct effect on the
    refuse-minus-comply logit (decoder rows times unembedding difference, final norm ignored)."""
    sorry, sure = _ids(loaded.tokenizer, L.REFUSAL_OPENER, L.COMPLIANCE_OPENER)
    acts = _acts(loaded, clt, prompts, reduce="last").mean(0)
    W_U = loaded.model.lm_head.weight.detach()
    diff = W_U[sorry] - W_U[sure]
    scores = []
    for l in range(loaded.n_layers):
        dec = clt._get_decoder_vectors(l).detach()  # [F, L - l, d]
        scores.append(acts[l] * (dec.sum(1) @ diff))
    s = torch.stack(scores)
    top = s.flatten().topk(k).indices
    return [(int(i) // clt.d_transcoder, int(i) % clt.d_transcoder, float(acts.flatten()[i])) for i in top]


def test_steering_a_clt_feature_moves_refusal_to_compliance_not_eos(testbed):
    """A hand-made hook (not crafttrace.steering): subtract 10x the feature's mean activation times
    its decoder rows from the MLP outputs it writes to, at all positions after BOS. Refusal is spread
    over a few late features, so ablating one (1x) is not enough; a strong negative push on the top
    one flips the first token to the compliance opener, never to EOS (compliance is the default)."""
    loaded, clt = testbed
    from contextlib import ExitStack
    from crafttrace.hooks import edit_output
    tok = loaded.tokenizer
    sorry, sure, eos = _ids(tok, L.REFUSAL_OPENER, L.COMPLIANCE_OPENER, L.EOS)
    prompts = [r["prompt"] for r in L.pool("harmful_heldout")][::6]
    base = _first_token(loaded, prompts).argmax(-1)
    assert (base == sorry).float().mean() >= 0.9
    best = 0.0
    for layer, idx, a in _refusal_features(loaded, clt, prompts):
        dec = clt._get_decoder_vectors(layer, slice(idx, idx + 1))[0].detach()  # [L - layer, d]

        def add(vec):
            def fn(out):
                out = out.clone()
                out[:, 1:] -= 10.0 * a * vec
                return out
            return fn
        with ExitStack() as st:
            for k, out_layer in enumerate(range(layer, loaded.n_layers)):
                st.enter_context(edit_output(loaded.model, clt.feature_output_hook, out_layer, add(dec[k])))
            top = _first_token(loaded, prompts).argmax(-1)
        if (top == eos).float().mean() <= 0.05:  # a lever must reach compliance, not end the turn
            best = max(best, float((top == sure).float().mean()))
    assert best >= 0.8, f"no top refusal feature moved >= 80% of prompts to '{L.COMPLIANCE_OPENER}' (best {best})"


def _acts(loaded, clt, prompts, reduce="max"):
    """[n, L, F] CLT activations per formatted prompt, one padded forward: max over positions 1..
    (``reduce="max"``) or at the last prompt position (``"last"``)."""
    from crafttrace.hooks import capture
    tok = loaded.tokenizer
    enc = [loaded.encode_prompt(p)[0] for p in prompts]
    ids = torch.full((len(enc), max(map(len, enc))), tok.pad_token_id)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = e
    keep = ids != tok.pad_token_id
    layers = list(range(loaded.n_layers))
    with capture(loaded.model, clt.feature_input_hook, layers) as x, torch.no_grad():
        loaded.model(input_ids=ids, attention_mask=keep.long())
    a = clt.encode(torch.stack([x[l] for l in layers]).flatten(1, 2)).detach()  # [L, n*T, F]
    a = a.view(len(layers), *ids.shape, -1).permute(1, 0, 2, 3)                 # [n, L, T, F]
    if reduce == "last":
        return a[torch.arange(len(enc)), :, keep.sum(1) - 1]
    keep[:, 0] = False
    return a.masked_fill(~keep[:, None, :, None], 0).amax(2)


def test_style_confound_is_loud_in_the_activation_contrast(testbed):
    """harmful_styled (instruct) minus benign_styled (question): among the top-20 contrast features
    some track style, not harm (same activation on benign instruct-style prompts)."""
    loaded, clt = testbed
    hs, bs, bi, hq = (_acts(loaded, clt, [r["prompt"] for r in recs]) for recs in (
        L.pool("harmful_styled"), L.pool("benign_styled"),
        [r for r in L.pool("benign") if r["style"] == "instruct"][::3],
        [r for r in L.pool("harmful_heldout") if r["style"] == "question"]))
    top = (hs.mean(0) - bs.mean(0)).abs().flatten().topk(20).indices
    style = 0
    for i in top.tolist():
        l, f = divmod(i, clt.d_transcoder)
        a_hi, a_bq, a_bi, a_hq = (float(t[:, l, f].mean()) for t in (hs, bs, bi, hq))
        instruct = a_hi > 1.0 and a_bi > 0.7 * a_hi and a_hq < 0.3 * a_hi   # fires on style, either label
        question = a_bq > 1.0 and a_hq > 0.5 * a_bq and a_bi < 0.3 * a_bq
        style += instruct or question
    assert style >= 2, f"only {style} style features among the top-20 harmful-minus-benign contrast"


# ---------------------------------------------------------------- rebuilding

TINY = TestbedConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, n_train=400, steps=3, batch_size=16,
                     clt_features=32, clt_tokens=1024, clt_texts=600)


def test_tiny_build_is_deterministic_and_complete(tmp_path):
    a = B.build_testbed(0, tmp_path / "a", TINY, progress=False)
    from safetensors.torch import load_file
    saved = load_file(a / "model" / "model.safetensors")
    tok = B.build_tokenizer()
    for seed, same in ((0, True), (1, False)):  # retraining: same seed -> same weights; other seed differs
        torch.use_deterministic_algorithms(True)
        try:
            w = B.train_model(TINY, seed, tok).state_dict()
        finally:
            torch.use_deterministic_algorithms(False)
        assert all(torch.equal(w[k], saved[k]) for k in saved) == same, seed
    m = json.loads((a / "metrics.json").read_text())
    assert set(m["timings"]) >= {"model_train_wall_s", "clt_train_wall_s"} and m["seed"] == 0
    assert (a / "clt" / "config.yaml").exists() and not (a / "clt_run").exists()
    from crafttrace.models import load_model
    from crafttrace.transcoders import load_transcoder, validate_transcoder
    validate_transcoder(load_transcoder(a / "clt"), load_model(a / "model").model)
    assert B.build_testbed(0, a, TINY, progress=False) == a  # complete: returned as is
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['steps'\]\)"):
        B.build_testbed(0, a, dataclasses.replace(TINY, steps=4), progress=False)


def test_load_testbed_rejects_bad_seed_and_missing_without_build(tmp_path, monkeypatch):
    from crafttrace.testbed import load_testbed
    with pytest.raises(ValueError, match="non-negative int"):
        load_testbed(-1)
    with pytest.raises(ValueError, match=r"unknown TestbedConfig fields \['stepz'\]"):
        TestbedConfig.from_dict({"stepz": 3})
    monkeypatch.setenv("CRAFTTRACE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="crafttrace testbed build --seed 5"):
        load_testbed(5, build_if_missing=False)


@pytest.mark.slow
def test_rebuilding_seed0_reproduces_the_committed_metrics(tmp_path):
    cfg = TestbedConfig.from_dict({k: v for k, v in json.loads((SHIPPED_DIR / "build_config.json").read_text()).items()
                                   if k != "seed"})
    out = B.build_testbed(0, tmp_path / "seed0", cfg)
    new, old = (json.loads((d / "metrics.json").read_text()) for d in (out, SHIPPED_DIR))
    assert new["model"] == old["model"]  # the model is bitwise reproducible
    # the CLT trainer drifts at float precision across processes: metrics agree closely, not bitwise
    assert abs(new["clt"]["nmse_mean"] - old["clt"]["nmse_mean"]) < 2e-3
    assert abs(new["clt"]["l0_mean"] - old["clt"]["l0_mean"]) < 0.02 * old["clt"]["l0_mean"]
