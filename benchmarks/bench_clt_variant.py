"""CLT recipe probe: train the realbed's CLT with CLTTrainConfig overrides on a built realbed's tuned model.

Same texts (``realbed.clt_texts``), same seed and therefore the same batches in the same order as the built CLT,
so training-batch NMSE at a given step compares directly with the built CLT's ``metrics.json`` history (up to
the learning-rate decay, which starts at ``1 - lr_decay_frac`` of each run's own length). Prints the held-out
metrics of the exported CLT and the logged training history; writes nothing outside ``--out``.

Session 9 (seed 0, 2 threads, 837 s): ``topk_grad`` straight-through at 192 steps (a third of the default run)

    python benchmarks/bench_clt_variant.py st192 '{"topk_grad": "straight_through", "total_tokens": 196608}'

held-out NMSE mean 0.359 (total 0.206), L0 12.7, dead 10.9 %; on the same batches the built ReLU-gradient CLT
logged 0.330 / 0.288 at steps 70 / 130 (L0 13.3 / 9.7) against 0.330 / 0.284 (L0 13.7 / 12.0): more live
features, no better reconstruction, so the default keeps ``topk_grad="relu"``.

Session 10 (session-10 build, 2 threads, 1,843 s): the full 576 steps,

    python benchmarks/bench_clt_variant.py st576 '{"topk_grad": "straight_through"}' --threads 2

held-out NMSE mean 0.348 (total 0.205), L0 11.9, dead 16 % against the built ReLU-gradient CLT's 0.351 (0.203),
L0 4.2, dead 22 %: the L0 collapse is not what holds the NMSE at ~0.35.

Session 16 (session-15 build, 2 threads, 3,456 s): twice the tokens (1,152 steps; chunks are collected as
training reaches them, so twice the distinct tokens as well)

    python benchmarks/bench_clt_variant.py tok2x '{"total_tokens": 1179648}' --threads 2

held-out NMSE mean 0.339 (total 0.195), L0 3.6, dead 33 % against the built CLT's 0.358 (0.209): NMSE ~
tokens^-0.079, so 0.25 would need ~90x the default's tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from crafttrace import realbed
from crafttrace.data import read_records
from crafttrace.safety import DISTILL_FILE
from crafttrace.training import train_clt


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("overrides", help="JSON object of CLTTrainConfig fields")
    ap.add_argument("--size", default="default", choices=realbed.SIZES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run directory (default: /tmp/crafttrace_clt_<name>)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    src = realbed.default_dir(args.size, args.seed)
    bed = realbed.read_status(src, needs=("sft",))   # a named RealbedError if src holds no tuned model
    cfg = bed.config
    ctx = realbed._Context(cfg, src, progress=True)
    loaded = ctx.tuned()
    texts = realbed.clt_texts(loaded, cfg, ctx.splits(), read_records(src / "sft" / DISTILL_FILE))
    clt_cfg = dataclasses.replace(cfg.clt, **json.loads(args.overrides))
    t0 = time.time()
    m = train_clt(loaded, texts, clt_cfg, args.out or f"/tmp/crafttrace_clt_{args.name}", progress=True).metrics
    summary = {k: m[k] for k in ("nmse_mean", "nmse_total", "l0_mean", "dead_fraction")}
    print(args.name, args.overrides, "seconds", round(time.time() - t0), json.dumps(summary))
    print("NMSE per layer", [round(x, 2) for x in m["nmse_per_layer"]])
    print("history (step, batch NMSE, L0)", [(h["step"], round(h["nmse"], 3), round(h["l0"], 1)) for h in m["history"]])
    return m


if __name__ == "__main__":
    main()
