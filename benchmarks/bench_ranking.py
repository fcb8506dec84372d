"""Ranking speed: circuit-tracer's default attribute() loop vs crafttrace's batched gradient path.

Both rank features by mean signed total effect on the refusal-minus-compliance logit difference over
the same N boundary-critical prompts; we print both wall times, the speed-up, and the top-10 overlap.

    python benchmarks/bench_ranking.py [--model testbed:0] [--n 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from crafttrace import attribution, boundary, ranking, tokens
from crafttrace.cli import load


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="testbed:0")
    ap.add_argument("--transcoder", default=None)
    ap.add_argument("--pool", default="testbed:framed_harmful")
    ap.add_argument("--set", default="testbed")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded, clt = load(args.model, args.transcoder)
    from crafttrace.ablation import pool_records
    ts = tokens.resolve(loaded.tokenizer, args.set)
    recs = pool_records(args.pool, 0)
    (scores,) = boundary.score_pool(loaded, [r["prompt"] for r in recs], [ts], progress=False)
    sel = boundary.select(scores, ts.name, top_k=args.n)
    ids = [loaded.encode_prompt(p)[0] for p in sel.prompts]
    print(f"{len(ids)} boundary prompts, mean length {sum(len(i) for i in ids) / len(ids):.1f} tokens")

    # circuit-tracer's default loop: one attribute() per prompt with its default settings
    # (batch_size=512, no max_feature_nodes), then the same total-effect aggregation.
    from circuit_tracer.attribution.attribute import attribute
    rm = attribution.replacement_model(loaded, clt)
    tgt = attribution.targets(loaded, ts)
    t = time.perf_counter()
    effs = [attribution.graph_effects(attribute(i, rm, attribution_targets=tgt), clt.n_layers) for i in ids]
    t_ct = time.perf_counter() - t
    m_ct = ranking.effects_matrix(effs, clt.n_layers, clt.d_transcoder).mean(0)

    t = time.perf_counter()
    fast = attribution.gradient_effects(loaded, clt, ids, ts, batch_size=16, progress=False)
    t_fast = time.perf_counter() - t
    m_fast = ranking.effects_matrix(fast, clt.n_layers, clt.d_transcoder).mean(0)

    top_ct = set(m_ct.abs().flatten().argsort(descending=True)[: args.top].tolist())
    top_fast = set(m_fast.abs().flatten().argsort(descending=True)[: args.top].tolist())
    corr = torch.corrcoef(torch.stack([m_ct.flatten(), m_fast.flatten()]))[0, 1]
    print(f"circuit-tracer attribute() loop: {t_ct:.2f} s")
    print(f"crafttrace gradient path:        {t_fast:.2f} s")
    print(f"speed-up: {t_ct / t_fast:.1f}x   top-{args.top} overlap: {len(top_ct & top_fast) / args.top:.2f}   "
          f"score correlation: {float(corr):.3f}")


if __name__ == "__main__":
    main()
