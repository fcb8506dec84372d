"""Export attribution graphs: circuit-tracer / Neuronpedia frontend JSON, networkx + GraphML, refusal subgraph.

Three views of one saved ``circuit_tracer.graph.Graph`` (see ``graph_io``):

* :func:`frontend_graph` -> circuit-tracer's pydantic ``frontend.graph_models.Model`` (metadata, qParams,
  nodes with node_id / feature / layer / ctx_idx / feature_type / influence / activation / is_target_logit,
  links with source / target / weight): the JSON that circuit-tracer's local frontend and Neuronpedia
  load. Pruning is circuit-tracer's ``prune_graph`` (node / edge influence thresholds, defaults 0.8 / 0.98)
  and nodes / links come from its ``create_nodes`` / ``create_used_nodes_and_edges``, so node ids match
  circuit-tracer's exactly.
* :func:`to_networkx` / GraphML for analysis, built from that JSON (so all views show the same graph).
* :func:`refusal_subgraph`: the strongest paths from chosen (top-ranked CRaFT) features to the
  refusal / compliance logit nodes, as compact JSON.

Node ids follow circuit-tracer: feature ``{layer}_{feature}_{pos}``, error ``{layer}_-1_{pos}`` (see
:func:`graph_nodes`), token
``E_{token_id}_{pos}``, logit ``{n_layers+1}_{vocab_idx}_{last_pos}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import networkx as nx
import torch
from circuit_tracer.frontend.graph_models import Metadata, Model, Node, QParams
from circuit_tracer.graph import Graph, normalize_matrix, prune_graph
from circuit_tracer.utils.create_graph_files import create_nodes, create_used_nodes_and_edges

from crafttrace.graph_io import load_graph
from crafttrace.runs import atomic_write_text

log = logging.getLogger(__name__)

# crafttrace.attribution's CustomTarget labels; graphs with plain token targets pass their own labels.
REFUSAL_LABELS = ("refuse",)
COMPLIANCE_LABELS = ("comply",)
DIFFERENCE_LABELS = ("refuse-minus-comply",)

Feature = tuple[int, int]  # (layer, feature index) of a CLT feature


def as_graph(graph_or_path: Graph | str | os.PathLike) -> Graph:
    """A Graph, loaded with ``graph_io.load_graph`` when given a path; float32 on CPU for numpy export."""
    g = graph_or_path if isinstance(graph_or_path, Graph) else load_graph(graph_or_path)
    if g.adjacency_matrix.dtype != torch.float32 or g.adjacency_matrix.device.type != "cpu":
        # copy, don't mutate the caller's graph; create_used_nodes_and_edges calls .numpy() on it
        g = Graph(input_string=g.input_string, input_tokens=g.input_tokens.cpu(),
                  active_features=g.active_features.cpu(), adjacency_matrix=g.adjacency_matrix.float().cpu(),
                  cfg=g.cfg, selected_features=g.selected_features.cpu(), activation_values=g.activation_values.cpu(),
                  logit_targets=g.logit_targets, logit_probabilities=g.logit_probabilities.float().cpu(),
                  scan=g.scan, vocab_size=g.vocab_size)
    return g


def _prompt_tokens(graph: Graph, tokenizer=None, prompt_tokens: Sequence[str] | None = None) -> list[str]:
    ids = [int(t) for t in graph.input_tokens]
    if prompt_tokens is not None:
        if len(prompt_tokens) != len(ids):
            raise ValueError(f"prompt_tokens has {len(prompt_tokens)} strings for a graph of {len(ids)} tokens")
        return list(prompt_tokens)
    if tokenizer is None:
        # circuit-tracer loads the tokenizer from the hub by name; offline we only try local files.
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(graph.cfg.tokenizer_name, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure just means "no tokenizer here"
            log.warning("no local tokenizer %r (%s); token labels are ids", graph.cfg.tokenizer_name,
                        type(e).__name__)
            return [f"<{i}>" for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def graph_nodes(graph: Graph, node_mask: torch.Tensor, cumulative: torch.Tensor) -> dict[int, Node]:
    """circuit-tracer's ``create_nodes`` (adjacency index -> frontend Node), with unique error ids.

    circuit-tracer 0.5.0 names error nodes ``0_{layer}_{pos}``, which collides with the layer-0 feature
    ``{layer}`` at the same position (circuit-tracer issue #78); we use upstream's fix (PR #102),
    ``{layer}_-1_{pos}``, so node ids are unique keys for links, networkx and the viewer.
    """
    nodes = create_nodes(graph, node_mask, None, cumulative)
    for node in nodes.values():
        if node.feature_type == "mlp reconstruction error":
            node.node_id = f"{node.layer}_-1_{node.ctx_idx}"
    return nodes


def _scan_id(scan: str | list[str] | None) -> tuple[str, list[str]]:
    # circuit-tracer's build_model names a transcoder list "custom-<hash(str)>", with Python's salted
    # str hash, so the id changes every process; a sha1 keeps exports reproducible.
    if isinstance(scan, list):
        return "custom-" + hashlib.sha1("-".join(scan).encode()).hexdigest()[:12], list(scan)
    return (scan or "unknown"), []


def feature_node_ids(nodes: Iterable[Node], features: Iterable[Feature]) -> list[str]:
    """node_ids of every (position of every) given CLT feature among frontend nodes."""
    want = {(int(l), int(i)) for l, i in features}
    out = []
    for n in nodes:
        if n.feature_type == "cross layer transcoder":
            layer, feat, _pos = n.node_id.split("_")
            if (int(layer), int(feat)) in want:
                out.append(n.node_id)
    return out


def frontend_graph(graph_or_path: Graph | str | os.PathLike, slug: str = "graph", *,
                   node_threshold: float | None = 0.8, edge_threshold: float | None = 0.98,
                   tokenizer=None, prompt_tokens: Sequence[str] | None = None,
                   pinned: Iterable[Feature] = ()) -> Model:
    """circuit-tracer frontend / Neuronpedia graph JSON as its pydantic ``Model``.

    Thresholds ``None`` export the full graph: every node and every non-zero edge. ``pinned`` CLT
    features (e.g. CRaFT's top-ranked ones) become the frontend's pinned nodes.
    """
    graph = as_graph(graph_or_path)
    if graph.scan is None:
        log.warning("graph has no scan (transcoder id); Neuronpedia upload needs one")
    full = node_threshold is None or edge_threshold is None
    node_mask, edge_mask, cumulative = prune_graph(graph, 1.0 if full else node_threshold,
                                                   1.0 if full else edge_threshold)
    if full:
        node_mask = torch.ones_like(node_mask)
        edge_mask = graph.adjacency_matrix != 0
    nodes = graph_nodes(graph, node_mask, cumulative)
    used_nodes, used_links = create_used_nodes_and_edges(graph, nodes, edge_mask)
    scan, transcoder_list = _scan_id(graph.scan)
    model = Model(
        metadata=Metadata(slug=slug, scan=scan, transcoder_list=transcoder_list,
                          prompt_tokens=_prompt_tokens(graph, tokenizer, prompt_tokens),
                          prompt=graph.input_string, node_threshold=1.0 if full else node_threshold),
        qParams=QParams(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos=""),
        nodes=used_nodes, links=used_links)
    pins = feature_node_ids(model.nodes, pinned)
    model.qParams.pinnedIds = pins
    model.qParams.clickedId = pins[0] if pins else ""
    return model


def load_frontend(path: str | os.PathLike) -> Model:
    """Read and validate a frontend graph JSON file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no frontend graph JSON at {p}")
    try:
        return Model.model_validate_json(p.read_text(encoding="utf-8"))
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        raise ValueError(f"{p}: not a circuit-tracer frontend graph: {e}") from None


def write_frontend(model: Model, out_dir: str | os.PathLike) -> Path:
    """Write ``<slug>.json`` and register it in ``graph-metadata.json`` (what the frontend lists)."""
    out_dir = Path(out_dir)
    out = atomic_write_text(out_dir / f"{model.metadata.slug}.json", model.model_dump_json(indent=2))
    # circuit-tracer's add_graph_metadata does the same merge, but in place (not atomic)
    index = out_dir / "graph-metadata.json"
    graphs = json.loads(index.read_text())["graphs"] if index.is_file() else []
    graphs = [g for g in graphs if g.get("slug") != model.metadata.slug] + [model.metadata.model_dump()]
    atomic_write_text(index, json.dumps({"graphs": graphs}, indent=2))
    return out


# ------------------------------------------------------------------------------------------- networkx

def _layer_num(node, n_layers: int) -> int:
    """Numeric layer for layout / analysis: embeddings -1, logits n_layers (frontend writes n_layers+1)."""
    if node.feature_type == "embedding":
        return -1
    if node.feature_type == "logit":
        return n_layers
    return int(node.layer)


def to_networkx(model: Model) -> nx.DiGraph:
    """DiGraph with the frontend's node fields as attributes and ``weight`` on edges (source -> target).

    Extra attributes: ``layer_num`` (int), and for CLT features ``feature_index`` (the transcoder
    feature, not the frontend's Cantor-paired ``feature``).
    """
    n_layers = max((int(n.layer) for n in model.nodes if n.feature_type == "logit"), default=1) - 1
    G = nx.DiGraph(slug=model.metadata.slug, prompt=model.metadata.prompt, scan=model.metadata.scan)
    for n in model.nodes:
        attrs = {k: v for k, v in n.model_dump().items() if v is not None and k != "node_id"}
        attrs["layer_num"] = _layer_num(n, n_layers)
        if n.feature_type == "cross layer transcoder":
            attrs["feature_index"] = int(n.node_id.split("_")[1])
        G.add_node(n.node_id, **attrs)
    for link in model.links:
        G.add_edge(link["source"], link["target"], weight=float(link["weight"]))
    return G


def write_graphml(model: Model, path: str | os.PathLike) -> Path:
    buf = "\n".join(nx.generate_graphml(to_networkx(model)))
    return atomic_write_text(path, buf + "\n")


# ---------------------------------------------------------------------------------- refusal subgraph

def target_rows(graph: Graph, labels: Sequence[str] | None = None) -> dict[str, int]:
    """Adjacency row of each logit target, by label; default: the refusal / compliance / difference
    targets present (crafttrace.attribution's labels), else every logit target."""
    n = graph.adjacency_matrix.shape[0]
    k = len(graph.logit_targets)
    by_label = {t.token_str: n - k + i for i, t in enumerate(graph.logit_targets)}
    if labels is None:
        labels = [l for l in (*DIFFERENCE_LABELS, *REFUSAL_LABELS, *COMPLIANCE_LABELS) if l in by_label]
        if not labels:
            labels = list(by_label)  # plain token targets: use all of them
    missing = [l for l in labels if l not in by_label]
    if missing:
        raise ValueError(f"logit targets {missing} not in graph; it has {list(by_label)}")
    return {l: by_label[l] for l in labels}


def _max_product(edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n: int, start: list[int],
                 forward: bool, max_iter: int) -> torch.Tensor:
    """Best path product from any ``start`` node to every node (forward=True), or from every node to a
    ``start`` node (forward=False), by max-product relaxation over the DAG's (target, source, value) edges."""
    rows, cols, vals = edges
    src, dst = (cols, rows) if forward else (rows, cols)
    best = torch.zeros(n, dtype=vals.dtype)
    best[start] = 1.0
    for _ in range(max_iter):
        new = best.clone().scatter_reduce_(0, dst, vals * best[src], reduce="amax")
        if torch.equal(new, best):
            return best
        best = new
    raise RuntimeError(f"path search did not converge in {max_iter} steps: adjacency is not a DAG")


@dataclass
class SubgraphSettings:
    paths_per_pair: int = 3      # strongest paths kept per (feature, target)
    min_ratio: float = 1e-3      # ignore paths weaker than this fraction of the pair's strongest
    labels: list[str] | None = field(default=None)  # logit targets; default: refusal + compliance


def refusal_subgraph(graph_or_path: Graph | str | os.PathLike, features: Sequence[Feature],
                     settings: SubgraphSettings | None = None, slug: str = "graph") -> dict[str, Any]:
    """Strongest paths from the given CLT features (at every position they are active) to the
    refusal / compliance logit nodes of the full (unpruned) graph.

    Edge strength is circuit-tracer's influence normalisation: |A[t, s]| / sum_s' |A[t, s']|, the
    fraction of node t's absolute input coming from s; a path's strength is the product along it
    (so it is comparable across paths of different length). Each path also reports its raw edge
    weights and the sign of their product. Returns plain JSON (nodes, links = union of the paths).
    """
    s = settings or SubgraphSettings()
    graph = as_graph(graph_or_path)
    n = graph.adjacency_matrix.shape[0]
    cumulative = prune_graph(graph, 1.0, 1.0).cumulative_scores
    nodes = graph_nodes(graph, torch.ones(n, dtype=torch.bool), cumulative)
    ids = [nodes[i].node_id for i in range(n)]
    row_of = {nid: i for i, nid in enumerate(ids)}
    targets = target_rows(graph, s.labels)
    feats = [(int(l), int(i)) for l, i in features]
    sources = {f: [row_of[nid] for nid in feature_node_ids(nodes.values(), [f])] for f in feats}
    absent = [f for f, rows in sources.items() if not rows]
    if absent:
        log.warning("features %s are not among the graph's selected feature nodes", absent)

    A = graph.adjacency_matrix
    W = normalize_matrix(A)
    r, c = W.nonzero(as_tuple=True)
    edges = (r, c, W[r, c])
    depth = graph.cfg.n_layers + 3
    from_feat = {f: _max_product(edges, n, srcs, True, depth) for f, srcs in sources.items() if srcs}
    paths, used = [], set()
    for label, trow in targets.items():
        to_target = _max_product(edges, n, [trow], False, depth)
        for f, srcs in sources.items():
            best = float(to_target[srcs].max()) if srcs else 0.0
            if best <= 0:
                continue
            # Yen's k-shortest paths (networkx) on -log strengths, from a virtual source joined to every
            # position of the feature. Any path of strength >= min_ratio*best only visits nodes v with
            # from(v) * to(v) >= that bound, so the search runs on that (small) induced subgraph.
            keep = ((from_feat[f] * to_target) >= s.min_ratio * best).nonzero().flatten().tolist()
            sub = W[keep][:, keep]
            G = nx.DiGraph()
            G.add_edges_from((-1, src, {"cost": 0.0}) for src in srcs)
            G.add_edges_from((keep[j], keep[i], {"cost": -math.log(float(sub[i, j]))})
                             for i, j in sub.nonzero().tolist())
            for k, path in enumerate(nx.shortest_simple_paths(G, -1, trow, weight="cost")):
                path = path[1:]
                strength = math.prod(float(W[b, a]) for a, b in zip(path, path[1:]))
                if k >= s.paths_per_pair or strength < s.min_ratio * best:
                    break
                weights = [float(A[b, a]) for a, b in zip(path, path[1:])]
                used.update(zip(path, path[1:]))
                paths.append({"feature": list(f), "target": label, "strength": strength,
                              "sign": 1 if math.prod(weights) > 0 else -1,
                              "nodes": [ids[i] for i in path], "weights": weights})
    keep_nodes = sorted({i for e in used for i in e} | set(targets.values()))
    fields = {"node_id", "feature_type", "layer", "ctx_idx", "activation", "influence", "clerp"}
    return {
        "slug": slug, "prompt": graph.input_string, "scan": _scan_id(graph.scan)[0],
        "features": [list(f) for f in feats], "absent_features": [list(f) for f in absent],
        "targets": {l: ids[r] for l, r in targets.items()},
        "edge_strength": "normalized |A| (fraction of target's absolute input); path strength = product",
        "nodes": [nodes[i].model_dump(include=fields) for i in keep_nodes],
        "links": [{"source": ids[a], "target": ids[b], "weight": float(A[b, a])} for a, b in sorted(used)],
        "paths": sorted(paths, key=lambda p: -p["strength"]),
    }


# ----------------------------------------------------------------------------------------- one call

def export_graph(graph_or_path: Graph | str | os.PathLike, out_dir: str | os.PathLike, slug: str = "graph",
                 node_threshold: float | None = 0.8, edge_threshold: float | None = 0.98,
                 features: Sequence[Feature] = (), tokenizer=None,
                 graphml: bool = True) -> dict[str, Path]:
    """Write ``<slug>.json`` (+ graph-metadata.json), ``<slug>.graphml`` and, when ``features`` are given,
    ``<slug>.refusal_subgraph.json`` into ``out_dir``. Returns {kind: path}."""
    graph = as_graph(graph_or_path)
    model = frontend_graph(graph, slug, node_threshold=node_threshold, edge_threshold=edge_threshold,
                           tokenizer=tokenizer, pinned=features)
    out = {"frontend": write_frontend(model, out_dir)}
    if graphml:
        out["graphml"] = write_graphml(model, Path(out_dir) / f"{slug}.graphml")
    if features:
        sub = refusal_subgraph(graph, features, slug=slug)
        out["refusal_subgraph"] = atomic_write_text(Path(out_dir) / f"{slug}.refusal_subgraph.json",
                                                    json.dumps(sub, indent=2))
    return out
