"""Attention-sink positions in a realbed's CLT training data, and what they do to a least-squares skip fit.

Collects the first training chunk exactly as ``train_clt`` does (the realbed's CLT texts and config), prints the
largest per-position norm ratios (max over layers of ||x_l|| / median_l) with the tokens they sit on, and fits a
ridge skip (``_Trainer.initialise_from``'s regression) at one layer with and without the positions above
``outlier_norm_ratio``, scoring it on the chunk itself and on the held-out evaluation tokens. Needs a finished
SFT stage; reads no CLT.

    python benchmarks/diagnose_clt_outliers.py --size default --seed 0 --threads 2 --layer 11
"""

from __future__ import annotations

import argparse

import torch

from crafttrace import realbed, safety
from crafttrace.data import read_records
from crafttrace.hooks import capture
from crafttrace.models import load_model
from crafttrace.safety import DISTILL_FILE
from crafttrace.training import ActivationStream, inlier_mask


def ridge_nmse(x: torch.Tensor, y: torch.Tensor, xe: torch.Tensor, ye: torch.Tensor) -> tuple[float, float]:
    """(in-sample, held-out) NMSE of a ridge fit y ~ x (same ridge as the CLT's skip initialisation)."""
    X, Y = x.double(), y.double()
    mx, my = X.mean(0), Y.mean(0)
    G = (X - mx).T @ (X - mx)
    ridge = 1e-2 * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
    W = torch.linalg.solve(G + ridge, (X - mx).T @ (Y - my))

    def nmse(a, b):
        a, b = a.double(), b.double()
        return float(((a - mx) @ W + my - b).pow(2).sum() / (b - b.mean(0)).pow(2).sum())
    return nmse(x, y), nmse(xe, ye)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="default", choices=realbed.SIZES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layer", type=int, default=11, help="layer of the ridge skip fit")
    ap.add_argument("--ratio", type=float, default=50.0, help="outlier_norm_ratio to compare against")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    src = realbed.default_dir(args.size, args.seed)
    bed = realbed.read_status(src, needs=("sft",))   # a named RealbedError if src holds no tuned model
    cfg = bed.config
    loaded = load_model(src / "sft" / "model")
    texts = realbed.clt_texts(loaded, cfg, safety.make_splits(cfg.safety), read_records(src / "sft" / DISTILL_FILE))
    stream = ActivationStream(loaded.model, loaded.tokenizer, texts, cfg.clt)
    _, x, y = next(stream.chunks(0))
    xe, ye = stream.eval_set()
    norms = x.norm(dim=-1)
    ratio = (norms / norms.median(0).values).max(1).values
    top = ratio.sort(descending=True).values
    print(f"chunk 0: {len(x)} positions; largest max-over-layers norm ratios: {[round(float(r), 1) for r in top[:6]]}")
    keep = inlier_mask(x, args.ratio)
    print(f"above {args.ratio:g}x: {int((~keep).sum())}; largest kept ratio {float(ratio[keep].max()):.1f}x; "
          f"evaluation positions above: {int((~inlier_mask(xe, args.ratio)).sum())} of {len(xe)}")
    # the tokens behind the loud positions: the chunk is shuffled, so re-run the first 160 windows one by one
    for w in stream._train_windows[:160]:
        ids = torch.tensor([w])
        with torch.no_grad(), capture(loaded.model, cfg.clt.feature_input_hook, list(range(stream.n_layers))) as xs:
            loaded.model(input_ids=ids)
        n = torch.stack([xs[layer][0] for layer in range(stream.n_layers)], 1).norm(dim=-1)   # [T, L]
        r = (n / norms.median(0).values).max(1).values
        for p in range(1, len(w)):
            if r[p] > args.ratio:
                print(f"  sink at position {p} after {loaded.tokenizer.decode(w[:p])[-12:]!r}: "
                      f"{loaded.tokenizer.decode(w[p])!r}, {float(r[p]):.0f}x")
    li = args.layer
    for name, m in (("all positions", torch.ones_like(keep)), (f"outliers (> {args.ratio:g}x) left out", keep)):
        ins, held = ridge_nmse(x[m, li], y[m, li], xe[:, li], ye[:, li])
        print(f"ridge skip at layer {li}, {name}: NMSE in-sample {ins:.3f}, held out {held:.3f}")


if __name__ == "__main__":
    main()
