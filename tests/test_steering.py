"""Steering hooks on a tiny random Llama + random jump-ReLU CLT built here (no files, no hub)."""

import pytest
import torch
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
from circuit_tracer.transcoder.activation_functions import JumpReLU
from transformers import LlamaConfig, LlamaForCausalLM

from crafttrace.hooks import capture
from crafttrace.steering import (FeatureSteer, feature_activations, steer, strength_sweep,
                                 typical_activation)

L, D, DT, V = 3, 32, 16, 61


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, architectures=["LlamaForCausalLM"],
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def clt():
    torch.manual_seed(1)
    tc = CrossLayerTranscoder(L, DT, D, activation_function="jump_relu", lazy_decoder=False,
                              device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        tc.W_enc.normal_(0, 1.0)
        tc.b_enc.normal_(0, 0.2)
        tc.b_enc[:, 5] = -1e4  # feature 5 never fires
        tc.activation_function.threshold.uniform_(0.0, 0.3)
        for w in tc.W_dec:
            w.normal_(0, 0.5)
    return tc


def ids(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, V, (1, n), generator=g)
    x[0, 0] = 1
    return x


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_noop_edits_leave_logits_bit_identical(model, clt):
    x = ids()
    base = logits(model, x)
    with steer(model, clt, [FeatureSteer(1, 3, "scale", 1.0), FeatureSteer(0, 5, "clamp", 0.0)]):
        assert torch.equal(logits(model, x), base)
    with steer(model, clt, [FeatureSteer(1, 3, "clamp", 4.0)]):
        assert not torch.allclose(logits(model, x), base)


def test_clamp_adds_exactly_target_minus_a_times_decoder(model, clt):
    layer, index, target = 1, 3, 2.5
    x = ids()
    # capture entered before steer sees the raw MLP output, the one entered after sees the edit.
    with capture(model, "hook_mlp_out", list(range(L))) as raw, \
            steer(model, clt, [FeatureSteer(layer, index, "clamp", target)]), \
            capture(model, "hook_mlp_out", list(range(L))) as edited, \
            capture(model, "hook_resid_mid", [layer]) as resid:
        model(x)
    pre = resid[layer][0] @ clt.W_enc[layer, index] + clt.b_enc[layer, index]
    a = pre * (pre > clt.activation_function.threshold[layer, 0, index])
    assert (a[1:] > 0).any(), "fixture should make the feature fire somewhere"
    for k in range(L):
        delta = edited[k][0] - raw[k][0]
        if k < layer:
            assert torch.equal(delta, torch.zeros_like(delta))
            continue
        expect = (target - a)[:, None] * clt.W_dec[layer][index, k - layer]
        expect[0] = 0  # BOS position is never steered
        torch.testing.assert_close(delta, expect, atol=1e-5, rtol=1e-4)


def test_scale_zero_ablates_only_where_active(model, clt):
    layer, index = 2, 7
    x = ids(12, seed=3)
    a = feature_activations(model, clt, layer, [index], x)[:, 0]
    with capture(model, "hook_mlp_out", [layer]) as raw, \
            steer(model, clt, [FeatureSteer(layer, index, "scale", 0.0)]), \
            capture(model, "hook_mlp_out", [layer]) as edited:
        model(x)
    expect = -a[:, None] * clt.W_dec[layer][index, 0]
    torch.testing.assert_close(edited[layer][0] - raw[layer][0], expect, atol=1e-5, rtol=1e-4)


def test_generate_with_kv_cache_matches_no_cache(model, clt):
    x = ids(7, seed=5)
    spec = [FeatureSteer(0, 2, "clamp", -3.0), FeatureSteer(1, 3, "scale", 4.0)]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    plain = model.generate(x, **kw)
    with steer(model, clt, spec):
        cached = model.generate(x, use_cache=True, **kw)
        uncached = model.generate(x, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain), "steering should change this random model's greedy output"


def test_left_padded_batch_matches_single_prompts(model, clt):
    a, b = ids(5, seed=7)[0], ids(9, seed=8)[0]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    batch[0, 4:], mask[0, 4:] = a, 1
    batch[1], mask[1] = b, 1
    spec = [FeatureSteer(1, 3, "clamp", 3.0)]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with steer(model, clt, spec):
        both = model.generate(batch, attention_mask=mask, **kw)[:, 9:]
        one_a = model.generate(a[None], attention_mask=torch.ones(1, 5, dtype=torch.long), **kw)[:, 5:]
        one_b = model.generate(b[None], attention_mask=torch.ones(1, 9, dtype=torch.long), **kw)[:, 9:]
    assert torch.equal(both[0], one_a[0]) and torch.equal(both[1], one_b[0])


def test_hooks_removed_after_exception(model, clt):
    before, x = n_hooks(model), ids()
    base = logits(model, x)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, clt, [FeatureSteer(1, 3, "clamp", 9.0)]):
            assert n_hooks(model) > before
            raise RuntimeError("boom")
    assert n_hooks(model) == before
    assert torch.equal(logits(model, x), base)


def test_bad_specs_give_clear_errors(model, clt):
    with pytest.raises(IndexError, match="d_transcoder=16"):
        with steer(model, clt, [FeatureSteer(0, 16)]):
            pass
    with pytest.raises(IndexError, match="n_layers=3"):
        with steer(model, clt, [FeatureSteer(3, 0)]):
            pass
    with pytest.raises(ValueError, match="mode"):
        FeatureSteer(0, 0, "add", 1.0)
    other = CrossLayerTranscoder(L, DT, D + 1, activation_function="relu", lazy_decoder=False,
                                 device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match=f"d_model={D + 1}.*hidden_size={D}"):
        with steer(model, other, [FeatureSteer(0, 0)]):
            pass
    assert n_hooks(model) == 0


def test_typical_activation_and_sweep(model, clt):
    prompts = [ids(10, seed=s) for s in range(3)]
    acts = torch.cat([feature_activations(model, clt, 1, [3], p)[:, 0] for p in prompts])
    t = typical_activation(model, clt, 1, 3, prompts)
    assert t == pytest.approx(float(acts[acts > 0].mean()), rel=1e-6)
    with pytest.raises(ValueError, match="never active"):
        typical_activation(model, clt, 0, 5, prompts)
    sweep = strength_sweep(1, 3, [-2.0, 0.0, 1.0], t)
    assert [s.value for s in sweep] == pytest.approx([-2 * t, 0.0, t])


def test_transcoder_set_writes_only_its_own_layer(model):
    torch.manual_seed(2)
    subs = {}
    for l in range(L):
        t = SingleLayerTranscoder(D, DT, JumpReLU(torch.zeros(DT)), l, device=torch.device("cpu"),
                                  dtype=torch.float32)
        with torch.no_grad():
            t.W_enc.normal_(0, 1.0)
            t.W_dec.normal_(0, 0.5)
        subs[l] = t
    plt = TranscoderSet(subs, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out")
    x = ids()
    with capture(model, "hook_mlp_out", list(range(L))) as raw, \
            steer(model, plt, [FeatureSteer(1, 4, "clamp", 2.0)]), \
            capture(model, "hook_mlp_out", list(range(L))) as edited, \
            capture(model, "mlp.hook_in", [1]) as mlp_in:
        model(x)
    a = torch.relu(mlp_in[1][0] @ subs[1].W_enc[4] + subs[1].b_enc[4])  # threshold 0
    expect = (2.0 - a)[:, None] * subs[1].W_dec[4]
    expect[0] = 0
    torch.testing.assert_close(edited[1][0] - raw[1][0], expect, atol=1e-5, rtol=1e-4)
    for k in (0, 2):  # a per-layer transcoder writes to its own layer only
        assert torch.equal(edited[k][0], raw[k][0])


def test_lazy_clt_loaded_from_disk_steers_like_the_eager_one(model, clt, tmp_path):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    clt.to_safetensors(str(tmp_path))
    lazy = load_clt(str(tmp_path), lazy_decoder=True, lazy_encoder=True, device=torch.device("cpu"),
                    dtype=torch.float32)
    x, spec = ids(11, seed=4), [FeatureSteer(0, 9, "clamp", -2.0), FeatureSteer(1, 3, "scale", 3.0)]
    with steer(model, clt, spec):
        eager_logits = logits(model, x)
    with steer(model, lazy, spec):
        assert torch.equal(logits(model, x), eager_logits)
