"""Attribution: circuit-tracer graphs to the refusal/compliance logits, and per-feature effects.

Two paths produce the same record, :class:`FeatureEffects` (one per prompt):

* ``graph``: circuit-tracer's ``attribute()`` on a ``ReplacementModel`` (nnsight backend wrapping the
  already-loaded HF model, so GGUF, local and hub models take one path), with three ``CustomTarget``
  logit directions: the set-mean refusal-minus-compliance difference, and each side (demeaned).
  Graphs are cached on disk as safetensors + JSON (``graph_io``; circuit-tracer's ``.pt`` unpickles),
  keyed by a hash of model, transcoder, prompt tokens and settings, so reruns skip finished prompts.
* ``grad``: crafttrace's fast path — one forward and one backward per batch of prompts on the plain
  HF model. Each active feature gets a multiplicative gate g=1; d(target)/dg = activation x gradient,
  the first-order *total* effect of the feature through every later feature and the residual stream.
  The MLP outputs are replaced by CLT reconstruction + a frozen error (as in the replacement model).
  Unlike circuit-tracer it does not freeze attention patterns or norm scales (see benchmarks).

Effects are *signed*: positive pushes the refusal-minus-compliance logit difference up (towards
refusal). The graph path's total effect is computed from the adjacency matrix by propagating
``A[target, t] / a_t * A[t, s]`` along paths (edges into a feature are in units of its activation),
which for a linear replacement model equals ablation effect; circuit-tracer's own node influence
(|A| row-normalised) is kept too, as ``influence_ct``, for comparison.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import runs
from .hooks import resolve_hook
from .tokens import TokenSets, logit_difference_direction

log = logging.getLogger(__name__)

TARGET_LABELS = ("refuse-minus-comply", "refuse", "comply")


@dataclass
class AttributionSettings:
    max_feature_nodes: int = 512
    batch_size: int = 256
    backend: str = "nnsight"

    def to_json(self) -> dict:
        return {"max_feature_nodes": self.max_feature_nodes, "batch_size": self.batch_size, "backend": self.backend}


@dataclass
class FeatureEffects:
    """Per-prompt feature scores. Rows are active (layer, position, index) triples (position 0 excluded)."""

    features: torch.Tensor          # [n, 3] long: layer, position, feature index
    activation: torch.Tensor        # [n]
    direct: torch.Tensor            # [n] direct effect on refuse-minus-comply
    total: torch.Tensor             # [n] total signed effect on refuse-minus-comply
    influence_ct: torch.Tensor      # [n] circuit-tracer node influence (unsigned, normalised); nan for grad path
    logit_diff: float               # refuse-minus-comply set-mean logit difference on this prompt
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        runs.write_tensors(path, {"features": self.features, "activation": self.activation, "direct": self.direct,
                                  "total": self.total, "influence_ct": self.influence_ct,
                                  "logit_diff": torch.tensor([self.logit_diff])},
                           metadata={"meta": runs.json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> "FeatureEffects":
        from safetensors import safe_open
        t = runs.read_tensors(path)
        with safe_open(str(path), "pt") as f:
            meta = runs.json.loads((f.metadata() or {}).get("meta", "{}"))
        return cls(t["features"], t["activation"], t["direct"], t["total"], t["influence_ct"],
                   float(t["logit_diff"][0]), meta)

    @classmethod
    def empty(cls, logit_diff: float, meta: dict) -> "FeatureEffects":
        z = torch.zeros(0)
        return cls(torch.zeros(0, 3, dtype=torch.long), z, z, z, z, logit_diff, meta)


def targets(loaded, ts: TokenSets):
    """The three CustomTargets: refuse-minus-comply (weight 1) and each side, demeaned over the vocabulary."""
    from circuit_tracer.attribution.targets import CustomTarget

    W = loaded.model.get_output_embeddings().weight.detach().float()
    mean = W.mean(0)
    diff = logit_difference_direction(W, ts)
    return [CustomTarget("refuse-minus-comply", 1.0, diff),
            CustomTarget("refuse", 0.5, W[ts.refusal_ids].mean(0) - mean),
            CustomTarget("comply", 0.5, W[ts.compliance_ids].mean(0) - mean)]


def replacement_model(loaded, clt):
    """Wrap the already-loaded HF model and transcoder as circuit-tracer's nnsight ReplacementModel.

    circuit-tracer's own constructors take a model *name* and reload it; wrapping the loaded module
    (as its ``from_config`` does) is what lets GGUF-dequantised and local models share one path.
    Its attention freezing needs the eager attention implementation.
    """
    from circuit_tracer.replacement_model.replacement_model_nnsight import NNSightReplacementModel

    hf = loaded.model
    hf.config._attn_implementation = "eager"
    if not getattr(hf.config, "architectures", None):
        hf.config.architectures = [type(hf).__name__]
    rm = NNSightReplacementModel(hf, tokenizer=loaded.tokenizer, dispatch=True)
    rm._hf_config = hf.config
    rm._configure_replacement_model(clt)
    return rm


def total_effects(adjacency: torch.Tensor, n_features: int, activations: torch.Tensor,
                  target_row: int, max_depth: int) -> torch.Tensor:
    """Signed total effect of every node on one target row of a circuit-tracer adjacency matrix.

    Edges into feature t are contributions to t's activation a_t, so a path s -> t -> target
    carries A[target, t] / a_t * A[t, s]. Depth is bounded by the layer count (the graph is a DAG).
    """
    A = adjacency.float()
    cur = A[target_row].clone()
    total = cur.clone()
    inv = torch.where(activations.abs() > 0, 1.0 / activations, torch.zeros_like(activations)).float()
    for _ in range(max_depth + 1):
        cur = (cur[:n_features] * inv) @ A[:n_features]
        if not cur.any():
            break
        total += cur
    return total


def graph_effects(graph, n_layers: int) -> FeatureEffects:
    from circuit_tracer.graph import compute_node_influence

    n_f = len(graph.selected_features)
    feats = graph.active_features[graph.selected_features].long()
    acts = graph.activation_values[graph.selected_features].float()
    n_logits = len(graph.logit_targets)
    row = graph.adjacency_matrix.shape[0] - n_logits  # the refuse-minus-comply target comes first
    total = total_effects(graph.adjacency_matrix, n_f, acts, row, n_layers)
    weights = torch.zeros(graph.adjacency_matrix.shape[0])
    weights[row] = 1.0
    infl = compute_node_influence(graph.adjacency_matrix.float(), weights)
    keep = feats[:, 1] > 0
    return FeatureEffects(feats[keep], acts[keep], graph.adjacency_matrix[row, :n_f].float()[keep],
                          total[:n_f][keep], infl[:n_f][keep], float("nan"))


def attribute_graphs(loaded, clt, input_ids_list: list[torch.Tensor], ts: TokenSets,
                     settings: AttributionSettings, cache_dir: str | Path | None = None,
                     cache_key: str = "", progress: bool = True, save_graphs: bool = True,
                     ) -> list[FeatureEffects]:
    """circuit-tracer attribution for each prompt; cached graphs and effects are reused on rerun."""
    from circuit_tracer.attribution.attribute import attribute

    rm = None
    out = []
    tgt = targets(loaded, ts)
    for ids in tqdm(input_ids_list, desc="attribution graphs", disable=not progress):
        ids = ids.reshape(-1).long()
        key = runs.content_hash(cache_key, ids.tolist(), settings.to_json(), ts.refusal_ids, ts.compliance_ids)
        eff_path = Path(cache_dir) / f"effects_{key}.safetensors" if cache_dir else None
        if eff_path is not None and eff_path.exists():
            out.append(FeatureEffects.load(eff_path))
            continue
        if rm is None:
            rm = replacement_model(loaded, clt)
        logit_diff, n_active = _prompt_stats(loaded.model, clt, ids, tgt[0].vec)
        meta = {"key": key, "n_tokens": len(ids), "n_active": n_active}
        if n_active == 0:
            # circuit-tracer 0.5.0 crashes on a prompt with no active feature; the record is simply empty.
            eff = FeatureEffects.empty(logit_diff, meta)
        else:
            graph = attribute(ids, rm, attribution_targets=tgt, batch_size=settings.batch_size,
                              max_feature_nodes=settings.max_feature_nodes, verbose=False)
            eff = graph_effects(graph, clt.n_layers)
            eff.logit_diff, eff.meta = logit_diff, meta
            if cache_dir is not None and save_graphs:
                from .graph_io import save_graph
                save_graph(graph, Path(cache_dir) / f"graph_{key}")
                eff.meta["graph"] = f"graph_{key}"
        if eff_path is not None:
            eff.save(eff_path)
        out.append(eff)
    return out


@torch.no_grad()
def _prompt_stats(model, clt, ids: torch.Tensor, vec: torch.Tensor) -> tuple[float, int]:
    """(refuse-minus-comply logit difference, number of active features), from one forward pass."""
    from .hooks import capture
    with capture(model, clt.feature_input_hook, list(range(clt.n_layers))) as store:
        out = model(ids[None].to(model.device), output_hidden_states=True)
    h = out.hidden_states[-1][0, -1].float()  # already final-normed in HF Llama/Gemma
    n = sum(int((clt.encode_layer(store[layer][0, 1:].to(clt.dtype), layer) > 0).sum()) for layer in range(clt.n_layers))
    return float(h @ vec.to(h.device)), n


# --------------------------------------------------------------------------- fast gradient path

def _decoder(clt, layer: int) -> torch.Tensor:
    if clt.W_dec is not None:
        return clt.W_dec[layer]
    return clt._get_decoder_vectors(layer)  # lazy decoders: [d_t, L-layer, d_model]


def gradient_effects(loaded, clt, input_ids_list: list[torch.Tensor], ts: TokenSets,
                     batch_size: int = 8, progress: bool = True) -> list[FeatureEffects]:
    """activation x gradient of the refuse-minus-comply difference for every active feature, batched.

    Reads ``clt.feature_input_hook`` at each layer, replaces ``clt.feature_output_hook`` by
    CLT reconstruction + frozen error, so the value of every activation is the real model's, and
    gradients reach features only through decoders (the MLPs themselves are out of the graph). A CLT with a
    skip connection also passes gradient through ``x @ W_skip`` (the MLP's linear part), as circuit-tracer does.
    """
    model = loaded.model
    vec = logit_difference_direction(model.get_output_embeddings().weight.detach().float(), ts)
    L = clt.n_layers
    decs = [_decoder(clt, l).float() for l in range(L)]
    out: list[FeatureEffects] = []
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(input_ids_list)), key=lambda i: len(input_ids_list[i].reshape(-1)))
    results: dict[int, FeatureEffects] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="gradient attribution", disable=not progress):
        idx = order[start:start + batch_size]
        seqs = [input_ids_list[i].reshape(-1).long() for i in idx]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, T - len(s):] = s
            mask[r, T - len(s):] = 1
        pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        valid = mask.bool().clone()
        first = T - torch.tensor([len(s) for s in seqs])
        valid[torch.arange(len(seqs)), first] = False  # BOS / first position: circuit-tracer zeroes it
        acts: dict[int, torch.Tensor] = {}
        gates: dict[int, torch.Tensor] = {}
        written: dict[int, torch.Tensor] = {}
        skips: dict[int, torch.Tensor] = {}

        def enc_hook(layer):
            def fn(mod, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                a = clt.encode_layer(x.to(clt.dtype), layer).float() * valid[..., None].to(x.device)
                g = torch.ones_like(a, requires_grad=True)
                acts[layer], gates[layer] = a.detach(), g
                written[layer] = a * g
                if getattr(clt, "W_skip", None) is not None:
                    skips[layer] = clt.compute_skip(layer, x.to(clt.dtype)).float()
            return fn

        def dec_hook(layer):
            def fn(mod, args, output):
                o = output[0] if isinstance(output, tuple) else output
                recon = sum(torch.einsum("btf,fd->btd", written[s], decs[s][:, layer - s]) for s in range(layer + 1))
                if layer in skips:
                    recon = recon + skips[layer]
                new = o.detach() - recon.detach().to(o.dtype) + recon.to(o.dtype)
                return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
            return fn

        with ExitStack() as stack:
            for layer in range(L):
                m_in, _ = resolve_hook(model, clt.feature_input_hook, layer)
                m_out, _ = resolve_hook(model, clt.feature_output_hook, layer)
                stack.callback(m_in.register_forward_pre_hook(enc_hook(layer), with_kwargs=True).remove)
                stack.callback(m_out.register_forward_hook(dec_hook(layer)).remove)
            with torch.enable_grad():
                o = model(ids.to(model.device), attention_mask=mask.to(model.device),
                          position_ids=pos_ids.to(model.device), output_hidden_states=True)
                h = o.hidden_states[-1][:, -1].float()
                diffs = h @ vec.to(h.device)
                diffs.sum().backward()
        for r, i in enumerate(idx):
            feats, a_list, e_list = [], [], []
            for layer in range(L):
                a = acts[layer][r]
                e = (gates[layer].grad[r]).float()
                p, f = torch.nonzero(a > 0, as_tuple=True)
                if len(p):
                    feats.append(torch.stack([torch.full_like(p, layer), p - int(first[r]), f], 1))
                    a_list.append(a[p, f])
                    e_list.append(e[p, f])
            if feats:
                F_, A_, E_ = torch.cat(feats), torch.cat(a_list), torch.cat(e_list)
            else:
                F_, A_, E_ = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0), torch.zeros(0)
            results[i] = FeatureEffects(F_.long(), A_, torch.full_like(E_, float("nan")), E_,
                                        torch.full_like(E_, float("nan")), float(diffs[r].detach()),
                                        {"n_tokens": len(seqs[r]), "n_active": len(E_), "path": "grad"})
    for i in range(len(input_ids_list)):
        out.append(results[i])
    return out
