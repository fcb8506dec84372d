"""Cost of one CLT training step at the realbed's default shape: SparseAdam vs dense fused Adam on the decoders,
with PyTorch's transparent-huge-page allocation off and on (``THP_MEM_ALLOC_ENABLE``: it removes most page faults
of the per-step gradient allocations, but did not make steps faster here, so crafttrace leaves it off).

    python benchmarks/bench_clt_step.py --threads 2

Each variant runs in its own process (the THP switch is read once, at torch's first allocation), on random
activations of the default realbed shape (30 layers, d_model 576, 512 features per layer, TopK k=16, affine
skip, 1024 tokens a step). Prints wall, user and kernel seconds per step, minor page faults per step, and
every variant's speed relative to the first (medians over interleaved rounds), all measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from crafttrace.training import CLTTrainConfig, _Trainer
cfg = CLTTrainConfig(d_transcoder=args["features"], activation="topk", k=16, skip_connection=True,
                     batch_tokens=1024, total_tokens=10 * 1024, sparse_adam=args["sparse_adam"])
g = torch.Generator().manual_seed(0)
L, d = args["layers"], args["d_model"]
x, y = torch.randn(2048, L, d, generator=g), torch.randn(2048, L, d, generator=g)
tr = _Trainer(L, d, cfg)
tr.initialise_from(x, y)
for i in range(args["warmup"]):
    tr.train_step(x[:1024], y[:1024])
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for i in range(args["steps"]):
    tr.train_step(x[1024 * (i % 2):1024 * (i % 2 + 1)], y[1024 * (i % 2):1024 * (i % 2 + 1)])
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
n = args["steps"]
print(json.dumps({"wall": wall / n, "user": (r1.ru_utime - r0.ru_utime) / n, "sys": (r1.ru_stime - r0.ru_stime) / n,
                  "minflt": (r1.ru_minflt - r0.ru_minflt) / n}))
"""


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds over the variants; medians reported")
    args = ap.parse_args(argv)
    variants = (("SparseAdam, 4 KiB pages", True, "0"), ("SparseAdam, THP", True, "1"),
                ("dense Adam, 4 KiB pages", False, "0"), ("dense Adam, THP", False, "1"))
    runs: dict[str, list[dict]] = {v[0]: [] for v in variants}
    # interleaved rounds: a noisy neighbour or memory compaction slows all variants alike, not one of them
    for _ in range(args.repeats):
        for name, sparse_adam, thp in variants:
            spec = {"threads": args.threads, "steps": args.steps, "warmup": args.warmup, "features": args.features,
                    "layers": args.layers, "d_model": args.d_model, "sparse_adam": sparse_adam}
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp}
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            runs[name].append(r)
            print(f"{name:26s} {r['wall']:.2f} s/step (user {r['user']:.2f}, sys {r['sys']:.2f}), "
                  f"{r['minflt']:.0f} page faults/step", flush=True)
    rows = [{"variant": name, **{k: statistics.median(r[k] for r in rs) for k in rs[0]}} for name, rs in runs.items()]
    base = rows[0]["wall"]
    print(f"\nmedian of {args.repeats} runs; speed relative to '{rows[0]['variant']}' ({args.layers} layers x "
          f"{args.features} features, {args.threads} threads):")
    for r in rows:
        print(f"  {r['variant']:26s} {base / r['wall']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
