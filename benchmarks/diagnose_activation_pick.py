"""Why does (or doesn't) activation cross-group selection find a lever on a testbed seed?

For the top features of each mode in a finished ablation run, split their mean max-activation by harm label
and by surface style (pools with every style), and print their signed effect: a *style* feature is loud on
the harmful-styled pool but equal across labels within a style; a *harm* feature differs by label in every style.

    python benchmarks/diagnose_activation_pick.py --run runs/ablation_seeds/seed0 [--seed 0] [--k 5]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from crafttrace import ranking, runs
from crafttrace.cli import load
from crafttrace.testbed import language as L


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    loaded, clt = load(f"testbed:{args.seed}")
    rk = runs.read_json(f"{args.run}/ranking.json")
    rows = {(r["layer"], r["index"]): r for r in rk["features"]}
    recs = L.pool("harmful_heldout", args.seed) + L.pool("benign", args.seed)
    acts = ranking.max_activations(loaded, clt, [loaded.encode_prompt(r["prompt"])[0] for r in recs], progress=False)
    groups = defaultdict(list)
    for i, r in enumerate(recs):
        groups[(r["label"], r["style"])].append(i)
    out = {}
    for mode in ranking.MODES:
        for f in [tuple(x) for x in rk["top"][mode][: args.k]]:
            cell = {f"{lab}/{sty}": float(acts[idx, f[0], f[1]].mean()) for (lab, sty), idx in sorted(groups.items())}
            harm_gap = sum(cell[f"harmful/{s}"] - cell[f"benign/{s}"] for s in L.STYLES) / len(L.STYLES)
            style_gap = cell["harmful/instruct"] + cell["benign/instruct"] - cell["harmful/question"] - cell["benign/question"]
            r = rows.get(f, {})
            out[f"{mode}:L{f[0]}/{f[1]}"] = {"harm_gap_within_style": harm_gap, "instruct_minus_question": style_gap / 2,
                                            "effect_boundary": r.get("influence_boundary"), "cells": cell}
            print(f"{mode:24s} L{f[0]}/{f[1]:<4d} harm gap within style {harm_gap:+.2f}   "
                  f"instruct-question {style_gap / 2:+.2f}   boundary effect {r.get('influence_boundary', 0):+.3f}")
    runs.write_json(f"{args.run}/diagnosis.json", out)


if __name__ == "__main__":
    main()
