import json
import math

import networkx as nx
import pytest
import torch
from circuit_tracer.frontend.graph_models import Model
from circuit_tracer.graph import normalize_matrix, prune_graph
from graph_fixtures import COMPLIANCE, REFUSAL, synthetic_graph

from crafttrace.export import (SubgraphSettings, export_graph, frontend_graph, load_frontend,
                               refusal_subgraph, to_networkx)
from crafttrace.graph_io import save_graph

TOKENS = ["<bos>", "How", "do", "I", "?"]


def expected_counts(g, node_threshold=0.8, edge_threshold=0.98):
    node_mask, edge_mask, _ = prune_graph(g, node_threshold, edge_threshold)
    edges = edge_mask & node_mask[:, None] & node_mask[None, :]
    n_keep_always = len(g.input_tokens) + len(g.logit_targets)
    used = edges.any(0) | edges.any(1)
    used[-n_keep_always:] = True
    return int((used & node_mask).sum()), int(edges.sum())


def test_frontend_json_pruned_matches_prune_graph(tmp_path):
    g = synthetic_graph()
    m = frontend_graph(g, "syn", prompt_tokens=TOKENS, pinned=[(2, 9)])
    # validates against circuit-tracer's pydantic schema after a JSON round trip
    m2 = Model.model_validate_json(m.model_dump_json())
    n_nodes, n_links = expected_counts(g)
    assert (len(m2.nodes), len(m2.links)) == (n_nodes, n_links)
    assert 0 < n_nodes < g.adjacency_matrix.shape[0]  # it really pruned
    ids = [n.node_id for n in m2.nodes]
    assert len(set(ids)) == len(ids)  # circuit-tracer 0.5 error ids collide with layer-0 features here
    assert {l["source"] for l in m2.links} | {l["target"] for l in m2.links} <= set(ids)
    assert m2.metadata.prompt_tokens == TOKENS and m2.metadata.node_threshold == 0.8
    assert m2.qParams.pinnedIds and all(p.startswith("2_9_") for p in m2.qParams.pinnedIds)
    logits = [n for n in m2.nodes if n.feature_type == "logit"]
    assert [n.is_target_logit for n in logits] == [True, False]
    assert REFUSAL in logits[0].clerp and COMPLIANCE in logits[1].clerp
    # feature activation is the graph's activation for that (layer, pos, feature)
    acts = {tuple(g.active_features[i].tolist()): float(g.activation_values[i]) for i in g.selected_features}
    for n in m2.nodes:
        if n.feature_type == "cross layer transcoder":
            layer, feat, pos = map(int, n.node_id.split("_"))
            assert n.activation == pytest.approx(acts[(layer, pos, feat)])
            assert 0 <= n.influence <= 1


def test_full_export_keeps_every_nonzero_edge():
    g = synthetic_graph(seed=1)
    m = frontend_graph(g, node_threshold=None, edge_threshold=None, prompt_tokens=TOKENS)
    assert len(m.links) == int((g.adjacency_matrix != 0).sum())
    assert m.metadata.node_threshold == 1.0  # Neuronpedia wants a number: 1.0 = keep everything
    # weights: rebuild a dense matrix from the links through networkx and compare
    G = to_networkx(m)
    assert G.number_of_edges() == len(m.links)
    assert sum(abs(d["weight"]) for *_, d in G.edges(data=True)) == pytest.approx(
        float(g.adjacency_matrix.abs().sum()), rel=1e-5)


def test_export_files_graphml_round_trip(tmp_path):
    g = synthetic_graph(seed=2, scan=["tc/l0", "tc/l1"])
    path = save_graph(g, tmp_path / "cache" / "graph_x")
    out = export_graph(path, tmp_path / "out", slug="p1", features=[(1, 8)])
    export_graph(path, tmp_path / "out", slug="p2")
    m = load_frontend(out["frontend"])
    assert m.metadata.scan.startswith("custom-") and m.metadata.transcoder_list == ["tc/l0", "tc/l1"]
    index = json.loads((tmp_path / "out" / "graph-metadata.json").read_text())
    assert [x["slug"] for x in index["graphs"]] == ["p1", "p2"]
    G = nx.read_graphml(out["graphml"])
    assert (G.number_of_nodes(), G.number_of_edges()) == (len(m.nodes), len(m.links))
    for link in m.links:
        assert G.edges[link["source"], link["target"]]["weight"] == pytest.approx(link["weight"])
    feats = [n for n, d in G.nodes(data=True) if d["feature_type"] == "cross layer transcoder"]
    assert all(G.nodes[n]["feature_index"] == int(n.split("_")[1]) for n in feats)
    assert {d["layer_num"] for _, d in G.nodes(data=True) if d["feature_type"] == "logit"} == {4}
    sub = json.loads(out["refusal_subgraph"].read_text())
    assert sub["features"] == [[1, 8]] and sub["paths"]
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_load_frontend_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_frontend(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="bad.json: not a circuit-tracer frontend graph"):
        load_frontend(bad)
    with pytest.raises(ValueError, match="prompt_tokens has 2 strings for a graph of 5 tokens"):
        frontend_graph(synthetic_graph(), prompt_tokens=["a", "b"])


def _brute_force_top(g, sources, target_row, k):
    W = normalize_matrix(g.adjacency_matrix)
    G = nx.DiGraph()
    for t, s in (W > 0).nonzero().tolist():
        G.add_edge(s, t)
    found = []
    for s in sources:
        for path in nx.all_simple_paths(G, s, target_row):
            found.append((math.prod(float(W[b, a]) for a, b in zip(path, path[1:])), path))
    return sorted(found, key=lambda x: -x[0])[:k]


def test_refusal_subgraph_strongest_paths_match_brute_force():
    g = synthetic_graph(n_layers=3, n_pos=3, feats_per_site=2, seed=4, density=0.6)
    feature = (1, 8)  # fixture feature indices are 7*f + layer
    sub = refusal_subgraph(g, [feature, (0, 999)], SubgraphSettings(paths_per_pair=4, min_ratio=0.0,
                                                                      labels=[REFUSAL, COMPLIANCE]))
    assert sub["absent_features"] == [[0, 999]]
    n = g.adjacency_matrix.shape[0]
    sel = g.active_features[g.selected_features]
    sources = [i for i in range(len(sel)) if (int(sel[i, 0]), int(sel[i, 2])) == feature]
    assert sources
    for j, label in enumerate([REFUSAL, COMPLIANCE]):
        want = _brute_force_top(g, sources, n - 2 + j, 4)
        assert len(want) == 4
        got = [p for p in sub["paths"] if p["target"] == label]
        assert [p["strength"] for p in got] == pytest.approx([w for w, _ in want], rel=1e-5)
        assert got[0]["nodes"][-1] == sub["targets"][label]
        A = g.adjacency_matrix
        assert got[0]["weights"] == pytest.approx([float(A[b, a]) for a, b in zip(want[0][1], want[0][1][1:])])
    ids = {x["node_id"] for x in sub["nodes"]}
    assert all(l["source"] in ids and l["target"] in ids for l in sub["links"])


def test_refusal_subgraph_default_targets_are_crafttrace_labels():
    g = synthetic_graph(crafttrace_targets=True)
    sub = refusal_subgraph(g, [(2, 9)])
    assert list(sub["targets"]) == ["refuse-minus-comply", "refuse", "comply"]
    assert {p["target"] for p in sub["paths"]} == set(sub["targets"])
    with pytest.raises(ValueError, match=r"logit targets \['I'\] not in graph; it has \['refuse-minus-comply'"):
        refusal_subgraph(g, [(2, 9)], SubgraphSettings(labels=["I"]))
