import json
import struct

import pytest
import torch
from graph_fixtures import synthetic_graph

from crafttrace.graph_io import GraphFileError, load_graph, load_graph_extra, save_graph

FIELDS = ("input_tokens", "active_features", "adjacency_matrix", "selected_features",
          "activation_values", "logit_probabilities")


def assert_same_graph(a, b):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name
    assert b.logit_targets == a.logit_targets
    assert b.input_string == a.input_string and b.scan == a.scan and b.vocab_size == a.vocab_size
    assert b.cfg == a.cfg
    assert b.n_pos == a.n_pos


@pytest.mark.parametrize("virtual", [False, True])
def test_round_trip_directory(tmp_path, virtual):
    g = synthetic_graph(virtual_target=virtual, scan=["tc/layer0", "tc/layer1"] if virtual else "clt-x")
    out = save_graph(g, tmp_path / "run", extra={"roles": {"refusal": 0, "compliance": 1}})
    assert out == tmp_path / "run" / "graph.safetensors"
    h = load_graph(tmp_path / "run")
    assert_same_graph(g, h)
    assert load_graph_extra(out) == {"roles": {"refusal": 0, "compliance": 1}}
    if virtual:  # CustomTarget label and its virtual index survive
        assert h.logit_targets[0].token_str == "logit(I)-logit(Sure)" and h.logit_targets[0].vocab_idx == 100
    # no stray temp files from the atomic write
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["graph.safetensors"]


def test_round_trip_file_path_and_noncontiguous_bf16(tmp_path):
    g = synthetic_graph(seed=3)
    g.adjacency_matrix = g.adjacency_matrix.to(torch.bfloat16)
    g.active_features = g.active_features.T.contiguous().T  # sparse .indices().T is a strided view
    h = load_graph(save_graph(g, tmp_path / "g.safetensors"))
    assert_same_graph(g, h)
    # the loaded graph still works with circuit-tracer's own pruning
    from circuit_tracer.graph import prune_graph
    h.adjacency_matrix = h.adjacency_matrix.float()
    assert prune_graph(h).node_mask.any()


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope" / "graph.safetensors")):
        load_graph(tmp_path / "nope")


def test_truncated_file(tmp_path):
    f = save_graph(synthetic_graph(), tmp_path / "g.safetensors")
    f.write_bytes(f.read_bytes()[:-50])
    with pytest.raises(GraphFileError, match=r"g\.safetensors.*truncated or corrupt"):
        load_graph(f)


def test_garbage_and_pickle_rejected(tmp_path):
    f = tmp_path / "graph.safetensors"
    f.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(GraphFileError, match="graph.safetensors"):
        load_graph(tmp_path)
    # a valid safetensors file without our metadata is refused, not guessed at
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(f))
    with pytest.raises(GraphFileError, match="not a crafttrace graph"):
        load_graph(f)


def _rewrite_header(f, mutate):
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["crafttrace.graph"])
    mutate(meta, header)
    header["__metadata__"]["crafttrace.graph"] = json.dumps(meta)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def test_malformed_metadata(tmp_path):
    f = save_graph(synthetic_graph(), tmp_path / "g.safetensors")
    _rewrite_header(f, lambda m, h: m.pop("logit_targets"))
    with pytest.raises(GraphFileError, match=r"missing fields \['logit_targets'\]"):
        load_graph(f)
    f = save_graph(synthetic_graph(), tmp_path / "g.safetensors")
    _rewrite_header(f, lambda m, h: m["logit_targets"].pop())
    with pytest.raises(GraphFileError, match="logit_probabilities shape .* does not match 1 logit_targets"):
        load_graph(f)
    f = save_graph(synthetic_graph(), tmp_path / "g.safetensors")
    _rewrite_header(f, lambda m, h: m.update(version=99))
    with pytest.raises(GraphFileError, match="version 99"):
        load_graph(f)


def test_save_rejects_inconsistent_graph(tmp_path):
    g = synthetic_graph()
    g.adjacency_matrix = g.adjacency_matrix[:-1, :-1]
    with pytest.raises(ValueError, match=r"adjacency_matrix shape \(74, 74\) != \(75, 75\)"):
        save_graph(g, tmp_path)
    with pytest.raises(TypeError, match="plain JSON"):
        save_graph(synthetic_graph(), tmp_path, extra={"t": torch.zeros(1)})
    assert not any(tmp_path.iterdir())
