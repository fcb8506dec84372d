"""Small synthetic circuit-tracer Graphs for the graph_io / export / viewer tests.

Built straight from ``circuit_tracer.graph.Graph.__init__`` so these tests depend on no other crafttrace
module. Node order is circuit-tracer's: [selected features, errors (layer-major), tokens, logits];
rows are targets, columns sources. Edges only run from lower to higher layers and from earlier or equal
positions, so the adjacency matrix is nilpotent like a real attribution graph.
"""

from __future__ import annotations

import torch
from circuit_tracer.attribution.targets import LogitTarget
from circuit_tracer.graph import Graph
from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

REFUSAL, COMPLIANCE = "I", "Sure"
CRAFTTRACE_LABELS = ("refuse-minus-comply", "refuse", "comply")


def synthetic_graph(n_layers: int = 4, n_pos: int = 5, feats_per_site: int = 3, seed: int = 0,
                    density: float = 0.5, virtual_target: bool = False, crafttrace_targets: bool = False, scan: str | list[str] | None = "synthetic-clt",
                    d_vocab: int = 100) -> Graph:
    g = torch.Generator().manual_seed(seed)
    cfg = UnifiedConfig(n_layers=n_layers, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=d_vocab,
                        tokenizer_name="synthetic-tokenizer", model_name="synthetic-model",
                        original_architecture="LlamaForCausalLM", dtype=torch.float32)
    active = torch.tensor([[l, p, 7 * f + l] for l in range(n_layers) for p in range(n_pos)
                           for f in range(feats_per_site)], dtype=torch.long)
    n_active = active.shape[0]
    values = torch.rand(n_active, generator=g) * 5 + 0.1
    # keep a subset, like attribution's max_feature_nodes, so selected_features indexes active_features
    selected = torch.sort(torch.randperm(n_active, generator=g)[: max(1, int(0.8 * n_active))]).values
    if crafttrace_targets:  # crafttrace.attribution's three CustomTargets (virtual vocab indices)
        targets = [LogitTarget(label, d_vocab + i) for i, label in enumerate(CRAFTTRACE_LABELS)]
        probs = torch.tensor([1.0, 0.5, 0.5])
    else:
        if virtual_target:
            targets = [LogitTarget("logit(I)-logit(Sure)", d_vocab + 0), LogitTarget(COMPLIANCE, 41)]
        else:
            targets = [LogitTarget(REFUSAL, 40), LogitTarget(COMPLIANCE, 41)]
        probs = torch.tensor([0.7, 0.3])

    n_sel, n_logit = selected.shape[0], len(targets)
    # (layer, pos) of every node; embeddings sit below layer 0, logits above the last layer
    layer = torch.cat([active[selected, 0].float(), torch.arange(n_layers).repeat_interleave(n_pos).float(),
                       torch.full((n_pos,), -1.0), torch.full((n_logit,), float(n_layers))])
    pos = torch.cat([active[selected, 1].float(), torch.arange(n_pos).repeat(n_layers).float(),
                     torch.arange(n_pos).float(), torch.full((n_logit,), float(n_pos - 1))])
    n = layer.shape[0]
    allowed = (layer[None, :] < layer[:, None]) & (pos[None, :] <= pos[:, None])
    # only features and logits have incoming edges in circuit-tracer graphs
    allowed[n_sel: n - n_logit] = False
    mask = allowed & (torch.rand(n, n, generator=g) < density)
    adj = torch.randn(n, n, generator=g) * mask
    tokens = torch.randint(0, d_vocab, (n_pos,), generator=g)
    return Graph(input_string="synthetic prompt", input_tokens=tokens, active_features=active,
                 adjacency_matrix=adj, cfg=cfg, selected_features=selected, activation_values=values,
                 logit_targets=targets, logit_probabilities=probs, scan=scan, vocab_size=d_vocab)
