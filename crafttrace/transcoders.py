"""Transcoders: load and save CLTs / PLTs as circuit-tracer's own in-memory classes.

A cross-layer transcoder (CLT, ``CrossLayerTranscoder``) feature at layer l *reads* the model at the
config's ``feature_input_hook`` (usually ``hook_resid_mid``: the residual stream after attention, input
of the MLP block) and *writes* to ``feature_output_hook`` (usually ``hook_mlp_out``) at every layer
l..L-1. A per-layer transcoder set (PLT, ``TranscoderSet`` of ``SingleLayerTranscoder``) writes only to
layer l. Hook names are resolved on plain HF models by ``crafttrace.hooks.resolve_hook``.

On-disk layouts read by ``load_transcoder`` (local directory or hub id, same code after download):

1. circuit-tracer's layout: ``config.yaml`` (``model_kind``, ``feature_input_hook``,
   ``feature_output_hook``) plus, for a CLT, ``W_enc_{i}.safetensors`` = {W_enc_i [d_t, d_model],
   b_enc_i [d_t], b_dec_i [d_model], threshold_i [d_t] (JumpReLU only), W_skip_i [d_model, d_model]
   (crafttrace extension)} and ``W_dec_{i}.safetensors`` = {W_dec_i [d_t, L-i, d_model]}; for a PLT,
   ``layer_{i}.safetensors`` = {W_enc, W_dec, b_enc, b_dec, activation_function.threshold?, W_skip?}.
2. Gemma Scope 2 CLTs: per-layer ``params_layer_{i}.safetensors`` = {w_enc [d_model, d_t], b_enc,
   b_dec, threshold, w_dec [d_t, L, d_model], affine_skip_connection? [d_model, d_model]}, listed by a
   config's ``transcoders`` (hf:// URIs or paths) or found in the directory.
3. mntss/clt-* repos: layout 1 without thresholds (ReLU), often bf16 -- what ``load_clt`` reads.

What circuit-tracer 0.5.0 gets wrong and this module fixes:
- ``CrossLayerTranscoder.to_safetensors`` / ``load_clt`` drop ``W_skip``: we store ``W_skip_{i}`` in
  the encoder file and restore it (``skip_connection=True``) on load.
- ``load_gemma_scope_2_clt`` iterates ``range(max(paths))`` and silently drops the last layer.
- ``to_safetensors`` writes in place; ``save_transcoder`` writes a temp dir and renames it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch
import yaml
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
from circuit_tracer.transcoder.single_layer_transcoder import TranscoderSet, load_transcoder_set
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn import functional as F
from tqdm.auto import tqdm

from crafttrace.hooks import resolve_hook

Transcoder = Union[CrossLayerTranscoder, TranscoderSet]

__all__ = [
    "Transcoder", "TranscoderMismatchError", "TranscoderFormatError", "TranscoderNotFoundError",
    "load_transcoder", "load_transcoder_config", "save_transcoder", "validate_transcoder",
    "feature_encoder", "feature_decoder", "FeatureEncoder", "FeatureDecoder", "output_layers",
]

CONFIG_NAME = "config.yaml"
_STRUCTURAL_KEYS = ("model_kind", "feature_input_hook", "feature_output_hook", "n_layers", "d_model",
                    "d_transcoder", "activation_function", "skip_connection")


class TranscoderMismatchError(ValueError):
    """The transcoder does not fit the model (layers, d_model, or hook points)."""


class TranscoderFormatError(ValueError):
    """A transcoder directory is incomplete or its tensors have the wrong names/shapes."""


class TranscoderNotFoundError(FileNotFoundError):
    """Neither a local transcoder directory nor a hub id that could be fetched."""


# ----------------------------------------------------------------------------------------------
# Locating a transcoder: local directory, or hub id -> snapshot directory


_HUB_RE = re.compile(r"^(hf://)?[\w.-]+/[\w.-]+(/[^@?]*)?(@[\w./-]+)?(\?revision=[\w./-]+)?$")


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec in (".", "..")


def _resolve_spec(spec: str | os.PathLike, config_only: bool = False) -> tuple[Path, str]:
    """Return (local directory, scan name). Hub ids are downloaded with huggingface_hub first."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.name != CONFIG_NAME:
                raise TranscoderFormatError(
                    f"{path} is a file; pass the transcoder directory (or its {CONFIG_NAME})")
            path = path.parent
        return path.resolve(), path.resolve().name  # scan: a name, not a machine-specific path
    if _looks_local(text) or not _HUB_RE.match(text):
        raise TranscoderNotFoundError(f"transcoder directory not found: {path}")
    return _download(text, config_only), text.removeprefix("hf://")


def _hub_error(spec: str, e: Exception, top_level: bool = True) -> TranscoderNotFoundError:
    first_line = str(e).splitlines()[0] if str(e) else ""
    local = f"; it is not a local path either ({Path(spec).expanduser().resolve()} does not exist)" if top_level else ""
    return TranscoderNotFoundError(
        f"could not fetch transcoder {spec!r} from the Hugging Face hub ({type(e).__name__}: {first_line})"
        f"{local}. Offline, copy the transcoder into a local directory and pass that path.")


def _download(spec: str, config_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download
    from circuit_tracer.utils.hf_utils import HfUri

    uri = HfUri.from_str(spec)
    sub = (uri.file_path or "").strip("/")
    prefix = f"{sub}/" if sub else ""
    try:
        patterns = [f"{prefix}{CONFIG_NAME}"] + ([] if config_only else [f"{prefix}*.safetensors", f"{prefix}*.npz"])
        root = snapshot_download(uri.repo_id, revision=uri.revision, allow_patterns=patterns)
    except Exception as e:  # any hub/network failure becomes one clear error
        raise _hub_error(spec, e) from e
    return Path(root) / sub if sub else Path(root)


def _fetch_file(ref: str, base: Path) -> str:
    """A per-layer file named in config ``transcoders``: hf:// URI, absolute, or relative to base."""
    if ref.startswith("hf://"):
        from circuit_tracer.utils.hf_utils import download_hf_uri
        try:
            return download_hf_uri(ref)
        except Exception as e:
            raise _hub_error(ref, e, top_level=False) from e
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise TranscoderNotFoundError(f"transcoder file listed in {base / CONFIG_NAME} not found: {p}")
    return str(p)


def load_transcoder_config(spec: str | os.PathLike) -> dict[str, Any]:
    """The ``config.yaml`` of a transcoder directory (empty dict if it has none)."""
    directory, _ = _resolve_spec(spec, config_only=True)
    return _read_config(directory)


def _read_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.exists():
        return {}
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise TranscoderFormatError(f"{cfg_path} must hold a YAML mapping, got {type(cfg).__name__}")
    return cfg


def _indexed(directory: Path, pattern: str) -> dict[int, Path]:
    rx = re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)") + r"$")
    found = {int(m.group(1)): p for p in directory.iterdir() if (m := rx.match(p.name))}
    if found and sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise TranscoderFormatError(
            f"{directory}: {pattern.format(i='N')} files must be numbered 0..{max(found)}; "
            f"missing {[pattern.format(i=i) for i in missing]}")
    return found


# ----------------------------------------------------------------------------------------------
# Loading


def load_transcoder(spec: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, lazy: bool = False) -> Transcoder:
    """Load a CLT (``CrossLayerTranscoder``) or PLT set (``TranscoderSet``) from a directory or hub id.

    ``lazy=True`` keeps decoders on disk (circuit-tracer reads rows on demand); it applies to
    circuit-tracer / mntss layouts. Gemma Scope 2 files use other key names, so they load eagerly.
    """
    directory, scan = _resolve_spec(spec)
    device = torch.device(device)
    cfg = _read_config(directory)
    scan = cfg.get("scan", scan)
    hooks = dict(feature_input_hook=cfg.get("feature_input_hook", "hook_resid_mid"),
                 feature_output_hook=cfg.get("feature_output_hook", "hook_mlp_out"))
    kind = cfg.get("model_kind")
    if kind not in (None, "cross_layer_transcoder", "transcoder_set"):
        raise TranscoderFormatError(
            f"{directory / CONFIG_NAME}: unknown model_kind {kind!r} "
            f"(expected 'cross_layer_transcoder' or 'transcoder_set')")

    if "transcoders" in cfg:  # explicit per-layer file list (Gemma Scope 2 CLT, PLT sets)
        refs = cfg["transcoders"]
        if not isinstance(refs, list) or not refs:
            raise TranscoderFormatError(f"{directory / CONFIG_NAME}: 'transcoders' must be a non-empty list")
        files = {i: Path(_fetch_file(str(r), directory)) for i, r in enumerate(refs)}
        clt = kind == "cross_layer_transcoder" or (kind is None and _is_gemma_scope_2_clt(files[0]))
        layout = "gemma_scope_2_clt" if clt else "plt"
    else:
        layout, files = _detect_layout(directory, kind)
    loader = {"clt": _load_clt, "gemma_scope_2_clt": _load_gemma_scope_2_clt, "plt": _load_plt}[layout]
    return _check_config(loader(files, device, dtype, lazy, scan, hooks), cfg, directory)


def _detect_layout(directory: Path, kind: str | None) -> tuple[str, dict[int, Path]]:
    if not directory.is_dir():
        raise TranscoderNotFoundError(f"transcoder directory not found: {directory}")
    if kind != "transcoder_set" and (enc := _indexed(directory, "W_enc_{i}.safetensors")):
        return "clt", enc
    if kind != "cross_layer_transcoder" and (layers := _indexed(directory, "layer_{i}.safetensors")):
        return "plt", layers
    if params := _indexed(directory, "params_layer_{i}.safetensors"):
        clt = kind == "cross_layer_transcoder" or (kind is None and _is_gemma_scope_2_clt(params[0]))
        return ("gemma_scope_2_clt" if clt else "plt"), params
    listing = sorted(p.name for p in directory.iterdir())[:12]
    raise TranscoderFormatError(
        f"{directory} holds no transcoder{f' of model_kind {kind!r}' if kind else ''}: expected "
        f"W_enc_{{i}}/W_dec_{{i}}.safetensors (CLT), layer_{{i}}.safetensors (PLT), "
        f"params_layer_{{i}}.safetensors (Gemma Scope 2) or a 'transcoders' list in {CONFIG_NAME}; "
        f"found {listing}")


def _check_config(tc: Transcoder, cfg: dict[str, Any], directory: Path) -> Transcoder:
    """A config.yaml written by save_transcoder records dims; a stale one next to other files is an error."""
    found = {"n_layers": int(tc.n_layers), "d_transcoder": int(tc.d_transcoder), "d_model": _d_model(tc)}
    bad = {k: (cfg[k], v) for k, v in found.items() if k in cfg and cfg[k] != v}
    if bad:
        raise TranscoderFormatError(f"{directory / CONFIG_NAME} does not match the weight files: " + ", ".join(
            f"{k} {c} in config vs {v} in files" for k, (c, v) in bad.items()))
    return tc


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _expect(path: Path, shapes: dict[str, tuple[int, ...]], key: str, shape: tuple[int, ...]) -> None:
    if key not in shapes:
        raise TranscoderFormatError(f"{path} lacks tensor {key!r} (has {sorted(shapes)})")
    if shapes[key] != shape:
        raise TranscoderFormatError(f"{path}: {key} has shape {list(shapes[key])}, expected {list(shape)}")


def _load_clt(enc_files: dict[int, Path], device: torch.device, dtype: torch.dtype, lazy: bool,
              scan: str, hooks: dict[str, str]) -> CrossLayerTranscoder:
    """circuit-tracer's ``load_clt`` after checking every file (it fails with bare KeyErrors), plus
    the ``W_skip_{i}`` tensors it ignores."""
    directory, n_layers = enc_files[0].parent, len(enc_files)
    first = _shapes(directory / "W_enc_0.safetensors")
    if len(first.get("W_enc_0", ())) != 2:
        raise TranscoderFormatError(f"{directory / 'W_enc_0.safetensors'} needs a 2-D W_enc_0 "
                                    f"[d_transcoder, d_model]; has {first}")
    d_t, d_model = first["W_enc_0"]
    has_thr, has_skip = "threshold_0" in first, "W_skip_0" in first
    for i in range(n_layers):
        p = directory / f"W_enc_{i}.safetensors"
        s = _shapes(p)
        _expect(p, s, f"W_enc_{i}", (d_t, d_model))
        _expect(p, s, f"b_enc_{i}", (d_t,))
        _expect(p, s, f"b_dec_{i}", (d_model,))
        if has_thr:
            _expect(p, s, f"threshold_{i}", (d_t,))
        if has_skip:
            _expect(p, s, f"W_skip_{i}", (d_model, d_model))
        q = directory / f"W_dec_{i}.safetensors"
        if not q.exists():
            raise TranscoderFormatError(f"CLT decoder file missing: {q}")
        _expect(q, _shapes(q), f"W_dec_{i}", (d_t, n_layers - i, d_model))

    clt = load_clt(str(directory), scan=scan, device=device, dtype=dtype,
                   lazy_decoder=lazy, lazy_encoder=False, **hooks)
    if has_skip:
        w_skip = torch.empty(n_layers, d_model, d_model, device=device, dtype=dtype)
        for i in range(n_layers):
            with safe_open(str(directory / f"W_enc_{i}.safetensors"), framework="pt", device=str(device)) as f:
                w_skip[i] = f.get_tensor(f"W_skip_{i}").to(dtype)
        del clt.W_skip  # a plain ``None`` attribute; it must go before registering the parameter
        clt.W_skip = torch.nn.Parameter(w_skip)
        clt.skip_connection = True
    return clt


def _is_gemma_scope_2_clt(path: Path) -> bool:
    s = _shapes(path)
    return len(s.get("w_dec", ())) == 3


def _load_gemma_scope_2_clt(files: dict[int, Path], device: torch.device, dtype: torch.dtype,
                            lazy: bool, scan: str, hooks: dict[str, str]) -> CrossLayerTranscoder:
    """Our own loop instead of ``load_gemma_scope_2_clt``, which loads ``range(max(paths))`` and so
    drops the last layer; we also check that each file's ``w_dec`` covers exactly the given layers."""
    if lazy:
        warnings.warn("lazy loading is not supported for Gemma Scope 2 files; loading eagerly", stacklevel=3)
    n = len(files)
    s0 = _shapes(files[0])
    if len(s0.get("w_enc", ())) != 2:
        raise TranscoderFormatError(f"{files[0]} needs a 2-D w_enc [d_model, d_transcoder]; has {s0}")
    d_model, d_t = s0["w_enc"]
    has_skip = "affine_skip_connection" in s0
    sd: dict[str, torch.Tensor] = {
        "W_enc": torch.empty(n, d_t, d_model, device=device, dtype=dtype),
        "b_enc": torch.empty(n, d_t, device=device, dtype=dtype),
        "b_dec": torch.empty(n, d_model, device=device, dtype=dtype),
        "activation_function.threshold": torch.empty(n, 1, d_t, device=device, dtype=dtype),
    }
    if has_skip:
        sd["W_skip"] = torch.empty(n, d_model, d_model, device=device, dtype=dtype)
    for i in tqdm(range(n), desc="loading Gemma Scope 2 CLT", disable=None, leave=False):
        p, s = files[i], _shapes(files[i])
        for key, shape in (("w_enc", (d_model, d_t)), ("b_enc", (d_t,)), ("b_dec", (d_model,)),
                           ("threshold", (d_t,))):
            _expect(p, s, key, shape)
        if s.get("w_dec", (None, None))[1:2] != (n,):
            raise TranscoderFormatError(
                f"{p}: w_dec has shape {list(s.get('w_dec', ()))}, expected [{d_t}, {n}, {d_model}] "
                f"(it must write to all {n} layers given; is a layer file missing?)")
        _expect(p, s, "w_dec", (d_t, n, d_model))
        if has_skip:
            _expect(p, s, "affine_skip_connection", (d_model, d_model))
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            sd["W_enc"][i] = f.get_tensor("w_enc").T.to(dtype)
            sd["b_enc"][i] = f.get_tensor("b_enc").to(dtype)
            sd["b_dec"][i] = f.get_tensor("b_dec").to(dtype)
            sd["activation_function.threshold"][i, 0] = f.get_tensor("threshold").to(dtype)
            sd[f"W_dec.{i}"] = f.get_slice("w_dec")[:, i:, :].to(device=device, dtype=dtype).contiguous()
            if has_skip:  # x @ affine_skip_connection, the same convention as CLT.compute_skip
                sd["W_skip"][i] = f.get_tensor("affine_skip_connection").to(dtype)
    with torch.device("meta"):
        clt = CrossLayerTranscoder(n, d_t, d_model, activation_function="jump_relu",
                                   skip_connection=has_skip, lazy_decoder=False, lazy_encoder=False,
                                   scan=scan, dtype=dtype, **hooks)
    clt.load_state_dict(sd, assign=True)
    return clt


def _load_plt(files: dict[int, Path], device: torch.device, dtype: torch.dtype, lazy: bool,
              scan: str, hooks: dict[str, str]) -> TranscoderSet:
    first = files[0]
    if first.suffix == ".npz":
        special = "gemma-scope"
    else:
        keys = _shapes(first)
        special = "gemma-scope-2" if "w_enc" in keys else None
        need = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold") if special else ("W_enc", "W_dec", "b_enc", "b_dec")
        for i, p in files.items():
            s = _shapes(p)
            missing = [k for k in need if k not in s]
            if missing:
                raise TranscoderFormatError(f"PLT layer {i} file {p} lacks {missing} (has {sorted(s)})")
    if special and lazy:
        warnings.warn(f"lazy loading is not supported for {special} files; loading eagerly", stacklevel=3)
        lazy = False
    return load_transcoder_set({i: str(p) for i, p in files.items()}, scan=scan, device=device,
                               dtype=dtype, special_load_fn=special, lazy_encoder=False,
                               lazy_decoder=lazy, **hooks)


# ----------------------------------------------------------------------------------------------
# Saving


def _activation_name(fn: Any) -> str:
    if isinstance(fn, JumpReLU):
        return "jump_relu"
    if fn is F.relu or fn is torch.relu:
        return "relu"
    raise ValueError(f"cannot save activation function {fn!r}: circuit-tracer's layout supports only "
                     f"'relu' and 'jump_relu' (export TopK as JumpReLU thresholds first)")


def _plain(v: Any, key: str) -> Any:
    """YAML-safe copy of an extra_config value (paths, tensors and numpy values become plain types)."""
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if hasattr(v, "tolist"):  # torch / numpy scalars and arrays
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x, key) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x, f"{key}.{k}") for k, x in v.items()}
    raise TypeError(f"extra_config[{key!r}] has type {type(v).__name__}, which config.yaml cannot hold")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _looks_like_transcoder_dir(d: Path) -> bool:
    return any((d / n).exists() for n in (CONFIG_NAME, "W_enc_0.safetensors", "layer_0.safetensors"))


def save_transcoder(tc: Transcoder, out_dir: str | os.PathLike,
                    extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``tc`` in circuit-tracer's layout (readable by ``load_clt`` / ``load_transcoder_set`` /
    ``load_transcoders_from_cache``), atomically: a temp dir renamed over ``out_dir``.

    ``extra_config`` (e.g. model_name, training metrics) is merged into ``config.yaml``; it may not
    contradict the structural keys. CLT skip weights are stored as ``W_skip_{i}`` in the encoder files.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _looks_like_transcoder_dir(out))):
        raise FileExistsError(f"refusing to replace {out}: it exists and is not a transcoder directory")
    if isinstance(tc, CrossLayerTranscoder):
        act = _activation_name(tc.activation_function)
        kind, skip = "cross_layer_transcoder", tc.W_skip is not None
    elif isinstance(tc, TranscoderSet):
        act = _activation_name(tc.transcoders[0].activation_function)
        kind, skip = "transcoder_set", bool(tc.skip_connection)
    else:
        raise TypeError(f"save_transcoder needs a CrossLayerTranscoder or TranscoderSet, got {type(tc).__name__}")
    cfg: dict[str, Any] = {
        "model_kind": kind, "feature_input_hook": tc.feature_input_hook,
        "feature_output_hook": tc.feature_output_hook, "n_layers": int(tc.n_layers),
        "d_model": int(tc.d_model if kind == "cross_layer_transcoder" else tc.transcoders[0].d_model),
        "d_transcoder": int(tc.d_transcoder), "activation_function": act, "skip_connection": skip,
    }
    if tc.scan is not None:
        cfg["scan"] = tc.scan
    for k, v in (extra_config or {}).items():
        v = _plain(v, k)
        if k in _STRUCTURAL_KEYS and cfg[k] != v:
            raise ValueError(f"extra_config[{k!r}]={v!r} contradicts the transcoder ({cfg[k]!r})")
        if k == "transcoders":
            raise ValueError("extra_config may not set 'transcoders' (it would redirect loaders to other files)")
        cfg[k] = v

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if kind == "cross_layer_transcoder":
            _write_clt(tc, tmp)  # type: ignore[arg-type]
        else:
            _write_plt(tc, tmp)  # type: ignore[arg-type]
        with open(tmp / CONFIG_NAME, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        os.chmod(tmp, 0o755)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def _write_clt(clt: CrossLayerTranscoder, d: Path) -> None:
    """Like ``CrossLayerTranscoder.to_safetensors`` but keeps ``W_skip`` (which it drops)."""
    jump = isinstance(clt.activation_function, JumpReLU)
    for i in tqdm(range(clt.n_layers), desc="saving CLT", disable=None, leave=False):
        enc = {f"W_enc_{i}": _cpu(clt._get_encoder_weights(i)), f"b_enc_{i}": _cpu(clt.b_enc[i]),
               f"b_dec_{i}": _cpu(clt.b_dec[i])}
        if jump:
            enc[f"threshold_{i}"] = _cpu(clt.activation_function.threshold[i].reshape(-1))
        if clt.W_skip is not None:
            enc[f"W_skip_{i}"] = _cpu(clt.W_skip[i])
        save_file(enc, str(d / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": _cpu(clt._get_decoder_vectors(i))}, str(d / f"W_dec_{i}.safetensors"))


def _write_plt(ts: TranscoderSet, d: Path) -> None:
    for i, t in enumerate(tqdm(ts.transcoders, desc="saving PLTs", disable=None, leave=False)):
        _activation_name(t.activation_function)
        sd = {"W_enc": _cpu(t.W_enc), "W_dec": _cpu(t.W_dec), "b_enc": _cpu(t.b_enc), "b_dec": _cpu(t.b_dec)}
        if isinstance(t.activation_function, JumpReLU):
            sd["activation_function.threshold"] = _cpu(t.activation_function.threshold)
        if t.W_skip is not None:
            sd["W_skip"] = _cpu(t.W_skip)
        save_file(sd, str(d / f"layer_{i}.safetensors"))


# ----------------------------------------------------------------------------------------------
# Validation against a model


def _hf_model(model: Any) -> torch.nn.Module:
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module) and hasattr(inner, "config"):
        return inner
    raise TypeError(f"validate_transcoder needs a Hugging Face PreTrainedModel or an object with .model, "
                    f"got {type(model).__name__}")


def _d_model(tc: Transcoder) -> int:
    return int(tc.d_model if isinstance(tc, CrossLayerTranscoder) else tc.transcoders[0].d_model)


def validate_transcoder(tc: Transcoder, model: Any) -> None:
    """Raise ``TranscoderMismatchError`` unless ``tc`` fits ``model``: same layer count, same d_model,
    and both hook points resolvable on every layer."""
    hf = _hf_model(model)
    cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    m_layers, m_d = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    t_layers, t_d = int(tc.n_layers), _d_model(tc)
    if isinstance(tc, TranscoderSet):  # TranscoderSet checks d_transcoder per layer but not d_model
        for i, t in enumerate(tc.transcoders):
            if int(t.d_model) != t_d:
                raise TranscoderMismatchError(f"transcoder set layer {i} has d_model {t.d_model}, layer 0 has {t_d}")
    if (t_layers, t_d) != (m_layers, m_d):
        raise TranscoderMismatchError(f"transcoder has {t_layers} layers x d_model {t_d}, "
                                      f"model has {m_layers} layers x d_model {m_d}")
    for hook in (tc.feature_input_hook, tc.feature_output_hook):
        for layer in range(t_layers):
            try:
                resolve_hook(hf, hook, layer)
            except (ValueError, AttributeError, IndexError, TypeError) as e:
                raise TranscoderMismatchError(
                    f"transcoder hook point {hook!r} cannot be placed on layer {layer} of this "
                    f"{type(hf).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Single-feature helpers (steering, ranking)


class FeatureEncoder(NamedTuple):
    """Feature f at layer l: a = act(w_enc . x + b_enc), x read at ``feature_input_hook``. ``threshold``
    is the JumpReLU threshold (a = pre * (pre > threshold)); 0 for ReLU, which is the same gate."""
    w_enc: torch.Tensor  # [d_model]
    b_enc: torch.Tensor  # scalar
    threshold: torch.Tensor  # scalar


class FeatureDecoder(NamedTuple):
    """Rows written to ``feature_output_hook``: ``vectors[k]`` is added at layer ``layers[k]`` per unit
    of activation."""
    vectors: torch.Tensor  # [n_out, d_model]
    layers: list[int]


def _check_feature(tc: Transcoder, layer: int, index: int) -> None:
    if not 0 <= layer < tc.n_layers:
        raise IndexError(f"layer {layer} out of range for a transcoder with {tc.n_layers} layers")
    if not 0 <= index < tc.d_transcoder:
        raise IndexError(f"feature index {index} out of range: d_transcoder is {tc.d_transcoder}")


def output_layers(tc: Transcoder, layer: int) -> list[int]:
    """Layers a feature at ``layer`` writes to: CLT l..L-1, PLT [l]."""
    return list(range(layer, tc.n_layers)) if isinstance(tc, CrossLayerTranscoder) else [layer]


def feature_encoder(tc: Transcoder, layer: int, index: int) -> FeatureEncoder:
    _check_feature(tc, layer, index)
    if isinstance(tc, CrossLayerTranscoder):
        act, w, b = tc.activation_function, tc._get_encoder_weights(layer)[index], tc.b_enc[layer, index]
        thr = act.threshold[layer].reshape(-1)[index] if isinstance(act, JumpReLU) else None
    else:
        t = tc.transcoders[layer]
        act, w, b = t.activation_function, t.W_enc[index], t.b_enc[index]
        thr = act.threshold.reshape(-1)[index] if isinstance(act, JumpReLU) else None
    if thr is None:
        _activation_name(act)  # anything but relu / jump_relu has no single-feature gate
        thr = torch.zeros((), dtype=b.dtype, device=b.device)
    return FeatureEncoder(w.detach(), b.detach(), thr.detach())


def feature_decoder(tc: Transcoder, layer: int, index: int) -> FeatureDecoder:
    _check_feature(tc, layer, index)
    if isinstance(tc, CrossLayerTranscoder):
        vecs = tc._get_decoder_vectors(layer, slice(index, index + 1))[0]  # [L - layer, d_model]
    else:
        vecs = tc.transcoders[layer]._get_decoder_vectors(slice(index, index + 1))  # [1, d_model]
    return FeatureDecoder(vecs.detach(), output_layers(tc, layer))
