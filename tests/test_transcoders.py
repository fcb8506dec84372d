"""Transcoder I/O: every on-disk layout round-trips into circuit-tracer's classes, with tiny random
fixtures written to tmp (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from circuit_tracer.transcoder.activation_functions import JumpReLU, TopK
from circuit_tracer.transcoder.cross_layer_transcoder import (CrossLayerTranscoder, load_clt,
                                                              load_gemma_scope_2_clt)
from circuit_tracer.transcoder.single_layer_transcoder import (SingleLayerTranscoder, TranscoderSet,
                                                               load_transcoder_set)
from circuit_tracer.utils.caching import load_transcoders_from_cache
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
from safetensors.torch import save_file
from torch.nn import functional as F

from crafttrace.transcoders import (TranscoderFormatError, TranscoderMismatchError,
                                    TranscoderNotFoundError, feature_decoder, feature_encoder,
                                    load_transcoder, load_transcoder_config, save_transcoder,
                                    validate_transcoder)

L, DT, D = 3, 8, 6
CPU = torch.device("cpu")


def random_clt(n_layers=L, act="jump_relu", skip=True, seed=0) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(n_layers, DT, D, activation_function=act, skip_connection=skip,
                               lazy_decoder=False, device=CPU, dtype=torch.float32,
                               feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out")
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_()
        if act == "jump_relu":
            clt.activation_function.threshold.uniform_(0.1, 0.5)
    return clt


def random_plt(skip=True, jump=True, seed=0) -> TranscoderSet:
    torch.manual_seed(seed)
    tcs = {}
    for i in range(L):
        act = JumpReLU(torch.rand(DT) * 0.5, 0.1) if jump else F.relu
        t = SingleLayerTranscoder(D, DT, act, i, skip_connection=skip, device=CPU, dtype=torch.float32)
        with torch.no_grad():
            for p in t.parameters():
                p.normal_()
        tcs[i] = t
    return TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out")


def assert_clt_equal(a: CrossLayerTranscoder, b: CrossLayerTranscoder) -> None:
    assert (a.n_layers, a.d_transcoder, a.d_model) == (b.n_layers, b.d_transcoder, b.d_model)
    for name in ("W_enc", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    for i in range(a.n_layers):
        torch.testing.assert_close(a._get_decoder_vectors(i), b._get_decoder_vectors(i), rtol=0, atol=0)
    assert type(a.activation_function) is type(b.activation_function)
    if isinstance(a.activation_function, JumpReLU):
        torch.testing.assert_close(a.activation_function.threshold, b.activation_function.threshold)
    assert (a.W_skip is None) == (b.W_skip is None)
    if a.W_skip is not None:
        torch.testing.assert_close(a.W_skip, b.W_skip, rtol=0, atol=0)


# --- circuit-tracer layout: CLT ---------------------------------------------------------------


def test_clt_round_trip_keeps_values_and_skip(tmp_path):
    clt = random_clt()
    out = save_transcoder(clt, tmp_path / "clt", extra_config={"model_name": "tiny-llama"})
    loaded = load_transcoder(out)
    assert isinstance(loaded, CrossLayerTranscoder)
    assert_clt_equal(clt, loaded)
    assert loaded.skip_connection and loaded.W_skip is not None
    assert (loaded.feature_input_hook, loaded.feature_output_hook) == ("hook_resid_mid", "hook_mlp_out")
    x = torch.randn(L, 5, D)
    # (CrossLayerTranscoder.forward itself asserts with a skip; decode with input_acts adds x @ W_skip)
    torch.testing.assert_close(loaded.decode(loaded.encode(x), x), clt.decode(clt.encode(x), x))
    # the attribution path circuit-tracer runs adds the skip term too
    got = loaded.compute_attribution_components(x)["reconstruction"]
    torch.testing.assert_close(got, clt.compute_attribution_components(x)["reconstruction"])
    cfg = load_transcoder_config(out / "config.yaml")
    assert cfg["model_name"] == "tiny-llama" and cfg["skip_connection"] is True
    with pytest.raises(TranscoderFormatError, match="W_enc_0.safetensors is a file; pass the transcoder directory"):
        load_transcoder(out / "W_enc_0.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_clt_lazy_and_relu(tmp_path):
    clt = random_clt(act="relu", skip=False)
    out = save_transcoder(clt, tmp_path / "clt")
    lazy = load_transcoder(out, lazy=True)
    assert lazy.W_dec is None and lazy.activation_function is F.relu and lazy.W_skip is None
    assert_clt_equal(clt, lazy)
    assert load_transcoder(out, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_circuit_tracer_reads_saved_clt(tmp_path):
    clt = random_clt()
    out = save_transcoder(clt, tmp_path / "local" / "clt")
    ct = load_clt(str(out), device=CPU, dtype=torch.float32, lazy_decoder=False)
    clt_no_skip = random_clt()
    clt_no_skip.W_skip = None
    assert_clt_equal(clt_no_skip, ct)  # circuit-tracer itself ignores W_skip_{i}
    # ReplacementModel.from_pretrained's own entry point finds it as a cached hub ref
    cached, cfg = load_transcoder_from_hub("local/clt", cache_dir=tmp_path, device=CPU)
    assert isinstance(cached, CrossLayerTranscoder) and cfg["model_kind"] == "cross_layer_transcoder"
    torch.testing.assert_close(cached.W_enc, clt.W_enc)
    torch.testing.assert_close(cached._get_decoder_vectors(1), clt.W_dec[1])


def test_circuit_tracer_drops_skip_but_we_do_not(tmp_path):
    clt = random_clt()
    clt.to_safetensors(str(tmp_path / "ct"))  # circuit-tracer's own writer: W_skip is lost
    assert load_transcoder(tmp_path / "ct").W_skip is None
    assert load_transcoder(save_transcoder(clt, tmp_path / "ours")).W_skip is not None


# --- mntss/clt-* layout -----------------------------------------------------------------------


def test_mntss_layout_relu_bf16(tmp_path):
    torch.manual_seed(1)
    d = tmp_path / "clt-tiny"
    d.mkdir()
    ref = {}
    for i in range(L):
        enc = {f"W_enc_{i}": torch.randn(DT, D), f"b_enc_{i}": torch.randn(DT), f"b_dec_{i}": torch.randn(D)}
        enc = {k: v.to(torch.bfloat16) for k, v in enc.items()}
        dec = {f"W_dec_{i}": torch.randn(DT, L - i, D).to(torch.bfloat16)}
        save_file(enc, str(d / f"W_enc_{i}.safetensors"))
        save_file(dec, str(d / f"W_dec_{i}.safetensors"))
        ref.update(enc | dec)
    (d / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "google/gemma-2-2b", "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}))
    clt = load_transcoder(d)
    assert clt.activation_function is F.relu and clt.dtype == torch.float32 and clt.W_skip is None
    for i in range(L):
        torch.testing.assert_close(clt.W_enc[i], ref[f"W_enc_{i}"].float(), rtol=0, atol=0)
        torch.testing.assert_close(clt.W_dec[i], ref[f"W_dec_{i}"].float(), rtol=0, atol=0)


# --- Gemma Scope 2 CLT layout -----------------------------------------------------------------


def write_gemma_scope_2_clt(d: Path, n_layers=L, skip=True, seed=2) -> dict[int, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    d.mkdir(parents=True, exist_ok=True)
    raw = {}
    for i in range(n_layers):
        p = {"w_enc": torch.randn(D, DT), "b_enc": torch.randn(DT), "b_dec": torch.randn(D),
             "threshold": torch.rand(DT), "w_dec": torch.randn(DT, n_layers, D)}
        if skip:
            p["affine_skip_connection"] = torch.randn(D, D)
        save_file(p, str(d / f"params_layer_{i}.safetensors"))
        raw[i] = p
    return raw


def check_gemma_scope_2(clt: CrossLayerTranscoder, raw) -> None:
    assert clt.n_layers == len(raw)
    for i, p in raw.items():
        torch.testing.assert_close(clt.W_enc[i], p["w_enc"].T, rtol=0, atol=0)
        torch.testing.assert_close(clt.W_dec[i], p["w_dec"][:, i:, :], rtol=0, atol=0)
        torch.testing.assert_close(clt.b_dec[i], p["b_dec"], rtol=0, atol=0)
        torch.testing.assert_close(clt.activation_function.threshold[i, 0], p["threshold"], rtol=0, atol=0)
        torch.testing.assert_close(clt.W_skip[i], p["affine_skip_connection"], rtol=0, atol=0)


def test_gemma_scope_2_clt_keeps_last_layer(tmp_path):
    d = tmp_path / "gs2"
    raw = write_gemma_scope_2_clt(d)
    (d / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [f"params_layer_{i}.safetensors" for i in range(L)]}))  # relative to config
    clt = load_transcoder(d)
    check_gemma_scope_2(clt, raw)
    torch.testing.assert_close(clt.W_dec[L - 1][:, 0], raw[L - 1]["w_dec"][:, L - 1])
    # circuit-tracer 0.5.0's loader reads only range(max(paths)) = L-1 layers (the bug fixed here), so
    # its CLT is one layer short and the L-layer decoders do not fit it
    paths = {i: str(d / f"params_layer_{i}.safetensors") for i in range(L)}
    with pytest.raises(RuntimeError, match=r"W_dec.0: copying a param with shape torch.Size\(\[8, 3, 6\]\).*\[8, 2, 6\]"):
        load_gemma_scope_2_clt(paths, device=CPU, dtype=torch.float32)
    # also found without a config, and it saves + reloads in circuit-tracer's layout
    os.remove(d / "config.yaml")
    check_gemma_scope_2(load_transcoder(d), raw)
    check_gemma_scope_2(load_transcoder(save_transcoder(clt, tmp_path / "converted")), raw)


def test_gemma_scope_2_missing_last_file_is_named(tmp_path):
    d = tmp_path / "gs2"
    write_gemma_scope_2_clt(d)
    os.remove(d / f"params_layer_{L - 1}.safetensors")
    with pytest.raises(TranscoderFormatError, match=r"w_dec has shape \[8, 3, 6\], expected \[8, 2, 6\]"):
        load_transcoder(d)


# --- PLT (transcoder_set) ---------------------------------------------------------------------


def test_plt_round_trip_and_circuit_tracer_reads_it(tmp_path):
    ts = random_plt()
    out = save_transcoder(ts, tmp_path / "local" / "plt")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"] + [f"layer_{i}.safetensors" for i in range(L)]
    for lazy in (False, True):
        loaded = load_transcoder(out, lazy=lazy)
        assert isinstance(loaded, TranscoderSet) and loaded.skip_connection
        assert loaded.feature_input_hook == "mlp.hook_in"
        x = torch.randn(L, 4, D)
        torch.testing.assert_close(loaded.decode(loaded.encode(x), x), ts.decode(ts.encode(x), x))
    ct = load_transcoder_set({i: str(out / f"layer_{i}.safetensors") for i in range(L)}, scan="t",
                             feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out", device=CPU)
    torch.testing.assert_close(ct[2].W_dec, ts[2].W_dec)
    cached, _ = load_transcoders_from_cache("local/plt", cache_dir=tmp_path, device=CPU)
    torch.testing.assert_close(cached[1].W_skip, ts[1].W_skip)


def test_gemma_scope_2_plt_files(tmp_path):
    torch.manual_seed(3)
    d = tmp_path / "gs2plt"
    d.mkdir()
    raw = []
    for i in range(L):
        p = {"w_enc": torch.randn(D, DT), "w_dec": torch.randn(DT, D), "b_enc": torch.randn(DT),
             "b_dec": torch.randn(D), "threshold": torch.rand(DT)}
        save_file(p, str(d / f"params_layer_{i}.safetensors"))
        raw.append(p)
    ts = load_transcoder(d)
    assert isinstance(ts, TranscoderSet) and ts.n_layers == L
    torch.testing.assert_close(ts[L - 1].W_enc, raw[L - 1]["w_enc"].T)


# --- errors -----------------------------------------------------------------------------------


def test_missing_path_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(TranscoderNotFoundError, match="not found: .*nope"):
        load_transcoder(tmp_path / "nope")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(TranscoderNotFoundError, match="could not fetch transcoder 'mntss/clt-x' from the Hugging Face hub"):
        load_transcoder("mntss/clt-x")


def test_bad_files_are_named(tmp_path):
    out = save_transcoder(random_clt(), tmp_path / "clt")
    save_file({"W_dec_1": torch.zeros(DT, 1, D)}, str(out / "W_dec_1.safetensors"))
    with pytest.raises(TranscoderFormatError, match=r"W_dec_1.safetensors: W_dec_1 has shape \[8, 1, 6\], expected \[8, 2, 6\]"):
        load_transcoder(out)
    os.remove(out / "W_enc_1.safetensors")
    with pytest.raises(TranscoderFormatError, match=r"missing \['W_enc_1.safetensors'\]"):
        load_transcoder(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TranscoderFormatError, match="holds no transcoder"):
        load_transcoder(tmp_path / "empty")


def test_save_is_atomic_and_replaces_stale_layers(tmp_path, monkeypatch):
    import crafttrace.transcoders as T

    out = save_transcoder(random_clt(n_layers=4), tmp_path / "clt")
    save_transcoder(random_clt(n_layers=2), out)
    assert load_transcoder(out).n_layers == 2 and not (out / "W_enc_3.safetensors").exists()
    bad = random_clt(n_layers=3)
    bad.activation_function = TopK(2)
    with pytest.raises(ValueError, match="only 'relu' and 'jump_relu'"):
        save_transcoder(bad, out)
    real_save, calls = T.save_file, []

    def dying_save(tensors, path):  # a crash half-way through writing the new files
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(T, "save_file", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_transcoder(random_clt(n_layers=3, seed=5), out)
    monkeypatch.undo()
    assert load_transcoder(out).n_layers == 2  # the failed saves left the old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clt"]  # and no temp dirs
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a transcoder directory"):
        save_transcoder(random_clt(), tmp_path / "run")
    with pytest.raises(ValueError, match="contradicts"):
        save_transcoder(random_clt(), tmp_path / "x", extra_config={"n_layers": 30})
    with pytest.raises(TypeError, match=r"extra_config\['fn'\] has type builtin_function"):
        save_transcoder(random_clt(), tmp_path / "x", extra_config={"fn": print})
    # plain-typed extras (paths, tensors) are converted; a stale config is caught on load
    out = save_transcoder(random_clt(), tmp_path / "x", extra_config={"src": tmp_path, "nmse": torch.tensor([0.5])})
    assert load_transcoder_config(out)["nmse"] == [0.5]
    cfg = load_transcoder_config(out) | {"d_transcoder": 16}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(TranscoderFormatError, match="d_transcoder 16 in config vs 8 in files"):
        load_transcoder(out)


# --- validation against a model and feature helpers -------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=D, intermediate_size=12, num_hidden_layers=L,
                      num_attention_heads=2, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg).eval()


def test_validate_transcoder(tiny_llama):
    validate_transcoder(random_clt(), tiny_llama)
    validate_transcoder(random_plt(), type("Loaded", (), {"model": tiny_llama})())
    with pytest.raises(TranscoderMismatchError,
                       match=r"transcoder has 4 layers x d_model 6, model has 3 layers x d_model 6"):
        validate_transcoder(random_clt(n_layers=4), tiny_llama)
    bad = random_clt()
    bad.feature_input_hook = "hook_resid_pre"
    with pytest.raises(TranscoderMismatchError, match="'hook_resid_pre'"):
        validate_transcoder(bad, tiny_llama)


def test_feature_helpers(tmp_path):
    clt = random_clt()
    enc = feature_encoder(clt, 1, 5)
    torch.testing.assert_close(enc.w_enc, clt.W_enc[1, 5])
    assert enc.b_enc == clt.b_enc[1, 5] and enc.threshold == clt.activation_function.threshold[1, 0, 5]
    dec = feature_decoder(load_transcoder(save_transcoder(clt, tmp_path / "c"), lazy=True), 1, 5)
    assert dec.layers == [1, 2]
    torch.testing.assert_close(dec.vectors, clt.W_dec[1][5])
    ts = random_plt(jump=False)
    assert feature_encoder(ts, 2, 0).threshold == 0 and feature_decoder(ts, 2, 0).layers == [2]
    torch.testing.assert_close(feature_decoder(ts, 2, 0).vectors, ts[2].W_dec[:1])
    with pytest.raises(IndexError, match="d_transcoder is 8"):
        feature_decoder(clt, 0, 8)
    with pytest.raises(IndexError, match="3 layers"):
        feature_encoder(clt, 3, 0)


# --- hub ids go through the same code after download -----------------------------------------


def test_hub_id_uses_snapshot_then_same_loader(tmp_path, monkeypatch):
    import huggingface_hub
    import circuit_tracer.utils.hf_utils as hf_utils

    snap = tmp_path / "snapshot"
    clt = random_clt()
    save_transcoder(clt, snap / "clt" / "sub")
    calls = {}

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    loaded = load_transcoder("org/repo/clt/sub@v1")
    assert calls == {"repo_id": "org/repo", "revision": "v1",
                     "allow_patterns": ["clt/sub/config.yaml", "clt/sub/*.safetensors", "clt/sub/*.npz"]}
    assert_clt_equal(clt, loaded)
    assert loaded.scan == "org/repo/clt/sub@v1"

    # Gemma Scope 2 style: a config whose 'transcoders' are hf:// URIs into another repo
    raw = write_gemma_scope_2_clt(tmp_path / "google")
    cfg_dir = snap / "gs2"
    cfg_dir.mkdir()
    (cfg_dir / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [f"hf://google/gs2-tiny/clt/params_layer_{i}.safetensors" for i in range(L)]}))
    monkeypatch.setattr(hf_utils, "download_hf_uri",
                        lambda uri: str(tmp_path / "google" / uri.rsplit("/", 1)[1]))
    check_gemma_scope_2(load_transcoder("hf://mwhanna/gs2-tiny/gs2"), raw)


def test_gemma_scope_npz_plt(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    d = tmp_path / "gs1"
    d.mkdir()
    for i in range(L):
        np.savez(d / f"params_{i}.npz", W_enc=rng.normal(size=(D, DT)).astype("f4"),
                 W_dec=rng.normal(size=(DT, D)).astype("f4"), b_enc=rng.normal(size=DT).astype("f4"),
                 b_dec=rng.normal(size=D).astype("f4"), threshold=rng.random(DT).astype("f4"))
    (d / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "transcoders": [f"params_{i}.npz" for i in range(L)]}))
    ts = load_transcoder(d)
    ref = np.load(d / "params_2.npz")
    torch.testing.assert_close(ts[2].W_enc, torch.from_numpy(ref["W_enc"].T.copy()))
    assert feature_decoder(ts, 2, 3).layers == [2]
