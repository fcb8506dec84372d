"""Base vs safety-tuned model, and the refusal direction vs CLT features.

``compare_models`` runs the refusal direction (``crafttrace.direction``) and activation patching
(``crafttrace.patching``) on both models with the same prompts, then lines them up per layer:
direction norm, held-out separation (AUROC, Cohen's d), cosine between the two models' candidate
directions, and agreement of the patching maps.

``feature_cosines`` links the direction to a circuit-tracer transcoder: the cosine between the
refusal direction (read at the input of ``layers[layer]``) and the decoder vectors of given features
(``(layer, index)``, e.g. from ``crafttrace.ranking``). A CLT feature at layer s writes to
``feature_output_hook`` (hook_mlp_out) of every layer j >= s, so we report the cosine per output
layer and the cosine of its summed write into the residual stream that the direction reads
(output layers j < direction layer). ``chance`` gives the same statistic for random features of the
same layer, so a cosine can be read against what unrelated features reach.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from crafttrace.direction import DirectionConfig, RefusalDirection, find_direction, save_figure
from crafttrace.patching import PatchingConfig, PatchingResult, match_pairs, patch, stability
from crafttrace.runs import write_json
from crafttrace.transcoders import feature_decoder

# ---------------------------------------------------------------------------------------------
# Direction vs transcoder features
# ---------------------------------------------------------------------------------------------


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float().expand_as(a), dim=-1)


def _feature_stats(r: torch.Tensor, dir_layer: int, vecs: torch.Tensor, layers: list[int]) -> dict:
    per = _cos(vecs, r)
    k = int(per.abs().argmax())
    into = [i for i, j in enumerate(layers) if j < dir_layer]
    return {"cos_by_output_layer": {int(j): float(c) for j, c in zip(layers, per)},
            "max_abs_cos": float(per.abs().max()), "argmax_output_layer": int(layers[k]),
            "cos_write_before_direction_layer": float(_cos(vecs[into].sum(0), r)) if into else None,
            "cos_total_write": float(_cos(vecs.sum(0), r))}


def feature_cosines(direction: torch.Tensor | RefusalDirection, tc, features: Sequence[tuple[int, int]],
                    layer: int | None = None, chance_samples: int = 256, seed: int = 0) -> list[dict]:
    """Cosines between the refusal direction and each feature's decoder vectors (CLT or PLT).

    ``direction``: a RefusalDirection (its layer is used) or a [d_model] vector with ``layer`` given.
    Each row also holds ``chance_p95``: the 95th percentile of ``max_abs_cos`` over
    ``chance_samples`` random features of the same source layer."""
    if isinstance(direction, RefusalDirection):
        r, dir_layer = direction.direction, direction.layer if layer is None else layer
    else:
        if layer is None:
            raise ValueError("feature_cosines needs the direction's layer when given a bare vector")
        r, dir_layer = direction, layer
    r = r.detach().float().reshape(-1)
    rng = np.random.default_rng(seed)
    chance: dict[int, float] = {}
    rows = []
    for fl, fi in features:
        dec = feature_decoder(tc, int(fl), int(fi))
        if dec.vectors.shape[-1] != r.shape[0]:
            raise ValueError(f"direction has d_model {r.shape[0]} but the transcoder's decoder vectors have "
                             f"d_model {dec.vectors.shape[-1]}")
        row = {"layer": int(fl), "index": int(fi), **_feature_stats(r, dir_layer, dec.vectors.cpu(), dec.layers)}
        if chance_samples and fl not in chance:
            idx = rng.choice(tc.d_transcoder, size=min(chance_samples, tc.d_transcoder), replace=False)
            null = []
            for i in idx:
                d = feature_decoder(tc, int(fl), int(i))
                null.append(float(_cos(d.vectors.cpu(), r).abs().max()))
            chance[fl] = float(np.quantile(null, 0.95))
        row["chance_p95"] = chance.get(fl)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Base vs tuned
# ---------------------------------------------------------------------------------------------


def compare_directions(base: RefusalDirection, tuned: RefusalDirection) -> dict:
    """Per-layer norms and held-out separation (each at that model's selected position), and cosines
    between the two models' candidate directions (at the last prompt position and at the base model's
    selected position). Cosines are meaningful when the tuned model was fine-tuned from the base model
    (shared residual basis); for independently trained models expect ~0."""
    if base.candidates.shape != tuned.candidates.shape:
        raise ValueError(f"candidate grids differ: base {tuple(base.candidates.shape)} vs tuned "
                         f"{tuple(tuned.candidates.shape)} (same architecture and chat template needed)")
    L, P, _ = base.candidates.shape
    rows = []
    for l in range(L):
        row = {"layer": l}
        for name, rd in (("base", base), ("tuned", tuned)):
            row[f"{name}_norm"] = float(rd.candidates[l, rd.position + P].norm())
            own = rd.separation.get("own") if rd.separation else None
            if own:
                row[f"{name}_auroc"], row[f"{name}_cohens_d"] = own[l]["auroc"], own[l]["cohens_d"]
        row["cos_last_position"] = float(_cos(base.candidates[l, -1], tuned.candidates[l, -1]))
        row["cos_base_position"] = float(_cos(base.candidates[l, base.position + P], tuned.candidates[l, base.position + P]))
        rows.append(row)
    return {"base": {"layer": base.layer, "position": base.position, "norm": float(base.direction.norm()),
                     "passed_filters": base.passed_filters, "baseline": base.baseline},
            "tuned": {"layer": tuned.layer, "position": tuned.position, "norm": float(tuned.direction.norm()),
                      "passed_filters": tuned.passed_filters, "baseline": tuned.baseline},
            "cos_selected": float(_cos(base.direction, tuned.direction)),
            "per_layer": rows}


def compare_patching(base: PatchingResult, tuned: PatchingResult, k: int = 5) -> dict:
    """Map agreement (Pearson, top-k overlap) and each model's strongest components."""
    return {"agreement": stability(base, tuned, k), "base_top": base.top(k), "tuned_top": tuned.top(k),
            "base_gap": base.clean - base.corrupted, "tuned_gap": tuned.clean - tuned.corrupted}


@dataclass
class CompareConfig:
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    n_pairs: int = 16
    max_diff: int = 2


def compare_models(base, tuned, harmful: Sequence[str], benign: Sequence[str], tokens,
                   cfg: CompareConfig | None = None, out_dir: str | os.PathLike | None = None,
                   tc=None, features: Sequence[tuple[int, int]] = (), tokens_tuned=None) -> dict:
    """Direction + patching on both models, compared (CLI: ``crafttrace compare``). ``tc`` /
    ``features``: a transcoder of the *tuned* model and features to relate to its direction.
    Writes base/, tuned/ (each direction + patching), compare.json and compare.png into ``out_dir``."""
    cfg = cfg or CompareConfig()
    out = Path(out_dir) if out_dir is not None else None
    dirs, maps = {}, {}
    for name, loaded, ts in (("base", base, tokens), ("tuned", tuned, tokens_tuned or tokens)):
        sub = out / name if out is not None else None
        dirs[name] = find_direction(loaded, harmful, benign, ts, cfg.direction,
                                    out_dir=sub / "direction" if sub is not None else None)
        pairs = match_pairs(loaded, harmful, benign, cfg.max_diff, cfg.n_pairs)
        maps[name] = patch(loaded, pairs, ts, cfg.patching,
                           out_dir=sub / "patching" if sub is not None else None) if pairs else None
    res = {"directions": compare_directions(dirs["base"], dirs["tuned"])}
    if maps["base"] is not None and maps["tuned"] is not None:
        res["patching"] = compare_patching(maps["base"], maps["tuned"])
    else:
        res["patching"] = None  # no same-length harmful/benign pairs in the prompt sets
    if tc is not None and features:
        res["features"] = feature_cosines(dirs["tuned"], tc, features)
    if out is not None:
        write_json(out / "compare.json", res)
        plot_compare(res["directions"], out / "compare.png")
    return res


def plot_compare(d: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = d["per_layer"]
    x = [r["layer"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), layout="constrained")
    for name in ("base", "tuned"):
        axes[0].plot(x, [r[f"{name}_norm"] for r in rows], "-o", ms=3, label=name)
        if f"{name}_auroc" in rows[0]:
            axes[1].plot(x, [r[f"{name}_auroc"] for r in rows], "-o", ms=3, label=name)
    axes[2].plot(x, [r["cos_last_position"] for r in rows], "-o", ms=3, label="last position")
    axes[2].plot(x, [r["cos_base_position"] for r in rows], "--s", ms=3, label="base's selected position")
    axes[0].set_ylabel("mean-difference norm (selected position)")
    axes[1].set_ylabel("held-out AUROC (selected position)")
    axes[2].set_ylabel("cos(base, tuned)")
    for ax in axes:
        ax.set_xticks(x, [str(l) for l in x[:-1]] + ["final"])
        ax.set_xlabel("residual stream at the input of layer")
        ax.legend(fontsize=8)
    fig.suptitle(f"refusal direction, base vs tuned (cos of selected directions {d['cos_selected']:.2f})")
    save_figure(fig, path)
