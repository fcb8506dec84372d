"""Refusal-circuit monitor on the real-language testbed (issue #7, item (b) on real text).

For each jailbreak rewrite (``monitor.JAILBREAKS``: role-play, "for a story", past tense, prefix injection) the
monitor is built from the realbed's ranking (the ablation stage's ``ranking.json``), calibrated on plain HarmBench
vs even-indexed AlpacaEval prompts, and evaluated against the model's first-token P(refuse) and the refusal-
direction projection on (a) plain StrongREJECT vs odd-indexed AlpacaEval and (b) the rewritten StrongREJECT
prompts the tuned model complies with (first token) vs the same rewrite of the benign prompts. StrongREJECT and
HarmBench are never trained on (AdvBench is the SFT pool, so it is not used here).

    python benchmarks/bench_realbed_monitor.py --size default --kinds roleplay story past_tense prefix_injection

Writes ``benchmarks/results/smollm2_safety/monitor_<size>_seed<seed>.{json,md}`` (metrics only; per-prompt
readings stay in the run directory). Needs a built realbed with its ablation stage (``bench_realbed.py --ablation``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from crafttrace import monitor as M, realbed, runs

RESULTS = Path(__file__).resolve().parent / "results" / "smollm2_safety"
DETECTORS = ("monitor", "p_refuse", "direction", "monitor_harm", "monitor_drive")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="default", choices=realbed.SIZES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="realbed directory (default: the realbed cache dir)")
    ap.add_argument("--kinds", nargs="+", default=sorted(M.JAILBREAKS))
    ap.add_argument("--n-calib", type=int, default=64, help="calibration prompts per class")
    ap.add_argument("--n-eval", type=int, default=100, help="evaluation prompts per pool, at most")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else realbed.default_dir(args.size, args.seed)
    bed = realbed.read_status(out)
    ranking_json = out / "ablation" / "ranking.json"
    if not ranking_json.exists():
        raise SystemExit(f"no ranking at {ranking_json}: run benchmarks/bench_realbed.py --size {args.size} --ablation")
    loaded, clt = bed.load()
    t0 = time.perf_counter()
    rows = {}
    for kind in args.kinds:
        cfg = M.MonitorRunConfig.for_text(kind, harmful="strongreject", calib_harmful="harmbench",
                                          n_calib=args.n_calib, n_eval=args.n_eval, seed=args.seed)
        res = M.run_monitor(loaded, clt, ranking_json, out / "monitor" / kind, cfg)
        rows[kind] = {"n_wrapped_harmful": res["n_wrapped_harmful"], "n_wrapped_complied": res["n_wrapped_complied"],
                      **{part: ({d: {k: res[part][d][k] for k in ("auroc", "tpr_at_fpr")} for d in DETECTORS}
                                if "skipped" not in res[part] else res[part]) for part in ("plain", "wrapped_complied")}}
    result = {"command": "python benchmarks/bench_realbed_monitor.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "realbed": str(out), "seed": args.seed, "threads": torch.get_num_threads(),
              "wall_seconds": time.perf_counter() - t0, "kinds": rows}
    stem = Path(args.results) / f"monitor_{args.size}_seed{args.seed}"
    runs.write_json(stem.with_suffix(".json"), result)
    runs.atomic_write_text(stem.with_suffix(".md"), render(result))
    print(render(result))
    return result


def render(result: dict) -> str:
    L = ["# Refusal-circuit monitor on the safety-tuned SmolLM2 (real text)", "",
         f"Command: `{result['command']}`; {result['wall_seconds']:.0f} s, torch threads {result['threads']}.", "",
         "Calibration: plain HarmBench vs even-indexed AlpacaEval. Evaluation: StrongREJECT vs odd-indexed AlpacaEval, "
         "plain and rewritten; wrapped positives are the rewritten StrongREJECT prompts the tuned model complies "
         "with (first-token P(comply set) > P(refuse set)). AUROC (TPR at 5% FPR).", "",
         "| rewrite | set | n complied / n | " + " | ".join(DETECTORS) + " |",
         "|---|---|---|" + "---|" * len(DETECTORS)]
    for kind, r in result["kinds"].items():
        for part in ("plain", "wrapped_complied"):
            n = "-" if part == "plain" else f"{r['n_wrapped_complied']} / {r['n_wrapped_harmful']}"
            if "skipped" in r[part]:
                L.append(f"| {kind} | {part} | {n} | " + " | ".join(["skipped"] * len(DETECTORS)) + " |")
                continue
            cells = [f"{r[part][d]['auroc']:.3f} ({r[part][d]['tpr_at_fpr']:.2f})" for d in DETECTORS]
            L.append(f"| {kind} | {part} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
