"""Steer transcoder features with forward hooks on the plain Hugging Face model.

No replacement model at generation time: the real MLPs run unchanged and we add, at every position
except the first attended one (BOS / attention sink, which circuit-tracer also zeroes), the
*difference* a feature's decoder would write if its activation were ``target`` instead of ``a``:

    out_k  <-  out_k + (target - a) * W_dec[l, i, k]        for every layer k the feature writes to

Hook points (TransformerLens names, resolved by :mod:`crafttrace.hooks`):
  * reads  ``clt.feature_input_hook``  at the feature's layer ``l`` (``hook_resid_mid`` for CLTs:
    the residual stream after attention, i.e. the input of ``post_attention_layernorm`` on Llama);
  * writes ``clt.feature_output_hook`` (``hook_mlp_out``: the MLP output) at layers ``l..L-1`` for a
    cross-layer transcoder, at layer ``l`` only for a per-layer ``TranscoderSet``.

``a`` is computed at layer ``l`` and stashed for the later layers' output hooks within the same
forward; with a KV cache each decoding step is one forward over the new position(s), so steering
covers prompt and generated tokens alike. Modes: ``clamp`` (target = value) and ``scale``
(target = value * a, so 0 ablates the feature and 1 is a no-op).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
from circuit_tracer.transcoder.activation_functions import JumpReLU

from crafttrace.hooks import capture, read_tensor, resolve_hook

Mode = Literal["clamp", "scale"]


@dataclass(frozen=True)
class FeatureSteer:
    """One feature edit: (layer, index) of the transcoder, ``mode`` and its ``value``."""

    layer: int
    index: int
    mode: Mode = "clamp"
    value: float = 0.0

    def __post_init__(self):
        if self.mode not in ("clamp", "scale"):
            raise ValueError(f"FeatureSteer.mode must be 'clamp' or 'scale', got {self.mode!r}")
        if not math.isfinite(float(self.value)):
            raise ValueError(f"FeatureSteer.value must be finite, got {self.value!r}")


def _is_cross_layer(tc) -> bool:
    # A CLT keeps one decoder block per source layer covering all later layers; a TranscoderSet
    # is a list of single-layer transcoders.
    return not hasattr(tc, "transcoders")


def _d_model(tc) -> int:
    return tc.d_model if _is_cross_layer(tc) else tc.transcoders[0].d_model


def _n_model_layers(model) -> int | None:
    return getattr(model.config, "num_hidden_layers", None) or getattr(
        getattr(model.config, "text_config", None), "num_hidden_layers", None)


def _check_feature(tc, layer: int, index: int) -> None:
    if not 0 <= layer < tc.n_layers:
        raise IndexError(f"feature layer {layer} out of range: the transcoder has n_layers={tc.n_layers}")
    if not 0 <= index < tc.d_transcoder:
        raise IndexError(
            f"feature index {index} at layer {layer} out of range: d_transcoder={tc.d_transcoder}")


def _check_pair(model, tc) -> None:
    d_model = getattr(model.config, "hidden_size", None) or getattr(
        getattr(model.config, "text_config", None), "hidden_size", None)
    if d_model is not None and d_model != _d_model(tc):
        raise ValueError(
            f"transcoder d_model={_d_model(tc)} does not match the model's hidden_size={d_model}")
    n = _n_model_layers(model)
    if n is not None and n != tc.n_layers:
        raise ValueError(f"transcoder n_layers={tc.n_layers} does not match the model's {n} layers")


class _FeatureReader:
    """Encoder rows of a few features at one layer: computes their activations from the input hook.

    Reading only the selected rows (not ``encode_layer``) keeps the per-token cost at n_features
    dot products instead of d_transcoder, which is what keeps steered generation near free.
    """

    def __init__(self, tc, layer: int, indices: Sequence[int]):
        for i in indices:
            _check_feature(tc, layer, i)
        idx = torch.tensor(list(indices), dtype=torch.long)
        self.layer, self.indices = layer, list(indices)
        if _is_cross_layer(tc):
            W = tc._get_encoder_weights(layer)[idx]  # [n, d_model]
            b = tc.b_enc[layer][idx]
            act = tc.activation_function
            thr = act.threshold[layer].reshape(-1)[idx] if isinstance(act, JumpReLU) else None
        else:
            sub = tc.transcoders[layer]
            W, b, act = sub.W_enc[idx], sub.b_enc[idx], sub.activation_function
            thr = None
            if isinstance(act, JumpReLU):
                t = act.threshold.reshape(-1)
                thr = t[idx] if t.numel() == tc.d_transcoder else t.expand(len(idx))
        self.relu = thr is None and act is torch.nn.functional.relu
        # Non-elementwise activations (TopK) need the whole layer's pre-activations.
        self.full = tc if thr is None and not self.relu else None
        self.W = W.detach().float().T.contiguous()  # [d_model, n]
        self.b = b.detach().float()
        self.thr = None if thr is None else thr.detach().float()

    def to(self, device) -> "_FeatureReader":
        self.W, self.b = self.W.to(device), self.b.to(device)
        if self.thr is not None:
            self.thr = self.thr.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> activations [..., n] (float32)."""
        if self.full is not None:
            return self.full.encode_layer(x.to(self.full.dtype), self.layer)[..., self.indices].float()
        pre = x.float() @ self.W + self.b
        if self.thr is not None:
            return pre * (pre > self.thr)
        return torch.relu(pre)


def _decoder_rows(tc, layer: int, indices: Sequence[int]) -> torch.Tensor:
    """Decoder vectors [n, n_out_layers, d_model]: out layers l..L-1 (CLT) or just l (PLT)."""
    dec = tc._get_decoder_vectors(layer, torch.tensor(list(indices), dtype=torch.long)).detach().float()
    return dec if _is_cross_layer(tc) else dec[:, None, :]


def _keep_mask(args, kwargs) -> torch.Tensor | None:
    """[B, T] bool: positions to steer in this forward (all but padding and the first attended token)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    emb = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else emb
    if ref is None:
        return None
    B, T = ref.shape[0], ref.shape[1]
    am = kwargs.get("attention_mask")
    if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[1] >= T:
        am = am.bool()
        first = (am.long().cumsum(-1) == 1) & am
        return (am & ~first)[:, -T:]
    cp = kwargs.get("cache_position")
    if isinstance(cp, torch.Tensor):
        pos = cp
    else:
        past = kwargs.get("past_key_values")
        off = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        pos = torch.arange(off, off + T, device=ref.device)
    return (pos > 0).expand(B, T)


def _apply(mode_is_clamp: torch.Tensor, values: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """target - a, per feature: clamp -> value - a; scale -> (value - 1) * a."""
    return torch.where(mode_is_clamp, values - a, (values - 1.0) * a)


@contextmanager
def steer(model: torch.nn.Module, transcoder, specs: Sequence[FeatureSteer]) -> Iterator[None]:
    """Steer ``specs`` during every forward (and ``generate``) inside the block; hooks removed on exit.

    Works with KV-cached generation, left padding (via ``attention_mask``) and batches.
    """
    specs = list(specs)
    if not specs:
        yield
        return
    _check_pair(model, transcoder)
    for s in specs:
        if not isinstance(s, FeatureSteer):
            raise TypeError(f"steer() takes FeatureSteer specs, got {type(s).__name__}")
        _check_feature(transcoder, s.layer, s.index)
    device = next(model.parameters()).device
    cross = _is_cross_layer(transcoder)

    by_layer: dict[int, list[FeatureSteer]] = {}
    for s in specs:
        by_layer.setdefault(s.layer, []).append(s)
    readers, coefs_spec, per_out = {}, {}, {}  # per_out[k] = [(source layer, D [n, d_model])]
    for l, group in sorted(by_layer.items()):
        readers[l] = _FeatureReader(transcoder, l, [s.index for s in group]).to(device)
        coefs_spec[l] = (torch.tensor([s.mode == "clamp" for s in group], device=device),
                         torch.tensor([float(s.value) for s in group], device=device))
        dec = _decoder_rows(transcoder, l, [s.index for s in group]).to(device)  # [n, n_out, d]
        for j in range(dec.shape[1]):
            per_out.setdefault(l + j if cross else l, []).append((l, dec[:, j, :]))
    # One matmul per written layer: the coefficients of all contributing source layers are
    # concatenated (once per forward per distinct source set) against their stacked decoder rows.
    writes = {k: (tuple(l for l, _ in parts), torch.cat([D for _, D in parts]).contiguous())
              for k, parts in per_out.items()}

    state: dict = {}

    def on_forward(mod, args, kwargs):
        state.clear()
        state["keep"] = _keep_mask(args, kwargs)

    def read(l, x):
        a = readers[l](x)
        keep = state.get("keep")
        if keep is None or keep.shape != a.shape[:2]:
            # Forward not seen by the top-level hook (a submodule called directly): treat it as a
            # fresh, uncached sequence.
            keep = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
            keep[:, 0] = False
        is_clamp, vals = coefs_spec[l]
        state[l] = _apply(is_clamp, vals, a) * keep.to(a.device)[..., None]

    def write(k, out):
        sources, D = writes[k]
        missing = [l for l in sources if l not in state]
        if missing:
            raise RuntimeError(
                f"steering: the output hook at layer {k} ran before the input hook of layer {missing[0]}; "
                "this model's module order does not match the transcoder's hook points")
        if len(sources) == 1:
            coef = state[sources[0]]
        elif sources in state:
            coef = state[sources]
        else:
            coef = state[sources] = torch.cat([state[l] for l in sources], dim=-1)
        return out + (coef @ D).to(out.dtype)

    with ExitStack() as stack:
        handles = [model.register_forward_pre_hook(on_forward, with_kwargs=True)]
        stack.callback(lambda: [h.remove() for h in handles])
        for l in readers:
            module, io = resolve_hook(model, transcoder.feature_input_hook, l)
            handles.append(read_tensor(module, io, lambda x, l=l: read(l, x)))
        for k in sorted(writes):
            module, io = resolve_hook(model, transcoder.feature_output_hook, k)
            if io != "output":
                raise ValueError(f"{transcoder.feature_output_hook} is an input hook point; "
                                 "steering writes to an output hook point")

            def post_out(mod, args, out, k=k):
                if isinstance(out, tuple):
                    return (write(k, out[0]),) + tuple(out[1:])
                return write(k, out)
            handles.append(module.register_forward_hook(post_out))
        yield


@torch.inference_mode()
def feature_activations(model, transcoder, layer: int, indices: Sequence[int],
                        input_ids: torch.Tensor) -> torch.Tensor:
    """Activations [T, n] of features (layer, indices) on one prompt, position 0 zeroed."""
    reader = _FeatureReader(transcoder, layer, indices).to(next(model.parameters()).device)
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if ids.shape[0] != 1:
        raise ValueError(f"feature_activations takes one prompt [1, T], got input_ids {tuple(ids.shape)}")
    with capture(model, transcoder.feature_input_hook, [layer]) as store:
        model(ids.to(next(model.parameters()).device))
    a = reader(store[layer][0])
    a[0] = 0
    return a


def typical_activation(model, transcoder, layer: int, index: int,
                       input_ids_list: Sequence[torch.Tensor]) -> float:
    """Mean activation of feature (layer, index) over the positions where it is active (> 0).

    Measured on the prompts the steering will be applied to, so a strength grid in multiples of
    it means the same thing for every feature. Raises if the feature never fires there.
    """
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    for ids in tqdm(input_ids_list, desc=f"typical act L{layer}/{index}", leave=False,
                    disable=len(input_ids_list) < 8):
        a = feature_activations(model, transcoder, layer, [index], ids)[:, 0]
        on = a > 0
        total += float(a[on].sum())
        count += int(on.sum())
    if count == 0:
        raise ValueError(
            f"feature (layer {layer}, index {index}) is never active on these {len(input_ids_list)} "
            "prompts; pass an explicit clamp value instead of a multiple of its typical activation")
    return total / count


def strength_sweep(layer: int, index: int, multipliers: Sequence[float], typical: float,
                   mode: Mode = "clamp") -> list[FeatureSteer]:
    """One FeatureSteer per multiplier: clamp to ``m * typical`` (or scale by ``m``)."""
    return [FeatureSteer(layer, index, mode, m * typical if mode == "clamp" else m) for m in multipliers]
