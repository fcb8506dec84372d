"""CLT training: sparse decode == dense reference, loss falls, exact resume, saved CLT matches metrics."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from crafttrace.training import (
    ActivationStream, CLTModel, CLTTrainConfig, calibrate_topk_thresholds, read_texts, train_clt,
)
from crafttrace.transcoders import load_transcoder

DATA = Path(os.environ.get("CRAFTTRACE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CORPUS = DATA / "text" / "corpus.jsonl"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: with several threads on a busy machine OpenMP spin-waits cost more than the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    if not CORPUS.exists():
        pytest.skip(f"text corpus not found at {CORPUS} (set CRAFTTRACE_DATA)")
    return read_texts(CORPUS, limit=600)


@pytest.fixture(scope="module")
def tiny(texts):
    """A 3-layer random Llama (d_model 32) with a word-level tokenizer built from the corpus (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=500, special_tokens=["[UNK]", "<s>", "<pad>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    cfg.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(cfg).eval(), hf_tok


def small_cfg(**kw) -> CLTTrainConfig:
    base = dict(d_transcoder=64, activation="topk", k=4, batch_tokens=128, chunk_tokens=512, total_tokens=128 * 40,
                context_length=32, collect_batch_size=8, eval_tokens=512, checkpoint_every=10, lr=3e-3,
                lr_warmup_steps=5, log_every=5)
    base.update(kw)
    return CLTTrainConfig(**base)


# ------------------------------------------------------------------------------------------ sparse == dense

@pytest.mark.parametrize("activation,preact,topk_grad", [("topk", 0.0, "relu"), ("topk", 0.0, "straight_through"),
                                                         ("jumprelu", 0.0, "relu"), ("jumprelu", 1e-2, "relu")])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_sparse_decode_matches_dense_reference(activation, preact, topk_grad, sparse_grad):
    """Loss and every gradient agree; covers the sparse encoder backward (TopK, JumpReLU without the dense
    pre-activation penalty) and the dense encoder one (with it)."""
    torch.manual_seed(0)
    cfg = CLTTrainConfig(d_transcoder=48, activation=activation, k=5, bandwidth=0.5, preact_coef=preact,
                         topk_grad=topk_grad)
    model = CLTModel(n_layers=3, d_model=16, cfg=cfg)
    with torch.no_grad():
        model.log_threshold.fill_(-0.5)  # some features active, some inside the STE window
    x, y = torch.randn(40, 3, 16), torch.randn(40, 3, 16)
    results = []
    for sparse in (True, False):
        model.zero_grad(set_to_none=True)
        loss, info = model.loss(x, y, lam=0.3, sparse=sparse, sparse_grad=sparse_grad and sparse)
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            g = torch.zeros_like(p) if p.grad is None else p.grad
            grads[name] = g.to_dense() if g.is_sparse else g.clone()
        results.append((loss.detach(), info, grads))
        if sparse:
            dec_grad_sparse = model.W_dec[0].grad.is_sparse
    (ls, info_s, gs), (ld, info_d, gd) = results
    assert 0 < info_s["l0"] < 48
    torch.testing.assert_close(ls, ld, rtol=1e-5, atol=1e-6)
    assert info_s["l0"] == pytest.approx(info_d["l0"])
    for name in gd:
        torch.testing.assert_close(gs[name], gd[name], rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    if activation == "jumprelu":
        assert gd["log_threshold"].abs().sum() > 0  # the straight-through estimator is exercised
    assert dec_grad_sparse == sparse_grad


@pytest.mark.parametrize("sparse", [True, False])
def test_topk_straight_through_revives_selected_negative_features(sparse):
    """A selected feature with pre < 0 gets no encoder gradient under "relu" and one under "straight_through";
    the forward pass (loss) is the same."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 2, 6), torch.randn(5, 2, 6)
    losses, grads = [], []
    for mode in ("relu", "straight_through"):
        cfg = CLTTrainConfig(d_transcoder=8, activation="topk", k=4, topk_grad=mode)
        model = CLTModel(n_layers=2, d_model=6, cfg=cfg)
        with torch.no_grad():
            model.b_enc.fill_(-10.0)   # every pre-activation negative: all k selected features are silent
        loss, info = model.loss(x, y, lam=0.0, sparse=sparse)
        loss.backward()
        assert info["l0"] == 0
        losses.append(loss.detach())
        grads.append(model.b_enc.grad.abs().sum().item())
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0] == 0 and grads[1] > 0


def test_topk_grad_validated_and_inert_at_default():
    with pytest.raises(ValueError, match="topk_grad"):
        CLTTrainConfig(topk_grad="ste")
    assert "topk_grad" not in CLTTrainConfig().identity_dict()
    assert CLTTrainConfig(topk_grad="straight_through").identity_dict()["topk_grad"] == "straight_through"


# ------------------------------------------------------------------------------------------ training

def test_train_topk_loss_falls_and_saved_clt_matches_metrics(tiny, texts, tmp_path):
    cfg = small_cfg()
    res = train_clt(tiny, texts, cfg, tmp_path / "run", progress=False)
    m = res.metrics
    assert m["finished"] and m["step"] == cfg.total_steps
    hist = [h["loss"] for h in m["history"]]
    assert hist[-1] < 0.7 * hist[0], hist
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["nmse_mean"] == pytest.approx(m["nmse_mean"])
    assert CLTTrainConfig.from_pretrained(tmp_path / "run") == cfg

    clt = load_transcoder(res.path)
    assert (clt.n_layers, clt.d_transcoder, clt.d_model) == (3, 64, 32)
    assert clt.feature_input_hook == "hook_resid_mid" and clt.feature_output_hook == "hook_mlp_out"
    # independent dense recomputation of the saved model's NMSE on the held-out tokens
    x, y = ActivationStream(tiny[0], tiny[1], texts, cfg).eval_set()
    with torch.no_grad():
        pre = torch.einsum("nld,lfd->nlf", x, clt.W_enc) + clt.b_enc
        acts = pre * (pre > clt.activation_function.threshold.squeeze(1))
        recon = clt.b_dec.expand_as(y).clone()
        for l in range(3):
            recon[:, l:] += torch.einsum("nf,fjd->njd", acts[:, l], clt.W_dec[l])
    nmse = ((recon - y) ** 2).sum((0, 2)) / ((y - y.mean(0)) ** 2).sum((0, 2))
    torch.testing.assert_close(nmse, torch.tensor(m["nmse_per_layer"]), rtol=1e-3, atol=1e-5)
    assert m["nmse_mean"] < 0.9
    l0 = (acts > 0).float().sum(-1).mean(0)
    torch.testing.assert_close(l0, torch.tensor(m["l0_per_layer"]), rtol=1e-4, atol=1e-4)
    # the JumpReLU export keeps TopK's sparsity roughly (calibrated on training tokens, measured held-out)
    assert 0.5 * cfg.k < m["l0_mean"] < 2 * cfg.k
    assert m["nmse_mean"] < m["topk_nmse_mean"] + 0.25


def test_train_jumprelu_export_folds_normalisation(tiny, texts, tmp_path):
    cfg = small_cfg(activation="jumprelu", total_tokens=128 * 30, sparsity_coef=1e-3, threshold_init_l0=8)
    m = train_clt(tiny, texts, cfg, tmp_path / "run", progress=False).metrics
    hist = [h["recon"] for h in m["history"]]
    assert hist[-1] < 0.7 * hist[0], hist
    # NMSE of the saved raw-activation CLT equals the in-memory model's on normalised activations
    assert m["nmse_mean"] == pytest.approx(m["train_model_nmse_mean"], rel=1e-3, abs=1e-5)
    assert 0 < m["l0_mean"] < cfg.d_transcoder


def test_skip_connection_gradients_match_dense_reference():
    torch.manual_seed(0)
    cfg = CLTTrainConfig(d_transcoder=48, activation="topk", k=5, skip_connection=True)
    model = CLTModel(n_layers=3, d_model=16, cfg=cfg)
    with torch.no_grad():
        model.W_skip.normal_(0, 0.1)
    x, y = torch.randn(40, 3, 16), torch.randn(40, 3, 16)
    out = []
    for sparse in (True, False):
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(x, y, lam=0.0, sparse=sparse)
        loss.backward()
        out.append((loss.detach(), model.W_skip.grad.clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)
    assert out[0][1].abs().sum() > 0


def test_skip_connection_trains_exports_and_beats_no_skip(tiny, texts, tmp_path):
    """The skip is exported into circuit-tracer's W_skip with the normalisation folded in (the saved model's
    NMSE equals the in-memory one), survives save/load, and explains variance the sparse features alone miss."""
    runs = {}
    for skip in (False, True):
        cfg = small_cfg(activation="jumprelu", total_tokens=128 * 30, sparsity_coef=1e-3, threshold_init_l0=8,
                        skip_connection=skip)
        runs[skip] = train_clt(tiny, texts, cfg, tmp_path / f"run{skip}", progress=False)
    m = runs[True].metrics
    assert m["nmse_mean"] == pytest.approx(m["train_model_nmse_mean"], rel=1e-3, abs=1e-5)
    assert m["nmse_mean"] < runs[False].metrics["nmse_mean"] - 0.05
    clt = load_transcoder(runs[True].path)
    assert clt.W_skip is not None and clt.W_skip.shape == (3, 32, 32) and clt.W_skip.abs().sum() > 0
    assert load_transcoder(runs[False].path).W_skip is None
    # independent recomputation with circuit-tracer's own reconstruction (which adds input @ W_skip)
    x, y = ActivationStream(tiny[0], tiny[1], texts, CLTTrainConfig.from_pretrained(tmp_path / "runTrue")).eval_set()
    with torch.no_grad():
        pre = torch.einsum("nld,lfd->nlf", x, clt.W_enc) + clt.b_enc
        acts = pre * (pre > clt.activation_function.threshold.squeeze(1))
        recon = clt.b_dec.expand_as(y).clone() + torch.einsum("nld,lde->nle", x, clt.W_skip)
        for l in range(3):
            recon[:, l:] += torch.einsum("nf,fjd->njd", acts[:, l], clt.W_dec[l])
    nmse = ((recon - y) ** 2).sum((0, 2)) / ((y - y.mean(0)) ** 2).sum((0, 2))
    torch.testing.assert_close(nmse, torch.tensor(m["nmse_per_layer"]), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("passes", [1, 2])
def test_resume_reproduces_uninterrupted_run(tiny, texts, tmp_path, passes):
    # 14 steps, 4 batches per chunk pass; with 2 passes the stop at step 6 falls inside a chunk's second pass
    cfg = small_cfg(total_tokens=128 * 14, checkpoint_every=3, chunk_passes=passes)
    full = train_clt(tiny, texts, cfg, tmp_path / "full", progress=False)
    part = train_clt(tiny, texts, cfg, tmp_path / "part", max_steps=6, progress=False)  # stops mid-chunk
    assert part.metrics == {"finished": False, "step": 6, "history": part.metrics["history"]}
    assert not part.path.exists()
    state = json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6
    resumed = train_clt(tiny, texts, cfg, tmp_path / "part", progress=False)
    assert resumed.metrics["step"] == 14
    a, b = load_transcoder(full.path), load_transcoder(resumed.path)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=f"{name} differs after resume")
    assert resumed.metrics["nmse_mean"] == pytest.approx(full.metrics["nmse_mean"], rel=1e-4)
    assert full.metrics["collected_tokens"] == cfg.chunk_tokens * -(-14 // (4 * passes))


def test_chunk_passes_reuse_each_chunk_in_fresh_orders(tiny, texts, monkeypatch):
    import crafttrace.training as T
    seen = []
    real_step = T._Trainer.train_step
    monkeypatch.setattr(T._Trainer, "train_step", lambda self, x, y: seen.append(x.clone()) or real_step(self, x, y))
    cfg = small_cfg(total_tokens=128 * 8, chunk_passes=2)    # one chunk (4 batches), used twice
    train_clt(tiny, texts, cfg, Path(tempfile.mkdtemp()), progress=False)
    first, second = torch.cat(seen[:4]), torch.cat(seen[4:])
    key = lambda t: sorted(map(tuple, t[:, 0, :4].tolist()))  # noqa: E731
    assert key(first) == key(second)                # the same tokens ...
    assert not torch.equal(first, second)           # ... in another order
    with pytest.raises(ValueError, match="chunk_passes must be >= 1"):
        CLTTrainConfig(chunk_passes=0)


def test_resume_with_other_config_is_refused(tiny, texts, tmp_path):
    cfg = small_cfg(total_tokens=128 * 6)
    train_clt(tiny, texts, cfg, tmp_path / "run", max_steps=2, progress=False)
    with pytest.raises(ValueError, match="different config.*d_transcoder"):
        train_clt(tiny, texts, small_cfg(total_tokens=128 * 6, d_transcoder=32), tmp_path / "run", progress=False)


def test_activation_stream_is_deterministic_and_skips_position_zero(tiny, texts):
    cfg = small_cfg()
    stream = ActivationStream(tiny[0], tiny[1], texts, cfg)
    assert stream.prefix == [tiny[1].bos_token_id]
    c2 = next(stream.chunks(2))
    c0 = stream.chunks(0)
    next(c0), next(c0)
    again = next(c0)
    assert c2[0] == again[0] == 2
    assert torch.equal(c2[1], again[1]) and torch.equal(c2[2], again[2])
    assert c2[1].shape == (cfg.chunk_tokens, 3, 32)
    # every BOS position is dropped: the BOS residual is the same vector in every window
    ids = torch.tensor([[tiny[1].bos_token_id, 5]])
    from crafttrace.hooks import capture
    with capture(tiny[0], "hook_resid_mid", [0]) as got, torch.no_grad():
        tiny[0](ids)
    bos_vec = got[0][0, 0]
    assert not (c2[1][:, 0] - bos_vec).abs().amax(-1).lt(1e-6).any()


def test_topk_threshold_calibration_matches_firing_rates():
    torch.manual_seed(1)
    cfg = CLTTrainConfig(d_transcoder=32, activation="topk", k=4)
    model = CLTModel(2, 8, cfg)
    x = torch.randn(2000, 2, 8)
    theta = calibrate_topk_thresholds(model, x)
    pre = model.pre_activations(x)
    l0 = (pre > theta).float().sum(-1).mean(0)
    assert ((l0 - 4).abs() < 1.0).all(), l0
    assert (theta >= 0).all()


# ------------------------------------------------------------------------------------------ inputs

def test_config_roundtrip_and_validation(tmp_path):
    cfg = CLTTrainConfig(d_transcoder=16, activation="topk", k=3)
    assert CLTTrainConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert CLTTrainConfig.from_pretrained(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="chunk_tokens .* multiple of batch_tokens"):
        CLTTrainConfig(batch_tokens=1000, chunk_tokens=1500)
    with pytest.raises(ValueError, match="activation must be"):
        CLTTrainConfig(activation="relu")
    with pytest.raises(ValueError, match="k must be in"):
        CLTTrainConfig(activation="topk", d_transcoder=8, k=9)
    with pytest.raises(ValueError, match="unknown CLTTrainConfig fields.*bogus"):
        CLTTrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="sparse_adam needs sparse_decode"):
        CLTTrainConfig(sparse_decode=False, sparse_adam=True)
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        CLTTrainConfig(grad_clip=-1.0)


@pytest.mark.parametrize("sparse_adam", [False, True])
def test_grad_clip_bounds_the_global_norm_for_dense_and_sparse_gradients(sparse_adam):
    """One step on a huge-target batch: the reported norm is the unclipped one, and the gradients the optimizer
    sees have global norm == grad_clip (SparseAdam's COO decoder gradients included)."""
    from crafttrace.training import _Trainer

    cfg = CLTTrainConfig(d_transcoder=24, activation="topk", k=3, skip_connection=True, grad_clip=0.5,
                         sparse_adam=sparse_adam, batch_tokens=32, chunk_tokens=32, total_tokens=64)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, generator=g), torch.randn(32, 3, 8, generator=g)
    tr = _Trainer(3, 8, cfg)
    tr.initialise_from(x, y)
    seen = []
    for opt in tr.opts:   # record the gradients as the optimizer receives them
        opt.register_step_pre_hook(lambda o, a, k: seen.extend(
            (p.grad.coalesce().values() if p.grad.is_sparse else p.grad).clone()
            for grp in o.param_groups for p in grp["params"] if p.grad is not None))
    info = tr.train_step(x, 1e3 * y)
    assert info["grad_norm"] > 10 * cfg.grad_clip
    total = sum(float(t.pow(2).sum()) for t in seen) ** 0.5
    assert total == pytest.approx(cfg.grad_clip, rel=1e-4)
    assert tr.clt.W_dec[0].grad.is_sparse == sparse_adam


def test_read_texts_by_dataset_name(texts, monkeypatch):
    monkeypatch.setenv("CRAFTTRACE_DATA", str(DATA))
    assert read_texts("text", limit=3) == texts[:3]


def test_bad_inputs_give_clear_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_texts(tmp_path / "nope.jsonl")
    p = tmp_path / "t.jsonl"
    p.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no field 'text'"):
        read_texts(p)
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    assert read_texts(tmp_path / "t.txt") == ["one", "two"]
    with pytest.raises(TypeError, match="item 1 is int"):
        read_texts(["a", 3])
    with pytest.raises(TypeError, match="LoadedModel"):
        train_clt(object(), ["a b c"], small_cfg(), tmp_path / "r")
    with pytest.raises(ValueError, match="not enough text"):
        train_clt(tiny, ["the cat"], small_cfg(), tmp_path / "r")
    with pytest.raises(ValueError, match="unknown hook point"):
        train_clt(tiny, ["the cat sat"] * 400, small_cfg(feature_output_hook="nope"), tmp_path / "r2", progress=False)


# ------------------------------------------------------------------------------------------ outlier positions

def test_inlier_mask_drops_only_massive_activation_positions():
    from crafttrace.training import inlier_mask

    x = torch.randn(200, 3, 8, generator=torch.Generator().manual_seed(0))
    x[7, 2] *= 500.0       # an attention-sink-like position: huge at one layer only
    x[11] *= 3.0           # merely loud everywhere: kept
    keep = inlier_mask(x, 50.0)
    assert keep.dtype == torch.bool and keep.shape == (200,)
    assert (~keep).nonzero().flatten().tolist() == [7]
    assert inlier_mask(x, 0.0).all()


def test_outlier_filter_leaves_positions_out_and_resumes_exactly(tiny, texts, tmp_path, monkeypatch):
    """Sink-like positions (every 37th of a forward batch, made 100x louder at one layer) are dropped: no
    training batch holds them (rows seen = collected - dropped), the counts reach metrics.json, and a resumed run
    matches the uninterrupted one."""
    import crafttrace.training as T

    real_forward = T.ActivationStream._forward

    def loud_forward(self, windows):
        x, y = real_forward(self, windows)
        x = x.clone()
        x[::37, 1] *= 100.0
        return x, y

    monkeypatch.setattr(T.ActivationStream, "_forward", loud_forward)
    cfg = small_cfg(total_tokens=128 * 8, checkpoint_every=3, outlier_norm_ratio=20.0)
    rows = []
    real_step = T._Trainer.train_step
    monkeypatch.setattr(T._Trainer, "train_step", lambda self, x, y: rows.append(len(x)) or real_step(self, x, y))
    full = train_clt(tiny, texts, cfg, tmp_path / "full", progress=False)
    dropped = full.metrics["outliers_dropped_train"]
    assert 0 < dropped < cfg.chunk_tokens
    assert sum(rows) == full.metrics["collected_tokens"] - dropped      # 2 chunks of 4 batches, one pass
    assert min(rows) < cfg.batch_tokens
    assert full.metrics["eval_tokens"] == cfg.eval_tokens - full.metrics["outliers_dropped_eval"]
    monkeypatch.setattr(T._Trainer, "train_step", real_step)
    train_clt(tiny, texts, cfg, tmp_path / "part", max_steps=5, progress=False)
    resumed = train_clt(tiny, texts, cfg, tmp_path / "part", progress=False)
    assert resumed.metrics["outliers_dropped_train"] == dropped
    for (name, pa), pb in zip(load_transcoder(full.path).named_parameters(), load_transcoder(resumed.path).parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=f"{name} differs after resume")


def test_outlier_ratio_validation_and_cache_identity():
    with pytest.raises(ValueError, match="outlier_norm_ratio must be 0 .off. or > 1"):
        CLTTrainConfig(outlier_norm_ratio=0.5)
    # off: the field stays out of the identity, so CLTs cached before it existed keep their keys
    assert "outlier_norm_ratio" not in CLTTrainConfig().identity_dict()
    assert CLTTrainConfig(outlier_norm_ratio=50.0).identity_dict()["outlier_norm_ratio"] == 50.0
    from crafttrace import realbed

    cfg = realbed.RealbedConfig.preset("tiny")
    on = realbed.RealbedConfig.from_dict({**cfg.to_dict(), "clt": {**cfg.clt.to_dict(), "outlier_norm_ratio": 50.0}})
    k0, k1 = realbed._stage_keys(cfg), realbed._stage_keys(on)
    assert k0["sft"] == k1["sft"] and k0["clt"] != k1["clt"]
