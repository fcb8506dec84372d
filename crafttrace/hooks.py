"""Hook points: the public vocabulary shared by transcoders, training, steering and attribution.

Names are TransformerLens hook names (``hook_resid_mid``, ``hook_mlp_out``, ``mlp.hook_in``,
``mlp.hook_out``), exactly as circuit-tracer writes them in a transcoder's ``config.yaml``.
They are resolved on a *plain* Hugging Face model with circuit-tracer's own architecture
registry (``tl_nnsight_mapping``), so crafttrace's forward hooks read and write the very
tensors circuit-tracer's nnsight backend reads and writes during attribution.

For a Llama model:
  hook_resid_mid -> input  of model.layers[i].post_attention_layernorm (residual after attention)
  mlp.hook_in    -> output of model.layers[i].post_attention_layernorm (normalised MLP input)
  hook_mlp_out   -> output of model.layers[i].mlp
For Gemma 3 the MLP is wrapped by pre/post feed-forward norms; see circuit-tracer's registry.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
from circuit_tracer.utils.tl_nnsight_mapping import get_mapping

IO = Literal["input", "output"]


def architecture(model: torch.nn.Module) -> str:
    """HF architecture class name; GGUF loading leaves ``config.architectures`` empty."""
    archs = getattr(model.config, "architectures", None)
    return archs[0] if archs else type(model).__name__


def _resolve_path(root: torch.nn.Module, path: str) -> torch.nn.Module:
    cur: object = root
    for token in path.split("."):
        m = re.fullmatch(r"(\w+)\[(\d+)\]", token)
        cur = getattr(cur, m.group(1))[int(m.group(2))] if m else getattr(cur, token)
    return cur  # type: ignore[return-value]


def resolve_hook(model: torch.nn.Module, hook_name: str, layer: int) -> tuple[torch.nn.Module, IO]:
    """Return (module, 'input'|'output') for a TL hook name at ``layer`` of a plain HF model."""
    try:
        mapping = get_mapping(architecture(model))
    except ValueError as e:
        raise ValueError(f"crafttrace cannot place hooks on this model: {e}") from None
    if hook_name not in mapping.feature_hook_mapping:
        raise ValueError(
            f"unknown hook point {hook_name!r} for {mapping.model_architecture}; "
            f"known: {sorted(mapping.feature_hook_mapping)}"
        )
    pattern, io = mapping.feature_hook_mapping[hook_name]
    # circuit-tracer's Gemma patterns reach into nnsight `.source` internals; we only need the module.
    pattern = pattern.split(".source")[0]
    n_layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else None
    if n_layers is not None and not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer} out of range for a model with {n_layers} layers")
    return _resolve_path(model, pattern.format(layer=layer)), io


def read_tensor(module: torch.nn.Module, io: IO, fn: Callable[[torch.Tensor], None]):
    """Call ``fn`` on a module's first input or output tensor at every forward; returns the hook handle.

    The one place that knows how to reach the tensor of an input (positional or keyword) or output
    (plain or tuple) hook point; capture, steering and the monitor all read through it.
    """
    if io == "input":
        def pre(mod, args, kwargs):
            fn(args[0] if args else next(iter(kwargs.values())))
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, out):
        fn(out[0] if isinstance(out, tuple) else out)
    return module.register_forward_hook(post)


@contextmanager
def edit_module(module: torch.nn.Module, io: IO, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a module's first input or output tensor with ``fn(tensor)``; removed on exit, even on error."""
    if io == "input":
        def pre(mod, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            return args, {**kwargs, key: fn(kwargs[key])}
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(mod, args, out):
            if isinstance(out, tuple):
                return (fn(out[0]),) + tuple(out[1:])
            return fn(out)
        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture(model: torch.nn.Module, hook_name: str, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the tensor at ``hook_name`` for each layer during forwards inside the block."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer in layers:
            module, io = resolve_hook(model, hook_name, layer)
            handles.append(read_tensor(module, io, lambda x, layer=layer: store.__setitem__(layer, x.detach())))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(model: torch.nn.Module, hook_name: str, layer: int,
                fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the tensor at an *output* hook point with ``fn(tensor)``; removed on exit, even on error."""
    module, io = resolve_hook(model, hook_name, layer)
    if io != "output":
        raise ValueError(f"{hook_name} is an input hook point; edit_output needs an output point")
    with edit_module(module, io, fn):
        yield
