"""Activation patching (causal tracing) of refusal on matched harmful / benign prompt pairs.

A pair is (clean = harmful prompt the model refuses, corrupted = benign prompt of the same token
length, differing in the object / verb). We run the corrupted prompt and overwrite one component with
its activation from the clean run, and read the refusal-minus-compliance logit difference at the first
response position, normalised per component as

    (patched - corrupted) / (clean - corrupted)        0 = corrupted behaviour, 1 = clean behaviour

(means over pairs are taken before normalising, which keeps pairs with a small gap from dominating).

Components (hook points, see ``crafttrace.direction.site_module``), each patched per layer x position:
  resid - input of ``layers[i]``               (TL hook_resid_pre)
  attn  - attention's write to the residual    (self_attn output; Gemma: post_attention_layernorm output)
  mlp   - MLP's write to the residual          (mlp output; Gemma: post_feedforward_layernorm output)
and per layer x head: the head's slice of the ``self_attn.o_proj`` input (TL hook_z), at all positions.
Each layer's positions (or heads) are patched as one batch, one copy of the corrupted prompt per position.
Written with plain forward hooks because circuit-tracer has no patching API.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from crafttrace.direction import RefusalTokens, edit_site, encode, logit_diff, n_layers, record_sites, save_figure
from crafttrace.runs import content_hash, read_tensors, write_json, write_tensors

SITES = ("resid", "attn", "mlp")


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptPair:
    clean: str        # harmful: the model refuses
    corrupted: str    # benign, same token length under the chat template


def match_pairs(loaded, harmful: Sequence[str], benign: Sequence[str], max_diff: int = 2,
                limit: int | None = None, diff_positions: Sequence[int] | None = None) -> list[PromptPair]:
    """Pair each harmful prompt with an unused benign prompt of the same token length that differs
    in the fewest tokens (at most ``max_diff``); prompts without such a partner are skipped.
    ``diff_positions`` (negative indices from the end) restricts where the two may differ, e.g.
    only at the object slot, so that every pair's map lines up."""
    allowed = None if diff_positions is None else {int(p) for p in diff_positions}
    enc_b = [encode(loaded, b) for b in benign]
    by_len: dict[int, list[int]] = defaultdict(list)
    for j, ids in enumerate(enc_b):
        by_len[len(ids)].append(j)
    used: set[int] = set()
    pairs = []
    for h in harmful:
        ids = encode(loaded, h)
        best, best_d = None, max_diff + 1
        for j in by_len.get(len(ids), []):
            if j in used:
                continue
            diff = (enc_b[j] != ids).nonzero().flatten() - len(ids)
            if allowed is not None and not set(diff.tolist()) <= allowed:
                continue
            d = len(diff)
            if 0 < d < best_d:
                best, best_d = j, d
        if best is not None:
            used.add(best)
            pairs.append(PromptPair(h, benign[best]))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------


@dataclass
class PatchingConfig:
    sites: tuple[str, ...] = SITES
    heads: bool = True
    positions: int | None = None   # patch the last N positions (None = every position of the shortest pair)
    batch_size: int = 32           # copies of the corrupted prompt per forward

    def __post_init__(self):
        self.sites = tuple(self.sites)
        bad = [s for s in self.sites if s not in SITES]
        if bad:
            raise ValueError(f"unknown patching sites {bad}; known: {list(SITES)}")


@dataclass
class PatchingResult:
    maps: dict[str, torch.Tensor]      # site -> [L, P] normalised effect; position p is index p - P
    heads: torch.Tensor | None         # [L, H] normalised effect of each head (all positions)
    clean: float                       # mean clean logit difference
    corrupted: float                   # mean corrupted logit difference
    position_labels: list[str] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    model_name: str = ""

    def top(self, k: int = 10) -> list[dict]:
        """The k components with the largest normalised effect."""
        rows = []
        for site, m in self.maps.items():
            P = m.shape[1]
            for l, p in np.ndindex(*m.shape):
                rows.append({"site": site, "layer": l, "position": p - P,
                             "token": self.position_labels[p] if self.position_labels else "",
                             "effect": float(m[l, p])})
        if self.heads is not None:
            for l, h in np.ndindex(*self.heads.shape):
                rows.append({"site": "head", "layer": l, "head": h, "effect": float(self.heads[l, h])})
        return sorted(rows, key=lambda r: -r["effect"])[:k]

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"map_{s}": m.float().contiguous() for s, m in self.maps.items()}
        if self.heads is not None:
            tensors["heads"] = self.heads.float().contiguous()
        write_tensors(out / "patching.safetensors", tensors)
        meta = {k: v for k, v in asdict(self).items() if k not in ("maps", "heads")}
        meta["top"] = self.top(20)
        write_json(out / "patching.json", meta)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "PatchingResult":
        p = Path(path)
        for f in ("patching.safetensors", "patching.json"):
            if not (p / f).is_file():
                raise FileNotFoundError(f"no patching result at {p}: missing {p / f}")
        t = load_file(str(p / "patching.safetensors"))
        meta = json.loads((p / "patching.json").read_text())
        meta.pop("top", None)
        maps = {k[4:]: v for k, v in t.items() if k.startswith("map_")}
        return cls(maps=maps, heads=t.get("heads"), **meta)


# ---------------------------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------------------------


def _n_heads(model: torch.nn.Module) -> int:
    cfg = getattr(model.config, "text_config", model.config)
    return int(cfg.num_attention_heads)


@torch.no_grad()
def _metric(model, ids: torch.Tensor, tokens: RefusalTokens) -> torch.Tensor:
    return logit_diff(model(input_ids=ids, logits_to_keep=1).logits[:, -1], tokens).cpu()


@torch.no_grad()
def patch_pair(loaded, pair: PromptPair, tokens: RefusalTokens, n_pos: int,
               cfg: PatchingConfig) -> dict:
    """Raw (unnormalised) logit differences for one pair: clean, corrupted, site -> [L, n_pos], heads [L, H]."""
    model = loaded.model
    dev = next(model.parameters()).device
    c_ids, x_ids = encode(loaded, pair.clean).to(dev), encode(loaded, pair.corrupted).to(dev)
    if c_ids.shape != x_ids.shape:
        raise ValueError(f"pair has different token lengths: clean {len(c_ids)} ({pair.clean!r}) vs "
                         f"corrupted {len(x_ids)} ({pair.corrupted!r})")
    T, L = len(c_ids), n_layers(model)
    if n_pos > T:
        raise ValueError(f"cannot patch {n_pos} positions of a {T}-token prompt")
    keys = [(s, l) for s in cfg.sites for l in range(L)] + ([("head", l) for l in range(L)] if cfg.heads else [])
    with record_sites(model, keys) as store:
        clean = _metric(model, c_ids[None], tokens)
    out = {"clean": float(clean), "corrupted": float(_metric(model, x_ids[None], tokens))}
    positions = torch.arange(T - n_pos, T, device=dev)
    bs = max(1, cfg.batch_size)

    for site in cfg.sites:
        grid = torch.empty(L, n_pos)
        for l in range(L):
            act = store[(site, l)][0]                              # [T, d]
            for s in range(0, n_pos, bs):
                pos = positions[s:s + bs]
                rows = torch.arange(len(pos), device=dev)

                def put(x, pos=pos, rows=rows, act=act):
                    x = x.clone()
                    x[rows, pos] = act[pos].to(x.dtype)          # batch row i patches position pos[i]
                    return x
                with edit_site(model, site, l, put):
                    grid[l, s:s + len(pos)] = _metric(model, x_ids[None].expand(len(pos), T), tokens)
        out[site] = grid

    if cfg.heads:
        H = _n_heads(model)
        grid = torch.empty(L, H)
        for l in range(L):
            act = store[("head", l)][0]                            # [T, H * d_head]
            for s in range(0, H, bs):
                hs = list(range(s, min(H, s + bs)))

                def put(x, hs=hs, act=act):
                    x = x.clone()
                    xv, av = x.view(*x.shape[:2], H, -1), act.view(T, H, -1)
                    for i, h in enumerate(hs):                      # batch row i patches head hs[i]
                        xv[i, :, h] = av[:, h].to(x.dtype)
                    return x
                with edit_site(model, "head", l, put):
                    grid[l, s:s + len(hs)] = _metric(model, x_ids[None].expand(len(hs), T), tokens)
        out["heads"] = grid
    return out


def _cached_patch_pair(loaded, pair: PromptPair, tokens, n_pos: int, cfg: PatchingConfig,
                       out_dir: str | os.PathLike | None) -> dict:
    """patch_pair, with each pair's raw result kept under ``out_dir/pairs/`` so an interrupted run resumes."""
    if out_dir is None:
        return patch_pair(loaded, pair, tokens, n_pos, cfg)
    key = content_hash(pair.clean, pair.corrupted, list(tokens.refusal_ids), list(tokens.compliance_ids), n_pos,
                       list(cfg.sites), cfg.heads, str(getattr(loaded, "name", "")), str(getattr(loaded, "source", "")))
    path = Path(out_dir) / "pairs" / f"{key}.safetensors"
    if path.is_file():
        return {k: (float(v) if v.dim() == 0 else v) for k, v in read_tensors(path).items()}
    raw = patch_pair(loaded, pair, tokens, n_pos, cfg)
    write_tensors(path, {k: torch.as_tensor(v, dtype=torch.float32) for k, v in raw.items()})
    return raw


def patch(loaded, pairs: Sequence[PromptPair], tokens: RefusalTokens, cfg: PatchingConfig | None = None,
          out_dir: str | os.PathLike | None = None) -> PatchingResult:
    """Patch clean -> corrupted over all pairs and normalise; writes patching.{safetensors,json},
    patching.png and per-pair results (``pairs/``, reused by a rerun) into ``out_dir`` when given.
    (CLI: ``crafttrace patch``.)"""
    cfg = cfg or PatchingConfig()
    if not pairs:
        raise ValueError("no prompt pairs to patch (match_pairs found no same-length harmful/benign pairs?)")
    lengths = [len(encode(loaded, p.clean)) for p in pairs]
    n_pos = min(lengths) if cfg.positions is None else min(cfg.positions, min(lengths))
    raw = [_cached_patch_pair(loaded, p, tokens, n_pos, cfg, out_dir) for p in tqdm(pairs, desc="patch pairs")]
    clean = float(np.mean([r["clean"] for r in raw]))
    corr = float(np.mean([r["corrupted"] for r in raw]))
    gap = clean - corr
    if abs(gap) < 1e-6:
        raise ValueError(f"clean and corrupted prompts give the same mean logit difference ({clean:.4f}); "
                         "nothing to patch")
    maps = {s: (torch.stack([r[s] for r in raw]).mean(0) - corr) / gap for s in cfg.sites}
    heads = (torch.stack([r["heads"] for r in raw]).mean(0) - corr) / gap if cfg.heads else None
    labels = _position_labels(loaded, pairs, n_pos)
    res = PatchingResult(maps=maps, heads=heads, clean=clean, corrupted=corr, position_labels=labels,
                         pairs=[{"clean": p.clean, "corrupted": p.corrupted, "clean_logit_diff": r["clean"],
                                 "corrupted_logit_diff": r["corrupted"]} for p, r in zip(pairs, raw)],
                         model_name=str(getattr(loaded, "name", "")))
    if out_dir is not None:
        res.save(out_dir)
        plot_patching(res, Path(out_dir) / "patching.png")
    return res


def _position_labels(loaded, pairs: Sequence[PromptPair], n_pos: int) -> list[str]:
    """The shared token at each aligned position; "clean/corrupted" (first pair differing there) where
    pairs differ; a trailing "*" where the tokens vary across pairs (different templates)."""
    c = torch.stack([encode(loaded, p.clean)[-n_pos:] for p in pairs])
    x = torch.stack([encode(loaded, p.corrupted)[-n_pos:] for p in pairs])
    dec = loaded.tokenizer.decode
    labels = []
    for i in range(n_pos):
        diff = (c[:, i] != x[:, i]).nonzero().flatten()
        k = int(diff[0]) if len(diff) else 0
        lab = dec([int(c[k, i])]) + (f"/{dec([int(x[k, i])])}" if len(diff) else "")
        varies = len(set(c[:, i].tolist()) | set(x[:, i].tolist())) > (2 if len(diff) else 1)
        labels.append(lab + ("*" if varies else ""))
    return labels


def stability(a: PatchingResult, b: PatchingResult, k: int = 5) -> dict:
    """Agreement of two patching runs (e.g. two seeds of prompt sampling): Pearson r of each map and
    overlap of the top-k components."""
    out: dict = {"pearson": {}}
    for s in a.maps:
        if s in b.maps and a.maps[s].shape[0] == b.maps[s].shape[0]:
            n = min(a.maps[s].shape[1], b.maps[s].shape[1])  # positions are aligned from the end
            out["pearson"][s] = float(np.corrcoef(a.maps[s][:, -n:].flatten(), b.maps[s][:, -n:].flatten())[0, 1])
    if a.heads is not None and b.heads is not None and a.heads.shape == b.heads.shape:
        out["pearson"]["heads"] = float(np.corrcoef(a.heads.flatten(), b.heads.flatten())[0, 1])

    def key(r):
        return (r["site"], r["layer"], r.get("position"), r.get("head"))
    ta, tb = {key(r) for r in a.top(k)}, {key(r) for r in b.top(k)}
    out["top_k"] = k
    out["top_k_overlap"] = len(ta & tb) / k
    out["top1_same"] = key(a.top(1)[0]) == key(b.top(1)[0])
    return out


def plot_patching(res: PatchingResult, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = list(res.maps.items()) + ([("head", res.heads)] if res.heads is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.5), squeeze=False, layout="constrained")
    vmax = max(1.0, max(float(m.abs().max()) for _, m in panels))
    for ax, (name, m) in zip(axes[0], panels):
        im = ax.imshow(m.numpy(), aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower")
        ax.set_ylabel("layer")
        ax.set_yticks(range(m.shape[0]))
        if name == "head":
            ax.set_xlabel("head (all positions)")
        else:
            ax.set_xticks(range(m.shape[1]), res.position_labels, rotation=90, fontsize=7)
        ax.set_title(f"{name} patched clean -> corrupted")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"normalised refusal logit difference (0 = corrupted {res.corrupted:.2f}, "
                 f"1 = clean {res.clean:.2f}); {len(res.pairs)} pairs")
    save_figure(fig, path)
