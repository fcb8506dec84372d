"""Figures for the ablation run directory (matplotlib, Agg backend: files only, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"activation_cross_group": ("tab:orange", "s"), "activation_boundary": ("tab:olive", "^"),
           "influence_cross_group": ("tab:purple", "D"), "influence_boundary": ("tab:red", "*")}


def ablation_figures(result: dict, rk, out: Path, top_n: int = 20) -> list[Path]:
    out = Path(out)
    paths = []
    # 1. influence vs activation scatter, selected features marked
    fig, ax = plt.subplots(figsize=(6, 4.5))
    x = rk.scores["activation_cross_group"].flatten()
    y = rk.scores["influence_boundary"].flatten()
    nz = (x != 0) | (y != 0)
    ax.scatter(x[nz], y[nz], s=6, c="0.6", label="features")
    d_t = rk.scores["influence_boundary"].shape[1]
    for r in result["rows"][1:]:
        l, i = r["features"][0]
        c, m = MARKERS[r["mode"]]
        ax.scatter([float(x[l * d_t + i])], [float(y[l * d_t + i])], s=120, c=c, marker=m,
                   edgecolors="k", label=f"{r['mode']} L{l}/{i}")
    ax.axhline(0, c="k", lw=0.5)
    ax.set_xlabel("activation contrast (harmful - benign)")
    ax.set_ylabel("influence on boundary prompts (signed total effect)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "scatter.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    # 2. strength sweep
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for r in result["rows"][1:]:
        c, m = MARKERS[r["mode"]]
        s = [p["strength"] for p in r["curve"]]
        axes[0].plot(s, [p["boundary"]["asr"] for p in r["curve"]], marker=m, c=c, label=r["mode"])
        axes[1].plot(s, [p["capability"]["accuracy"] for p in r["curve"]], marker=m, c=c)
    base = result["rows"][0]["curve"][0]
    axes[0].axhline(base["boundary"]["asr"], c="k", ls=":", lw=1, label="no attack")
    axes[1].axhline(base["capability"]["accuracy"], c="k", ls=":", lw=1)
    for a, t in zip(axes, ("attack success (held-out boundary)", "capability accuracy")):
        a.set_xscale("log", base=2)
        a.set_xlabel("strength (x typical activation)")
        a.set_title(t, fontsize=9)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "sweep.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    # 3. layer distribution of the top features per mode
    L = rk.scores["influence_boundary"].shape[0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.2
    for j, mode in enumerate(MARKERS):
        layers = [l for l, _ in rk.order(mode)[:top_n]]
        counts = [layers.count(l) for l in range(L)]
        ax.bar([l + (j - 1.5) * width for l in range(L)], counts, width, color=MARKERS[mode][0], label=mode)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"# of top-{top_n} features")
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "layers.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
