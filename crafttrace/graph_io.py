"""Attribution graphs on disk without pickle: one safetensors file, JSON metadata in its header.

circuit-tracer's ``Graph.to_pt`` / ``Graph.from_pt`` use ``torch.save`` / ``torch.load(weights_only=False)``,
so loading a graph file can execute arbitrary code. Here every tensor of a ``circuit_tracer.graph.Graph``
goes into a safetensors file and every other field (input string, model config, scan, logit targets
including the labels and virtual indices of ``CustomTarget`` directions, vocab size) into a JSON string
stored in the same file's ``__metadata__`` header. Loading parses JSON and raw tensor bytes only.

Layout of the JSON (key ``crafttrace.graph``)::

    {"format": "crafttrace.graph", "version": 1, "input_string": ..., "cfg": {...UnifiedConfig...},
     "scan": str | [str] | null, "vocab_size": int,
     "logit_targets": [{"token_str": ..., "vocab_idx": ...}, ...], "extra": {...caller's JSON...}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from circuit_tracer.attribution.targets import LogitTarget
from circuit_tracer.graph import Graph
from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig
from safetensors import SafetensorError, safe_open

from crafttrace.runs import write_tensors

FORMAT = "crafttrace.graph"
VERSION = 1
GRAPH_FILENAME = "graph.safetensors"
TENSOR_FIELDS = ("input_tokens", "active_features", "adjacency_matrix", "selected_features",
                 "activation_values", "logit_probabilities")


class GraphFileError(ValueError):
    """A graph file that is missing, truncated, or not in crafttrace's graph format."""


def graph_file(path: str | os.PathLike) -> Path:
    """``x.safetensors`` is the file itself; any other path is a directory holding ``graph.safetensors``."""
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / GRAPH_FILENAME


# ---------------------------------------------------------------------------------------------- checks

def check_graph(graph: Graph) -> None:
    """Raise ``ValueError`` naming the field and both shapes if the graph's tensors disagree."""
    if graph.input_tokens.dim() != 1:
        raise ValueError(f"input_tokens must be 1-D [n_pos], got shape {tuple(graph.input_tokens.shape)}")
    n_pos = graph.input_tokens.shape[0]
    af = graph.active_features
    if af.dim() != 2 or af.shape[1] != 3:
        raise ValueError(f"active_features must be [n_active, 3] (layer, pos, feature), got {tuple(af.shape)}")
    n_active = af.shape[0]
    if tuple(graph.activation_values.shape) != (n_active,):
        raise ValueError(f"activation_values shape {tuple(graph.activation_values.shape)} does not match "
                         f"active_features {tuple(af.shape)}: expected ({n_active},)")
    sel = graph.selected_features
    if sel.dim() != 1:
        raise ValueError(f"selected_features must be 1-D, got shape {tuple(sel.shape)}")
    if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= n_active):
        raise ValueError(f"selected_features index active_features[0:{n_active}] but span "
                         f"[{int(sel.min())}, {int(sel.max())}]")
    n_logits = len(graph.logit_targets)
    if tuple(graph.logit_probabilities.shape) != (n_logits,):
        raise ValueError(f"logit_probabilities shape {tuple(graph.logit_probabilities.shape)} does not match "
                         f"{n_logits} logit_targets")
    n_nodes = sel.shape[0] + graph.cfg.n_layers * n_pos + n_pos + n_logits
    if tuple(graph.adjacency_matrix.shape) != (n_nodes, n_nodes):
        raise ValueError(
            f"adjacency_matrix shape {tuple(graph.adjacency_matrix.shape)} != ({n_nodes}, {n_nodes}) = "
            f"{sel.shape[0]} features + {graph.cfg.n_layers} layers x {n_pos} error nodes + {n_pos} tokens "
            f"+ {n_logits} logits")


# ----------------------------------------------------------------------------------------------- save

def _cfg_to_json(cfg: UnifiedConfig) -> dict[str, Any]:
    d = dict(cfg.to_dict())
    if isinstance(d.get("dtype"), torch.dtype):
        d["dtype"] = str(d["dtype"])  # "torch.float32"; mapped back on load
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None)))}


def save_graph(graph: Graph, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``graph`` (plus optional JSON-serialisable ``extra``) atomically; returns the file path.

    ``path`` ending in ``.safetensors`` names the file; otherwise it is a directory and the file is
    ``<path>/graph.safetensors``.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"save_graph needs a circuit_tracer.graph.Graph, got {type(graph).__name__}")
    check_graph(graph)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "input_string": graph.input_string,
        "cfg": _cfg_to_json(graph.cfg),
        "scan": graph.scan,
        "vocab_size": int(graph.vocab_size),
        "logit_targets": [{"token_str": str(t.token_str), "vocab_idx": int(t.vocab_idx)}
                          for t in graph.logit_targets],
        "extra": extra or {},
    }
    try:
        header = json.dumps(meta, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"graph metadata / extra must be plain JSON: {e}") from None
    # safetensors refuses shared or strided storage: give each tensor its own contiguous CPU copy.
    tensors = {name: getattr(graph, name).detach().to("cpu").contiguous().clone() for name in TENSOR_FIELDS}
    return write_tensors(graph_file(path), tensors, metadata={FORMAT: header})


# ----------------------------------------------------------------------------------------------- load

def _read(path: str | os.PathLike, tensors: bool = True) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    f = graph_file(path)
    if not f.is_file():
        raise FileNotFoundError(f"no graph file at {f}" + (f" (looked inside directory {path})"
                                                           if f != Path(path) else ""))
    try:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            header = (st.metadata() or {}).get(FORMAT)
            data = {k: st.get_tensor(k) for k in st.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise GraphFileError(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if header is None:
        raise GraphFileError(f"{f}: safetensors file without {FORMAT!r} metadata; not a crafttrace graph "
                             "(circuit-tracer .pt graphs are pickles and are deliberately not loaded)")
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as e:
        raise GraphFileError(f"{f}: graph metadata is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GraphFileError(f"{f}: metadata does not declare format {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise GraphFileError(f"{f}: graph format version {meta.get('version')!r}, this crafttrace reads {VERSION}")
    missing = [k for k in TENSOR_FIELDS if tensors and k not in data]
    missing += [k for k in ("input_string", "cfg", "vocab_size", "logit_targets") if k not in meta]
    if missing:
        raise GraphFileError(f"{f}: missing fields {missing}")
    return f, meta, data


def _cfg_from_json(d: dict[str, Any]) -> UnifiedConfig:
    d = dict(d)
    dt = d.get("dtype")
    if isinstance(dt, str) and dt.startswith("torch."):
        cand = getattr(torch, dt.removeprefix("torch."), None)  # attribute lookup only; nothing runs
        d["dtype"] = cand if isinstance(cand, torch.dtype) else dt
    return UnifiedConfig.from_dict(d)


def load_graph(path: str | os.PathLike) -> Graph:
    """Load a graph written by ``save_graph``; raises ``GraphFileError`` naming the file on bad input."""
    f, meta, t = _read(path)
    try:
        targets = [LogitTarget(token_str=str(x["token_str"]), vocab_idx=int(x["vocab_idx"]))
                   for x in meta["logit_targets"]]
        cfg = _cfg_from_json(meta["cfg"])
    except (KeyError, TypeError, ValueError) as e:
        raise GraphFileError(f"{f}: malformed metadata field: {e!r}") from None
    graph = Graph(input_string=meta["input_string"], cfg=cfg, scan=meta.get("scan"),
                  vocab_size=int(meta["vocab_size"]), logit_targets=targets,
                  **{k: t[k] for k in TENSOR_FIELDS})
    try:
        check_graph(graph)
    except ValueError as e:
        raise GraphFileError(f"{f}: inconsistent graph: {e}") from None
    return graph


def load_graph_extra(path: str | os.PathLike) -> dict[str, Any]:
    """The caller's ``extra`` JSON saved with the graph (e.g. which logit targets are refusal/compliance)."""
    return dict(_read(path, tensors=False)[1].get("extra") or {})
