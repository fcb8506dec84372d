"""The activation-vs-influence ablation across testbed seeds (model and CLT rebuilt per seed).

Headline per mode = attack success at preserved capability on held-out boundary-critical prompts.
We report, per seed, influence_boundary (CRaFT) minus activation_cross_group, and the mean over seeds
with a 95% t-interval (and each seed's Wilson interval on its ASRs). Goal from the issue: mean
difference >= 0.30. Results go to benchmarks/results/ablation_seeds.json and .md.

    python benchmarks/bench_ablation_seeds.py --seeds 0 1 2 [--influence-path graph]
Seeds other than 0 are built on first use into the testbed cache (a few minutes each).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from crafttrace import runs
from crafttrace.ablation import AblationConfig, run_ablation
from crafttrace.cli import load

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--influence-path", default="graph")
    ap.add_argument("--out", default="runs/ablation_seeds")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()
    per_seed = []
    t0 = time.time()
    for seed in args.seeds:
        loaded, clt = load(f"testbed:{seed}")
        cfg = AblationConfig(seed=seed, influence_path=args.influence_path)
        res = run_ablation(loaded, clt, cfg, Path(args.out) / f"seed{seed}", cache_key=f"testbed:{seed}")
        rows = {r["mode"]: r for r in res["rows"]}
        rec = {"seed": seed, "wall_seconds": res["wall_seconds"],
               "no_attack_asr": rows["no_attack"]["asr_at_preserved_capability"]}
        for m in ("activation_cross_group", "activation_boundary", "influence_cross_group", "influence_boundary"):
            rec[m] = {"asr_at_preserved_capability": rows[m]["asr_at_preserved_capability"],
                      "asr_plain_at_preserved": rows[m]["asr_plain_at_preserved"],
                      "preserved_strength": rows[m]["preserved_strength"],
                      "max_asr_any_strength": rows[m]["max_asr_any_strength"],
                      "feature": rows[m]["features"][0]}
        rec["difference"] = (rec["influence_boundary"]["asr_at_preserved_capability"]
                             - rec["activation_cross_group"]["asr_at_preserved_capability"])
        per_seed.append(rec)
        print(f"seed {seed}: CRaFT {rec['influence_boundary']['asr_at_preserved_capability']:.2f} vs activation "
              f"cross-group {rec['activation_cross_group']['asr_at_preserved_capability']:.2f} "
              f"-> difference {rec['difference']:+.2f}")
    diffs = [r["difference"] for r in per_seed]
    mean = statistics.fmean(diffs)
    if len(diffs) > 1:
        half = T975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    else:
        half = float("nan")
    summary = {"command": "python benchmarks/bench_ablation_seeds.py --seeds " + " ".join(map(str, args.seeds))
               + f" --influence-path {args.influence_path}",
               "seeds": per_seed, "mean_difference": mean, "ci95": [mean - half, mean + half],
               "goal": ">= 0.30 mean difference (influence_boundary - activation_cross_group)",
               "wall_seconds": time.time() - t0}
    out = Path(args.results)
    runs.write_json(out / "ablation_seeds.json", summary)
    lines = ["# Ablation across testbed seeds", "", f"Command: `{summary['command']}`", "",
             "| seed | no attack | act cross-group | act boundary | infl cross-group | CRaFT (infl boundary) | diff |",
             "|---|---|---|---|---|---|---|"]
    for r in per_seed:
        lines.append(f"| {r['seed']} | {r['no_attack_asr']:.2f} | "
                     + " | ".join(f"{r[m]['asr_at_preserved_capability']:.2f}" for m in
                                  ("activation_cross_group", "activation_boundary", "influence_cross_group",
                                   "influence_boundary")) + f" | {r['difference']:+.2f} |")
    lines += ["", f"Mean difference {mean:+.3f}, 95% t-interval [{mean - half:+.3f}, {mean + half:+.3f}] "
              f"over {len(diffs)} seeds. Goal: {summary['goal']}. Wall time {summary['wall_seconds']:.0f} s."]
    runs.atomic_write_text(out / "ablation_seeds.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
