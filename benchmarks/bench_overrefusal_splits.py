"""Over-refusal of a built realbed model on each AlpacaEval split, at the calibration's and the measurement's
generation lengths: is the validation split (93 prompts, chooses the merge strength) representative of the
held-out test prompts (the first 100 are measured; 100-199 are held out and never read by any stage)?

    python benchmarks/bench_overrefusal_splits.py --size default --seed 0 --threads 2

Prints rates only (no response text).
"""

from __future__ import annotations

import argparse
import time

import torch

from crafttrace import capability, realbed, safety
from crafttrace.evaluation import RefusalDetector
from crafttrace.models import load_model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="default", choices=realbed.SIZES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, nargs="+", default=[24, 48], help="greedy tokens scored per answer")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    src = realbed.default_dir(args.size, args.seed)
    bed = realbed.read_status(src)   # a named RealbedError when src is no realbed directory
    if "sft" not in bed.done:
        raise SystemExit(f"no finished realbed SFT stage in {src}: build it first (benchmarks/bench_realbed.py)")
    sp = safety.make_splits(bed.config.safety)
    n_meas = bed.config.measure.n_benign
    splits = {"validation": sp.benign_val, f"test[:{n_meas}] (measured)": sp.benign_test[:n_meas],
              f"test[{n_meas}:] (never read)": sp.benign_test[n_meas:]}
    loaded, det, out, t0 = load_model(src / "sft" / "model"), RefusalDetector(), {}, time.time()
    for name, prompts in splits.items():
        if not prompts:
            continue
        for n in args.tokens:
            flags = [det.is_refusal(r) for r in capability.generate(loaded, prompts, n, bed.config.measure.batch_size,
                                                                        f"{name} {n}")]
            out[(name, n)] = (sum(flags), len(flags))
            print(f"{name:28s} {n:3d} tokens: over-refusal {sum(flags) / len(flags):.3f} ({sum(flags)}/{len(flags)})",
                  flush=True)
    print(f"{time.time() - t0:.0f} s")
    return out


if __name__ == "__main__":
    main()
