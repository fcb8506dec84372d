"""The refusal direction (Arditi et al. 2024, "Refusal in LMs is mediated by a single direction").

Pipeline, top to bottom:
  1. residual activations at the *input of every decoder layer* (TL ``hook_resid_pre``) and in the
     final residual stream (layer index L: output of the last block, before the final norm) at each
     post-instruction position (the tokens the chat template appends after the user text,
     generation prompt included);
  2. candidate directions = mean(harmful) - mean(benign) per (layer, position);
  3. selection on a validation split: bypass score (refusal after directional ablation on harmful
     prompts, lower is better), induce score (refusal after adding the direction on benign prompts,
     must be > ``min_induce``), KL on benign prompts under ablation (must be < ``max_kl``), and
     the last ``prune_last_frac`` of layers excluded;
  4. separation on held-out prompts: AUROC and Cohen's d of projections, per layer.

Refusal score = log-odds of the refusal-token set at the first response position.

Where the hooks sit (plain PyTorch hooks on Hugging Face modules; located with circuit-tracer's
architecture registry, see ``decoder_layers``):
  resid  - input of ``layers[i]``; i = L: output of ``layers[L-1]`` (read: extraction; write: ablation / addition)
  attn   - what attention adds to the residual stream:  ``self_attn`` output (Llama, Qwen) or
           ``post_attention_layernorm`` output (Gemma's sandwich norms)            (write: ablation)
  mlp    - what the MLP adds to the residual stream:    ``mlp`` output (Llama) or
           ``post_feedforward_layernorm`` output (Gemma)                          (write: ablation)
Ablating at every layer input and every attn/mlp output (Arditi's recipe) means no layer ever sees
the direction, and the final residual stream is free of it too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from circuit_tracer.utils.tl_nnsight_mapping import get_mapping
from crafttrace.hooks import _resolve_path, architecture, edit_module
from crafttrace.runs import content_hash, read_json, write_json, write_tensors

# ---------------------------------------------------------------------------------------------
# Refusal / compliance token sets and first-token metrics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefusalTokens:
    """Token ids that open a refusal ("Sorry", "I cannot") and a compliance ("Sure", "Here")."""

    refusal_ids: tuple[int, ...]
    compliance_ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "refusal_ids", tuple(int(i) for i in self.refusal_ids))
        object.__setattr__(self, "compliance_ids", tuple(int(i) for i in self.compliance_ids))
        if not self.refusal_ids:
            raise ValueError("RefusalTokens needs at least one refusal token id")
        both = set(self.refusal_ids) & set(self.compliance_ids)
        if both:
            raise ValueError(f"token ids {sorted(both)} are in both the refusal and the compliance set")

    def check_vocab(self, vocab_size: int) -> None:
        check_token_ids(self, vocab_size)


def check_token_ids(tokens, vocab_size: int) -> None:
    """``tokens``: a RefusalTokens or crafttrace.tokens.TokenSets (anything with refusal_ids / compliance_ids)."""
    ids = list(tokens.refusal_ids) + list(tokens.compliance_ids)
    if not tokens.refusal_ids:
        raise ValueError("the token set has no refusal ids")
    bad = [i for i in ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad} are outside the model's vocabulary (size {vocab_size})")


def refusal_log_prob(logits: torch.Tensor, tokens: RefusalTokens) -> torch.Tensor:
    """log P(refusal set) at each row of ``logits`` [B, V]."""
    lp = logits.float().log_softmax(-1)
    return lp[:, list(tokens.refusal_ids)].logsumexp(-1)


def refusal_score(logits: torch.Tensor, tokens: RefusalTokens) -> torch.Tensor:
    """Arditi's refusal score: log P(R) - log(1 - P(R)), per row of ``logits`` [B, V]."""
    lpr = refusal_log_prob(logits, tokens).clamp(max=-1e-6)
    return lpr - torch.log(-torch.expm1(lpr))


def logit_diff(logits: torch.Tensor, tokens: RefusalTokens) -> torch.Tensor:
    """log P(R) - log P(C) = logsumexp(refusal logits) - logsumexp(compliance logits)."""
    if not tokens.compliance_ids:
        raise ValueError("the refusal-minus-compliance logit difference needs compliance token ids")
    lg = logits.float()
    return lg[:, list(tokens.refusal_ids)].logsumexp(-1) - lg[:, list(tokens.compliance_ids)].logsumexp(-1)


# ---------------------------------------------------------------------------------------------
# Prompt encoding (always via the chat template of the LoadedModel) and batching
# ---------------------------------------------------------------------------------------------


def encode(loaded, user: str) -> torch.Tensor:
    """[T] token ids of ``loaded.format_prompt(user)``; prefers ``loaded.encode_prompt`` (no double BOS)."""
    if hasattr(loaded, "encode_prompt"):
        ids = loaded.encode_prompt(user)
        return torch.as_tensor(ids).reshape(-1)
    text = loaded.format_prompt(user)
    return torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def post_instruction_len(loaded, probe: str = "Tell me about rivers.") -> int:
    """Number of template tokens after the user text (end-of-turn + generation prompt)."""
    text = loaded.format_prompt(probe)
    end = text.rfind(probe)
    if end < 0:
        raise ValueError("format_prompt(user) does not contain the user text; cannot find the instruction end")
    suffix = text[end + len(probe):]
    n = len(loaded.tokenizer(suffix, add_special_tokens=False)["input_ids"])
    if n == 0:
        raise ValueError(f"the chat template appends no tokens after the user text ({text!r})")
    return n


def _pad_left(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad so that position -1 is every prompt's last token; explicit position ids make a
    padded row compute exactly what it would alone."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _pad_id(loaded) -> int:
    tok = loaded.tokenizer
    pid = getattr(tok, "pad_token_id", None)
    if pid is None:
        pid = getattr(tok, "eos_token_id", None)
    return int(pid) if pid is not None else 0


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def last_logits(loaded, prompts: Sequence[str], batch_size: int = 16, desc: str = "forward",
                progress: bool = True) -> torch.Tensor:
    """[N, V] next-token logits at the first response position for each prompt."""
    if not prompts:
        raise ValueError(f"no prompts given ({desc})")
    model = loaded.model
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=not progress):
        seqs = [encode(loaded, p) for p in prompts[start:start + batch_size]]
        ids, mask, pos = _pad_left(seqs, _pad_id(loaded))
        dev = _device(model)
        # logits_to_keep=1: only the first response position is read; the full [B, T, V] unembedding
        # would dominate the cost for a 50k vocabulary
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                       logits_to_keep=1).logits
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Activation sites and hook plumbing
# ---------------------------------------------------------------------------------------------


def n_layers(model: torch.nn.Module) -> int:
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None and hasattr(cfg, "text_config"):
        n = cfg.text_config.num_hidden_layers
    if n is None:
        raise ValueError(f"cannot read the number of layers from {type(cfg).__name__}")
    return int(n)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks, located through circuit-tracer's registry (same paths its backend hooks)."""
    try:
        mapping = get_mapping(architecture(model))
    except ValueError as e:
        raise ValueError(f"crafttrace cannot place hooks on this model: {e}") from None
    pattern = mapping.attention_location_pattern.split(".self_attn")[0]
    return [_resolve_path(model, pattern.format(layer=i)) for i in range(n_layers(model))]


def site_module(model: torch.nn.Module, site: str, layer: int) -> tuple[torch.nn.Module, str]:
    """(module, 'input'|'output') for site in resid / attn / mlp / head (head = o_proj input).
    ``resid`` at layer L (= number of layers) is the final residual stream, the last block's output."""
    layers = decoder_layers(model)
    if site == "resid" and layer == len(layers):
        return layers[-1], "output"
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer} out of range for a model with {len(layers)} layers")
    blk = layers[layer]
    sandwich = hasattr(blk, "pre_feedforward_layernorm")  # Gemma 2/3: outputs are normed before the add
    if site == "resid":
        return blk, "input"
    if site == "attn":
        return (blk.post_attention_layernorm if sandwich else blk.self_attn), "output"
    if site == "mlp":
        return (blk.post_feedforward_layernorm if sandwich else blk.mlp), "output"
    if site == "head":
        return blk.self_attn.o_proj, "input"
    raise ValueError(f"unknown site {site!r}; known: resid, attn, mlp, head")


@contextmanager
def edit_site(model: torch.nn.Module, site: str, layer: int,
              fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the site's tensor [B, T, d] with ``fn(tensor)`` during forwards inside the block.
    The hook is removed on exit, also when the block raises."""
    module, io = site_module(model, site, layer)
    with edit_module(module, io, fn):
        yield


@contextmanager
def record_sites(model: torch.nn.Module, sites: Sequence[tuple[str, int]]) -> Iterator[dict]:
    """Record {(site, layer): tensor [B, T, d]} (detached) during forwards inside the block."""
    store: dict[tuple[str, int], torch.Tensor] = {}
    with ExitStack() as stack:
        for site, layer in sites:
            def keep(x, key=(site, layer)):
                store[key] = x.detach()
                return x
            stack.enter_context(edit_site(model, site, layer, keep))
        yield store


# ---------------------------------------------------------------------------------------------
# Interventions: directional ablation and activation addition
# ---------------------------------------------------------------------------------------------


@contextmanager
def ablate(model: torch.nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of the residual stream at every layer and position
    (layer inputs + attn/mlp outputs, Arditi et al.)."""
    r = direction.detach().float()
    r = r / r.norm().clamp_min(1e-12)

    def proj(x):
        rr = r.to(x.device, x.dtype)
        return x - (x @ rr)[..., None] * rr

    with ExitStack() as stack:
        for layer in range(n_layers(model)):
            for site in ("resid", "attn", "mlp"):
                stack.enter_context(edit_site(model, site, layer, proj))
        yield


@contextmanager
def add_direction(model: torch.nn.Module, direction: torch.Tensor, layer: int, coeff: float = 1.0) -> Iterator[None]:
    """Add ``coeff * direction`` (un-normalised mean difference) to the input of ``layers[layer]``
    (layer L: the final residual stream) at every position, generated tokens included."""
    v = direction.detach().float() * coeff
    with edit_site(model, "resid", layer, lambda x: x + v.to(x.device, x.dtype)):
        yield


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_resid(loaded, prompts: Sequence[str], n_pos: int, batch_size: int = 16,
                  desc: str = "activations") -> torch.Tensor:
    """[N, L + 1, n_pos, d] residual stream at the input of every layer and (index L) the final
    residual stream before the last norm, last ``n_pos`` positions."""
    if not prompts:
        raise ValueError(f"no prompts given ({desc})")
    model = loaded.model
    L = n_layers(model)
    chunks = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        seqs = [encode(loaded, p) for p in prompts[start:start + batch_size]]
        short = [len(s) for s in seqs if len(s) < n_pos]
        if short:
            raise ValueError(f"prompt of {short[0]} tokens is shorter than the {n_pos} post-instruction positions")
        ids, mask, pos = _pad_left(seqs, _pad_id(loaded))
        dev = _device(model)
        with record_sites(model, [("resid", l) for l in range(L + 1)]) as store:
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), logits_to_keep=1)
        chunks.append(torch.stack([store[("resid", l)][:, -n_pos:].float().cpu() for l in range(L + 1)], 1))
    return torch.cat(chunks)


def mean_diff(harmful_acts: torch.Tensor, benign_acts: torch.Tensor) -> torch.Tensor:
    """Candidate directions [L + 1, P, d] = mean over harmful - mean over benign."""
    if harmful_acts.shape[1:] != benign_acts.shape[1:]:
        raise ValueError(f"activation shapes differ: harmful {tuple(harmful_acts.shape)} vs benign {tuple(benign_acts.shape)}")
    return harmful_acts.mean(0) - benign_acts.mean(0)


# ---------------------------------------------------------------------------------------------
# Separation statistics (numpy; scipy is not a dependency)
# ---------------------------------------------------------------------------------------------


def auroc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): the Mann-Whitney U statistic, with average ranks for ties."""
    pos_scores, neg_scores = np.asarray(pos_scores, float), np.asarray(neg_scores, float)
    if len(pos_scores) == 0 or len(neg_scores) == 0:
        raise ValueError("AUROC needs at least one score in each class")
    allv = np.concatenate([pos_scores, neg_scores])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks over ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n1, n0 = len(pos_scores), len(neg_scores)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean a - mean b) / pooled standard deviation."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Cohen's d needs at least two samples per group")
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / max(pooled, 1e-12))


def separation(harmful_acts: torch.Tensor, benign_acts: torch.Tensor, directions: torch.Tensor) -> list[dict]:
    """Per layer: AUROC and Cohen's d of projections of [N, L, d] activations onto the
    per-layer directions [L, d] (harmful = positive class)."""
    L = harmful_acts.shape[1]
    if directions.shape != (L, harmful_acts.shape[-1]):
        raise ValueError(f"directions {tuple(directions.shape)} do not match activations {tuple(harmful_acts.shape)}")
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rows = []
    for l in range(L):
        ph = (harmful_acts[:, l] @ unit[l]).numpy()
        pb = (benign_acts[:, l] @ unit[l]).numpy()
        rows.append({"layer": l, "auroc": auroc(ph, pb), "cohens_d": cohens_d(ph, pb),
                     "mean_harmful": float(ph.mean()), "mean_benign": float(pb.mean())})
    return rows


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


@dataclass
class DirectionConfig:
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train / val / test fractions
    seed: int = 0
    # Arditi: exclude the last 20% of layers (candidates at layers l <= (1 - frac) * L; l = L, the final
    # residual stream, only with frac = 0). Shallow models that decide refusal in their last layer
    # (the 3-layer testbed) need frac = 0: no earlier post-instruction position carries the decision.
    prune_last_frac: float = 0.2
    max_kl: float = 0.1               # benign next-token KL under ablation must stay below this
    min_induce: float = 0.0           # adding the direction to benign prompts must raise refusal above this
    batch_size: int = 16
    positions: int | None = None      # None = all post-instruction positions, else the last N of them
    layer_stride: int = 1             # score every k-th layer only (CPU runs on 30-layer models)

    def __post_init__(self):
        self.splits = tuple(float(x) for x in self.splits)
        if len(self.splits) != 3 or any(x <= 0 for x in self.splits) or abs(sum(self.splits) - 1) > 1e-6:
            raise ValueError(f"splits must be three positive fractions summing to 1, got {self.splits}")
        if self.layer_stride < 1:
            raise ValueError(f"layer_stride must be >= 1, got {self.layer_stride}")
        if not 0 <= self.prune_last_frac < 1:
            raise ValueError(f"prune_last_frac must be in [0, 1), got {self.prune_last_frac}")


def split(prompts: Sequence[str], fractions: tuple[float, float, float], seed: int) -> tuple[list, list, list]:
    """Seeded train / val / test split (each non-empty)."""
    n = len(prompts)
    if n < 6:
        raise ValueError(f"need at least 6 prompts per class for train/val/test splits, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_tr = max(2, int(round(fractions[0] * n)))
    n_va = max(2, int(round(fractions[1] * n)))
    n_tr = min(n_tr, n - n_va - 2)
    idx = [perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]]
    return tuple([prompts[i] for i in part] for part in idx)  # type: ignore[return-value]


@dataclass
class RefusalDirection:
    """The selected direction plus every candidate; ``save`` / ``from_pretrained`` round-trip."""

    direction: torch.Tensor           # [d] un-normalised mean difference at (layer, position)
    layer: int                        # read at the input of layers[layer] (TL hook_resid_pre); L = final residual
    position: int                     # negative index from the end of the prompt
    candidates: torch.Tensor          # [L + 1, P, d]; [l, p] = input of layers[l] (l = L: final residual), position p - P
    position_tokens: list[str] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)
    baseline: dict = field(default_factory=dict)
    separation: dict = field(default_factory=dict)
    passed_filters: bool = True
    model_name: str = ""

    @property
    def unit(self) -> torch.Tensor:
        return self.direction / self.direction.norm().clamp_min(1e-12)

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"direction": self.direction.float().contiguous(), "candidates": self.candidates.float().contiguous()}
        write_tensors(out / "direction.safetensors", tensors)
        meta = {k: v for k, v in asdict(self).items() if k not in ("direction", "candidates")}
        meta["norm"] = float(self.direction.norm())
        write_json(out / "direction.json", meta)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "RefusalDirection":
        p = Path(path)
        for f in ("direction.safetensors", "direction.json"):
            if not (p / f).is_file():
                raise FileNotFoundError(f"no refusal direction at {p}: missing {p / f}")
        t = load_file(str(p / "direction.safetensors"))
        meta = json.loads((p / "direction.json").read_text())
        meta.pop("norm", None)
        return cls(direction=t["direction"], candidates=t["candidates"], **meta)


def _kl(base_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || new) per row."""
    lp, lq = base_logits.float().log_softmax(-1), new_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def select_direction(loaded, candidates: torch.Tensor, harmful_val: Sequence[str], benign_val: Sequence[str],
                     tokens: RefusalTokens, cfg: DirectionConfig, checkpoint: str | os.PathLike | None = None
                     ) -> tuple[int, int, list[dict], dict, bool]:
    """Score every (layer, position) candidate; return (layer, pos_index, scores, baseline, passed).
    With ``checkpoint`` (a JSON path) scores are saved after each candidate and a rerun on the same
    candidates, prompts and tokens picks up where it stopped."""
    model = loaded.model
    key = content_hash(hashlib.sha256(candidates.float().numpy().tobytes()).hexdigest(), list(harmful_val),
                       list(benign_val), list(tokens.refusal_ids), list(tokens.compliance_ids))
    done: dict[tuple[int, int], dict] = {}
    if checkpoint is not None and Path(checkpoint).is_file():
        saved = read_json(checkpoint)
        if saved.get("key") == key:
            done = {(r["layer"], r["position"]): r for r in saved["scores"]}
    L, P, _ = candidates.shape
    n_blocks = L - 1                 # candidates[L - 1] is the final residual stream
    max_layer = n_blocks * (1 - cfg.prune_last_frac)
    bs = cfg.batch_size
    base_h = last_logits(loaded, harmful_val, bs, "baseline harmful")
    base_b = last_logits(loaded, benign_val, bs, "baseline benign")
    baseline = {"harmful_refusal_score": float(refusal_score(base_h, tokens).mean()),
                "benign_refusal_score": float(refusal_score(base_b, tokens).mean())}
    scores = []
    # a zero difference (e.g. layer 0 at template positions, where every prompt has the same embedding)
    # is no direction at all: ablating or adding it is a no-op, so it is not a candidate
    norms = candidates.norm(dim=-1)
    grid = [(l, p) for l in range(0, L, cfg.layer_stride) for p in range(P)
            if l <= max_layer and norms[l, p] > 1e-6 * norms.max()]
    if not grid:
        raise ValueError(f"no candidate directions left: {n_blocks} layers, last {cfg.prune_last_frac:.0%} pruned, "
                         "and every remaining mean difference is zero")
    for l, p in tqdm(grid, desc="select direction"):
        if (l, p - P) in done:
            scores.append(done[(l, p - P)])
            continue
        r = candidates[l, p]
        with ablate(model, r):
            abl_h = last_logits(loaded, harmful_val, bs, "ablate harmful", progress=False)
            abl_b = last_logits(loaded, benign_val, bs, "ablate benign", progress=False)
        with add_direction(model, r, l):
            add_b = last_logits(loaded, benign_val, bs, "add benign", progress=False)
        scores.append({"layer": l, "position": p - P,
                       "bypass": float(refusal_score(abl_h, tokens).mean()),
                       "induce": float(refusal_score(add_b, tokens).mean()),
                       "kl": float(_kl(base_b, abl_b).mean())})
        if checkpoint is not None:
            write_json(checkpoint, {"key": key, "scores": scores})
    ok = [s for s in scores if s["kl"] < cfg.max_kl and s["induce"] > cfg.min_induce
          and all(math.isfinite(s[k]) for k in ("bypass", "induce", "kl"))]
    passed = bool(ok)
    if not passed:
        warnings.warn(f"no candidate passed the filters (KL < {cfg.max_kl}, induce > {cfg.min_induce}); "
                      "taking the lowest bypass score among all candidates")
        ok = scores
    best = min(ok, key=lambda s: s["bypass"])
    return best["layer"], best["position"] + P, scores, baseline, passed


def find_direction(loaded, harmful: Sequence[str], benign: Sequence[str], tokens: RefusalTokens,
                   cfg: DirectionConfig | None = None, out_dir: str | os.PathLike | None = None) -> RefusalDirection:
    """Extract, select and evaluate the refusal direction; writes direction.{safetensors,json},
    separation.png and selection.png into ``out_dir`` when given.  (CLI: ``crafttrace direction``.)"""
    cfg = cfg or DirectionConfig()
    check_token_ids(tokens, loaded.model.get_output_embeddings().weight.shape[0])
    h_tr, h_va, h_te = split(list(harmful), cfg.splits, cfg.seed)
    b_tr, b_va, b_te = split(list(benign), cfg.splits, cfg.seed + 1)
    P = post_instruction_len(loaded)
    if cfg.positions is not None:
        P = min(P, cfg.positions)
    with torch.no_grad():
        cand = mean_diff(collect_resid(loaded, h_tr, P, cfg.batch_size, "harmful train"),
                         collect_resid(loaded, b_tr, P, cfg.batch_size, "benign train"))
    ckpt = Path(out_dir) / "selection_progress.json" if out_dir is not None else None
    layer, pidx, scores, baseline, passed = select_direction(loaded, cand, h_va, b_va, tokens, cfg, ckpt)

    # held-out separation: each layer's own candidate (at the chosen position) and the selected direction
    acts_h = collect_resid(loaded, h_te, P, cfg.batch_size, "harmful test")[:, :, pidx]
    acts_b = collect_resid(loaded, b_te, P, cfg.batch_size, "benign test")[:, :, pidx]
    L = cand.shape[0]
    sep = {"own": separation(acts_h, acts_b, cand[:, pidx]),
           "selected": separation(acts_h, acts_b, cand[layer, pidx].expand(L, -1)),
           "n_harmful": len(h_te), "n_benign": len(b_te)}
    ids = encode(loaded, harmful[0])[-P:]
    toks = [loaded.tokenizer.decode([int(i)]) for i in ids]
    res = RefusalDirection(direction=cand[layer, pidx].clone(), layer=layer, position=pidx - P, candidates=cand,
                           position_tokens=toks, scores=scores, baseline=baseline, separation=sep,
                           passed_filters=passed, model_name=str(getattr(loaded, "name", "")))
    if out_dir is not None:
        res.save(out_dir)
        plot_separation(res, Path(out_dir) / "separation.png")
        plot_selection(res, Path(out_dir) / "selection.png")
    return res


# ---------------------------------------------------------------------------------------------
# Validation by intervention
# ---------------------------------------------------------------------------------------------


def _first_token_summary(logits: torch.Tensor, tokens: RefusalTokens) -> dict:
    return {"refusal_prob": float(refusal_log_prob(logits, tokens).exp().mean()),
            "refusal_score": float(refusal_score(logits, tokens).mean())}


@torch.no_grad()
def generate(loaded, prompts: Sequence[str], max_new_tokens: int = 24, batch_size: int = 16) -> list[str]:
    """Greedy continuations (left-padded batches); interventions active in the caller apply to every step."""
    model, out = loaded.model, []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
        seqs = [encode(loaded, p) for p in prompts[start:start + batch_size]]
        ids, mask, _ = _pad_left(seqs, _pad_id(loaded))
        dev = _device(model)
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=_pad_id(loaded))
        out += [loaded.tokenizer.decode(g[ids.shape[1]:], skip_special_tokens=True) for g in gen]
    return out


def _default_detector() -> Callable[[str], bool]:
    from crafttrace.evaluation import RefusalDetector  # noqa: PLC0415 (heavy optional deps stay lazy)
    return RefusalDetector()


def validate_direction(loaded, rd: RefusalDirection, harmful: Sequence[str], benign: Sequence[str],
                       tokens: RefusalTokens, coeff: float = 1.0, generate_tokens: int = 0,
                       detector: Callable[[str], bool] | None = None, batch_size: int = 16,
                       out_dir: str | os.PathLike | None = None) -> dict:
    """Add the direction on benign prompts (should induce refusal) and ablate it on harmful prompts
    (should bypass refusal). First-token refusal probability / log-odds always; with
    ``generate_tokens > 0`` also greedy generations scored by ``detector`` (default:
    ``crafttrace.evaluation.RefusalDetector()``; pass ``RefusalDetector(mode="prefix", phrases=["sorry"])``
    for the testbed).
    Generated text is never written to disk, only detector rates."""
    model = loaded.model
    res = {"layer": rd.layer, "position": rd.position, "coeff": coeff,
           "harmful": {"baseline": _first_token_summary(last_logits(loaded, harmful, batch_size, "harmful"), tokens)},
           "benign": {"baseline": _first_token_summary(last_logits(loaded, benign, batch_size, "benign"), tokens)}}
    with ablate(model, rd.direction):
        res["harmful"]["ablated"] = _first_token_summary(last_logits(loaded, harmful, batch_size, "ablate"), tokens)
    with add_direction(model, rd.direction, rd.layer, coeff):
        res["benign"]["added"] = _first_token_summary(last_logits(loaded, benign, batch_size, "add"), tokens)
    if generate_tokens > 0:
        from crafttrace.evaluation import degeneration  # noqa: PLC0415
        detector = detector or _default_detector()
        arms = [("harmful", "baseline", harmful, nullcontext()), ("benign", "baseline", benign, nullcontext()),
                ("harmful", "ablated", harmful, ablate(model, rd.direction)),
                ("benign", "added", benign, add_direction(model, rd.direction, rd.layer, coeff))]
        for group, arm, prompts, intervention in arms:
            with intervention:
                texts = generate(loaded, prompts, generate_tokens, batch_size)
            res[group][arm]["generation_refusal_rate"] = float(np.mean([bool(detector(t)) for t in texts]))
            res[group][arm]["degenerate_rate"] = float(np.mean([degeneration(t)["is_degenerate"] for t in texts]))
    if out_dir is not None:
        write_json(Path(out_dir) / "validation.json", res)
    return res


# ---------------------------------------------------------------------------------------------
# Figures and atomic writes
# ---------------------------------------------------------------------------------------------


def save_figure(fig, path: Path) -> None:
    """PNG via a temp file + os.replace (runs.py's atomic writers take text and tensors only)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def plot_separation(rd: RefusalDirection, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    L = len(rd.separation["own"]) - 1
    for key, style in (("own", "-o"), ("selected", "--s")):
        rows = rd.separation[key]
        a1.plot([r["layer"] for r in rows], [r["auroc"] for r in rows], style, ms=3, label=f"{key} direction")
        a2.plot([r["layer"] for r in rows], [r["cohens_d"] for r in rows], style, ms=3, label=f"{key} direction")
    for ax in (a1, a2):
        ax.axvline(rd.layer, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(L + 1), [str(l) for l in range(L)] + ["final"])
        ax.set_xlabel("residual stream at the input of layer")
        ax.legend(fontsize=8)
    a1.set_ylabel("AUROC (held-out harmful vs benign)")
    a1.set_ylim(0.0, 1.02)
    a2.set_ylabel("Cohen's d")
    fig.suptitle(f"refusal direction separation (position {rd.position})")
    save_figure(fig, path)


def plot_selection(rd: RefusalDirection, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    L, P, _ = rd.candidates.shape
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), layout="constrained")
    for ax, key in zip(axes, ("bypass", "induce", "kl")):
        grid = np.full((P, L), np.nan)  # blank = not a candidate (pruned layer or zero difference)
        for s in rd.scores:
            grid[s["position"] + P, s["layer"]] = s[key]
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.plot(rd.layer, rd.position + P, "r*", ms=12)
        ax.set_yticks(range(P), [repr(t) for t in rd.position_tokens] or list(range(-P, 0)), fontsize=7)
        ax.set_xticks(range(L), [str(l) for l in range(L - 1)] + ["final"])
        ax.set_xlabel("layer")
        ax.set_title(key)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"candidate scores; selected layer {rd.layer}, position {rd.position}")
    save_figure(fig, path)
