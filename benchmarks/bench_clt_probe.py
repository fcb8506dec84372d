"""Fast CLT recipe probes on cached activations: collect the built realbed's CLT stream once, then train short runs.

``bench_clt_variant.py`` runs the whole CLT stage (collection included, ~30 min for 576 steps). Collection costs
about 1.5x a training step per token (SmolLM2-135M on 2 cores), so comparing recipes is cheaper on a fixed cache:

    python benchmarks/bench_clt_probe.py collect --chunks 8 --threads 2  # 8 x 16k tokens + eval, ~8 min
    python benchmarks/bench_clt_probe.py run base '{}' --steps 150 --chunks 4 --threads 2
    python benchmarks/bench_clt_probe.py run b512 '{"batch_tokens": 512}' --steps 300 --threads 2
    python benchmarks/bench_clt_probe.py run lr8e-3 '{"lr": 0.008}' --steps 150 --threads 2
    python benchmarks/bench_clt_probe.py run centred '{}' --init centred --steps 150 --threads 2
    python benchmarks/bench_clt_probe.py run data '{}' --init data --steps 150 --threads 2

The cache holds the first ``--chunks`` chunks of the stream the build trains on (``realbed.clt_texts``, the same
seed and order, attention-sink outliers removed) and the build's held-out evaluation positions, as float16
safetensors. ``run`` starts from that build's ``CLTTrainConfig`` (kept in ``cache.json``) with the overrides, sets
``total_tokens = steps * batch_tokens`` (so warm-up and decay scale with the probe), cycles over the cached chunks
in seeded orders, and prints the held-out NMSE (mean over layers, of the TopK model before export) and L0 every 50
steps with the seconds per step. ``--init``: ``default`` (the trainer's), ``centred`` (b_enc = -W_enc @ mean
input, the usual SAE input centring; ``collect`` prints the mean's share of each layer's squared input norm)
or ``data`` (each feature starts as one training token: encoder = its centred input direction, decoder = what
the skip connection leaves unexplained of its outputs, divided by k).

Session 11 (seed 0, 2 threads, session-10 build): every ``run`` above with ``--chunks 4 --record
benchmarks/results/smollm2_safety/clt_probes_default_seed0.json`` (``fresh8``: no ``--chunks``, all 8); the
numbers and what they say are in the README's CLT paragraph. Short version: held-out NMSE follows the number of
training tokens; features, steps at fixed tokens, centring and learning rate barely move it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from crafttrace import realbed
from crafttrace.runs import read_json, read_tensors, write_json, write_tensors
from crafttrace.training import ActivationStream, CLTTrainConfig, _Trainer, inlier_mask


def collect(args: argparse.Namespace) -> None:
    from crafttrace.data import read_records
    from crafttrace.safety import DISTILL_FILE
    src = Path(args.out) if args.out else realbed.default_dir(args.size, args.seed)
    cfg = realbed.read_status(src, needs=("sft",)).config
    ctx = realbed._Context(cfg, src, progress=False)
    loaded = ctx.tuned()
    texts = realbed.clt_texts(loaded, cfg, ctx.splits(), read_records(src / "sft" / DISTILL_FILE))
    stream = ActivationStream(loaded.model, loaded.tokenizer, texts, cfg.clt)
    cache = Path(args.cache)
    x, y = stream.eval_set()
    keep = inlier_mask(x, cfg.clt.outlier_norm_ratio)
    x, y = x[keep], y[keep]
    write_tensors(cache / "eval.safetensors", {"x": x.half(), "y": y.half()})
    # share of each layer's mean squared input norm that is the mean input (what ``--init centred`` removes)
    mean_share = 1 - (x - x.mean(0)).pow(2).sum(-1).mean(0) / x.pow(2).sum(-1).mean(0)
    print("input mean share of E||x||^2 per layer", [round(v, 2) for v in mean_share.tolist()], flush=True)
    for c, x, y in stream.chunks(0):
        keep = inlier_mask(x, cfg.clt.outlier_norm_ratio)
        write_tensors(cache / f"chunk{c}.safetensors", {"x": x[keep].half(), "y": y[keep].half()})
        print("chunk", c, int(keep.sum()), "positions", flush=True)
        if c + 1 >= args.chunks:
            break
    write_json(cache / "cache.json", {"realbed": str(src), "chunks": args.chunks, "clt": cfg.clt.to_dict(),
                                      "input_mean_share": mean_share.tolist()})


@torch.no_grad()
def _init(tr: _Trainer, how: str, x0: torch.Tensor, y0: torch.Tensor) -> None:
    clt, L = tr.clt, tr.clt.n_layers
    xn, yn = x0 / tr.in_scale[:, None], y0 / tr.out_scale[:, None]
    mu = xn.mean(0)                                                        # [L, d]
    if how == "centred":
        clt.b_enc.copy_(-(clt.W_enc @ mu[:, :, None]).squeeze(-1))
    elif how == "data":
        g = torch.Generator().manual_seed(tr.cfg.seed + 1)
        for l in range(L):
            t = torch.randperm(len(xn), generator=g)[:tr.cfg.d_transcoder]
            xc = xn[t, l] - mu[l]
            clt.W_enc[l].copy_(xc / xc.norm(dim=-1, keepdim=True).clamp_min(1e-8))
            clt.b_enc[l].zero_()
            skip = torch.stack([xn[t, j] @ clt.W_skip[j] for j in range(l, L)], 1) if clt.W_skip is not None else 0
            resid = yn[t, l:] - clt.b_dec[l:] - skip                        # [F, L-l, d]
            scale = xc.norm(dim=-1).clamp_min(1e-8) * tr.cfg.k             # the feature's own activation, k of them
            clt.W_dec[l].copy_((resid / scale[:, None, None]).transpose(0, 1))


def run(args: argparse.Namespace, cli: list[str]) -> dict:
    cache = Path(args.cache)
    if not (cache / "cache.json").exists():
        raise SystemExit(f"no activation cache in {cache}: run `python {Path(__file__).name} collect` first")
    meta = json.loads((cache / "cache.json").read_text())
    cfg = dataclasses.replace(CLTTrainConfig.from_dict(meta["clt"]), **json.loads(args.overrides))
    cfg = dataclasses.replace(cfg, total_tokens=args.steps * cfg.batch_tokens)
    ev = read_tensors(cache / "eval.safetensors")
    xe, ye = ev["x"].float(), ev["y"].float()
    n_chunks = meta["chunks"] if args.chunks is None else args.chunks
    if not 1 <= n_chunks <= meta["chunks"]:
        raise SystemExit(f"--chunks must be in [1, {meta['chunks']}] (the cache holds {meta['chunks']}), "
                         f"got {n_chunks}")
    chunks = [read_tensors(cache / f"chunk{c}.safetensors") for c in range(n_chunks)]
    tr = _Trainer(xe.shape[1], xe.shape[2], cfg)
    x0, y0 = chunks[0]["x"].float(), chunks[0]["y"].float()
    tr.initialise_from(x0, y0)
    _init(tr, args.init, x0, y0)

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            _, info = tr.clt.loss(xe / tr.in_scale[:, None], ye / tr.out_scale[:, None], 0.0)
        return round(info["nmse"], 4), round(info["l0"], 1)

    rows = [{"step": 0, "eval_nmse": evaluate()[0]}]
    print(args.name, "step 0 eval NMSE", rows[0]["eval_nmse"], flush=True)
    B, step, epoch, t0 = cfg.batch_tokens, 0, 0, time.perf_counter()
    while step < args.steps:
        for ci, ch in enumerate(chunks):
            n = len(ch["x"]) // B * B
            perm = torch.randperm(len(ch["x"]), generator=torch.Generator().manual_seed(epoch * 10 + ci))[:n]
            for b in range(0, n, B):
                if step >= args.steps:
                    break
                idx = perm[b:b + B]
                info = tr.train_step(ch["x"][idx].float(), ch["y"][idx].float())
                step += 1
                if step % 50 == 0 or step == args.steps:
                    nmse, l0 = evaluate()
                    rows.append({"step": step, "tokens": step * B, "batch_nmse": round(info["nmse"], 4),
                                 "eval_nmse": nmse, "eval_l0": l0,
                                 "seconds_per_step": round((time.perf_counter() - t0) / step, 3)})
                    print(args.name, json.dumps(rows[-1]), flush=True)
        epoch += 1
    result = {"name": args.name, "overrides": json.loads(args.overrides), "init": args.init, "chunks": n_chunks,
              "chunk_tokens": cfg.chunk_tokens, "threads": args.threads, "rows": rows,
              "command": "python benchmarks/bench_clt_probe.py " + " ".join(cli)}
    if args.record:   # one JSON list of runs, rewritten atomically; a rerun of the same name replaces its entry
        path = Path(args.record)
        runs = [r for r in (read_json(path) if path.exists() else []) if r["name"] != args.name]
        write_json(path, runs + [result])
    return result


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("collect", "run"):
        p = sub.add_parser(name)
        p.add_argument("--cache", default="/tmp/crafttrace_clt_probe_cache")
        p.add_argument("--threads", type=int, default=2)
        if name == "collect":
            p.add_argument("--size", default="default", choices=realbed.SIZES)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--out", default=None, help="built realbed directory (default: the cache's for size/seed)")
            p.add_argument("--chunks", type=int, default=4)
        else:
            p.add_argument("name")
            p.add_argument("overrides", help="JSON object of CLTTrainConfig fields")
            p.add_argument("--steps", type=int, default=150)
            p.add_argument("--init", default="default", choices=("default", "centred", "data"))
            p.add_argument("--chunks", type=int, default=None, help="train on the first N cached chunks (default: all)")
            p.add_argument("--record", default=None, help="JSON file collecting the runs (e.g. benchmarks/results/"
                                                          "smollm2_safety/clt_probes_default_seed0.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "collect":
        collect(args)
        return None
    return run(args, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
