"""Ablation sensitivity run on a built realbed: the ablation stage again with AblationConfig overrides.

    python benchmarks/bench_realbed_ablation.py NAME '{"min_refuse": 0.1, "min_comply": 0.1}' --threads 2

Same model, CLT, pools, seed and held-out passages as the build's ablation stage (``realbed.ablation_config``),
with the overrides on top; runs into ``<realbed>/ablation_variants/<NAME>`` (the stage's own ``ablation/`` is left
alone) and copies the table, sweep, bundles and figures to
``benchmarks/results/smollm2_safety/ablation_<size>_seed<seed>_<NAME>/`` with ``variant.json`` (command, overrides,
wall time). Records hold metrics and at most 60-character excerpts, never full completions.

Session 16 (combo30 build, 25 boundary-critical prompts at the stage's 0.2 / 0.2 thresholds, i.e. 12 rank / 13
evaluate): ``loose10`` = ``{"min_refuse": 0.1, "min_comply": 0.1}`` keeps 44 (22 / 22) -- the prompts still put
at least 10 % on a refusal and on a compliance opener; ``loose10cv`` adds ``"min_activation_cv": 0.05`` (leaves
out chat-template features), ``loose10cv_seed1`` also ``"seed": 1`` (another rank/eval split). Numbers in the
README ("Ablation on the current build") and the results README.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from crafttrace import realbed, runs

RESULTS = Path(__file__).resolve().parent / "results" / "smollm2_safety"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="variant name (letters, digits, - and _)")
    ap.add_argument("overrides", help="JSON object of AblationConfig fields")
    ap.add_argument("--size", default="default", choices=realbed.SIZES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="realbed directory (default: the realbed cache dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        raise SystemExit(f"variant name {args.name!r}: use letters, digits, '-' and '_' only")
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as e:
        raise SystemExit(f"overrides are not JSON ({e}): {args.overrides!r}")
    if not isinstance(overrides, dict):
        raise SystemExit(f"overrides must be a JSON object of AblationConfig fields, got {args.overrides!r}")
    torch.set_num_threads(args.threads)
    src = Path(args.out) if args.out else realbed.default_dir(args.size, args.seed)
    bed = realbed.read_status(src, needs=("sft", "clt"))   # a named RealbedError if the build lacks them
    acfg = realbed.ablation_config(bed.config, overrides)   # unknown fields: a ValueError naming them

    from crafttrace.ablation import run_ablation
    from crafttrace.transcoders import load_transcoder
    ctx = realbed._Context(bed.config, src, progress=True)
    run_dir = src / "ablation_variants" / args.name
    t0 = time.perf_counter()
    res = run_ablation(ctx.tuned(), load_transcoder(src / "clt" / "transcoder"), acfg, run_dir,
                       cache_key=realbed.ablation_cache_key(bed.config), progress=True,
                       ppl_texts=realbed.heldout_passages(bed.config))
    # named after the build it ran on (``--out`` may name another build than --size / --seed would)
    size, seed = bed.config.size, bed.config.seed
    dest = realbed.copy_ablation_records(run_dir, Path(args.results) / f"ablation_{size}_seed{seed}_{args.name}")
    record = {"command": "python benchmarks/bench_realbed_ablation.py "
                         + shlex.join(argv if argv is not None else sys.argv[1:]),
              "name": args.name, "overrides": overrides, "realbed": str(src), "size": size, "seed": seed,
              "threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - t0,
              "n_rank_prompts": res["n_rank_prompts"], "n_eval_boundary": res["n_eval_boundary"]}
    runs.write_json(dest / "variant.json", record)
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
