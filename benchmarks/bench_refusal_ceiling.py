"""How much refusal can the safety-SFT data buy on SmolLM2-135M? A linear-probe ceiling (issue #4).

The realbed's SFT sees harmful prompts from its training pool only (HarmBench and StrongREJECT are held out). A
refusal decision the tuned model learns from that data is, at best, a classifier of the prompt's representation.
This script fits the best *linear* one directly: a logistic probe on the base model's residual stream
(``hook_resid_mid``, last prompt token) trained on exactly the SFT prompts of each harmful pool (its 256-prompt
training split vs the AlpacaEval training split), thresholded to 10 % false positives on validation AlpacaEval,
and reports the fraction of held-out harmful prompts above the threshold -- what a refusal rule of this kind
would refuse at the over-refusal target -- plus AUROC on validation (HarmBench val + StrongREJECT val vs
AlpacaEval val) and test per layer. An oracle column asks the issue's question directly: with the threshold put
where the probe flags ``--target-tpr`` (0.80) of the test harmful prompts -- chosen on the test prompts, so an
optimistic bound for this probe -- what fraction of the held-out AlpacaEval prompts (the 100 the measure stage
reads, and all 200) does it flag? Pools are compared side by side in one run on the same residuals:

    python benchmarks/bench_refusal_ceiling.py --seed 0 --threads 2

Writes ``benchmarks/results/smollm2_safety/refusal_ceiling_seed<seed>.{json,md}``. Prompts run in batches of
16, right-padded (a causal model's last prompt token never attends to the padding after it).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from crafttrace import data, runs
from crafttrace.hooks import capture
from crafttrace.models import load_model
from crafttrace.safety import SafetyConfig, calibration_prompts, make_splits

RESULTS = Path(__file__).resolve().parent / "results" / "smollm2_safety"


_DNA = "donotanswer[risk_area={}]"
# AdvBench alone (the recipe), the realbed default (plus Do-Not-Answer's "malicious uses"), and the three
# Do-Not-Answer areas where refusing is the expected answer
DEFAULT_POOLS = ("advbench", "advbench+" + _DNA.format("malicious_uses"),
                 "+".join(["advbench"] + [_DNA.format(a) for a in ("malicious_uses", "information_hazard",
                                                                   "discrimination_exclusion_toxicity_hateful_offensive")]))


def last_token_states(loaded, prompts: list[str], layers: list[int], hook: str, batch: int = 16) -> torch.Tensor:
    """[n, len(layers), d_model] at the last prompt token (the position that emits the first response token)."""
    enc = [loaded.encode_prompt(p)[0].cpu() for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))  # similar lengths share a batch: less padding
    out: list[torch.Tensor | None] = [None] * len(enc)
    for s in tqdm(range(0, len(order), batch), desc="residuals", leave=False):
        idx = order[s:s + batch]
        ids = torch.zeros(len(idx), max(len(enc[i]) for i in idx), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, :len(enc[i])], mask[r, :len(enc[i])] = enc[i], 1
        with torch.no_grad(), capture(loaded.model, hook, layers) as xs:
            loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device))
        for r, i in enumerate(idx):
            out[i] = torch.stack([xs[l][r, len(enc[i]) - 1] for l in layers]).float().cpu()
    return torch.stack(out)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """L2-regularised logistic regression by L-BFGS on standardised inputs (scikit-learn is not a dependency;
    this is the whole of what it would do here). Returns [d + 1] weights, bias last."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], y) + l2 * (w[:-1] ** 2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    return float((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean())


def oracle_benign_rate(harmful: torch.Tensor, benign: torch.Tensor, tpr: float) -> float:
    """Fraction of ``benign`` scores at or above the highest threshold that flags at least ``tpr`` of
    ``harmful``: the over-refusal this score pays for that refusal rate, at best."""
    k = max(1, math.ceil(tpr * len(harmful) - 1e-9))
    thr = torch.sort(harmful, descending=True).values[k - 1]
    return float((benign >= thr).double().mean())


def probe_rows(states: dict[str, torch.Tensor], train_harmful: str, layers: list[int], fpr: float,
               l2: float, n_hb: int, tpr: float = 0.8) -> list[dict]:
    """Per layer: fit on ``train_harmful`` vs ``train_benign``, threshold at ``fpr`` on ``val_benign``; the first
    ``n_hb`` test harmful prompts are HarmBench's, the rest StrongREJECT's. ``test_benign`` is the measured
    AlpacaEval test slice, ``test_benign_all`` every held-out one (for the oracle column)."""
    rows = []
    for j, layer in enumerate(layers):
        xh, xb = states[train_harmful][:, j], states["train_benign"][:, j]
        xtr = torch.cat([xh, xb])
        ytr = torch.cat([torch.ones(len(xh)), torch.zeros(len(xb))])
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        w = fit_logistic((xtr - mu) / sd, ytr, l2)

        def score(k: str) -> torch.Tensor:
            return ((states[k][:, j].double() - mu) / sd) @ w[:-1] + w[-1]

        thr = torch.quantile(score("val_benign"), 1 - fpr)
        flagged = score("test_harmful") > thr
        rows.append({"layer": layer, "val_auroc": auroc(score("val_harmful"), score("val_benign")),
                     "val_tpr": float((score("val_harmful") > thr).double().mean()),
                     "test_harmful_flagged": float(flagged.double().mean()),
                     "test_harmbench_flagged": float(flagged[:n_hb].double().mean()),
                     "test_strongreject_flagged": float(flagged[n_hb:].double().mean()),
                     "test_benign_flagged": float((score("test_benign") > thr).double().mean()),
                     "test_auroc": auroc(score("test_harmful"), score("test_benign")),
                     "oracle_benign_flagged": oracle_benign_rate(score("test_harmful"), score("test_benign"), tpr),
                     "oracle_benign_flagged_all": oracle_benign_rate(score("test_harmful"),
                                                                     score("test_benign_all"), tpr)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--harmful-pools", nargs="+", default=list(DEFAULT_POOLS),
                    help="harmful SFT pools to compare (data set names; '+' joins, name[field=value] filters)")
    ap.add_argument("--n-harmful-train", type=int, default=256, help="training prompts per pool (the realbed default)")
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 10, 14, 18, 22, 26])
    ap.add_argument("--fpr", type=float, default=0.10, help="false-positive rate on validation AlpacaEval")
    ap.add_argument("--l2", type=float, default=1e-2)
    ap.add_argument("--target-tpr", type=float, default=0.80,
                    help="test refusal rate of the oracle column (the issue's refusal target)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfgs = {pool: SafetyConfig(harmful_pool=pool, n_harmful_train=args.n_harmful_train,
                               calibration_pool="harmbench+strongreject", n_calibration=10_000, seed=args.seed)
            for pool in args.harmful_pools}
    splits = {pool: make_splits(c) for pool, c in cfgs.items()}
    sp0 = splits[args.harmful_pools[0]]  # the benign splits depend on the seed only: the same for every pool
    assert all(sp.benign_train == sp0.benign_train and sp.benign_test == sp0.benign_test for sp in splits.values())
    harm_val, benign_val = calibration_prompts(cfgs[args.harmful_pools[0]], sp0)
    hb_test = data.prompts("harmbench", split="test")[:100]
    harm_test = hb_test + data.prompts("strongreject", split="test")[:100]
    loaded = load_model(args.model)
    hook = "hook_resid_mid"
    sets = {"train_benign": sp0.benign_train, "val_harmful": harm_val, "val_benign": benign_val,
            "test_harmful": harm_test, "test_benign": sp0.benign_test[:100], "test_benign_all": sp0.benign_test}
    sets.update({f"train_harmful:{pool}": sp.harmful_train for pool, sp in splits.items()})
    # each distinct prompt runs once, however many sets it is in
    unique = sorted({p for v in sets.values() for p in v})
    st = last_token_states(loaded, unique, args.layers, hook)
    at = {p: i for i, p in enumerate(unique)}
    states = {k: st[[at[p] for p in v]] for k, v in sets.items()}
    pools = {pool: probe_rows(states, f"train_harmful:{pool}", args.layers, args.fpr, args.l2, len(hb_test),
                              args.target_tpr) for pool in args.harmful_pools}
    best = {pool: max(rows, key=lambda r: r["val_auroc"]) for pool, rows in pools.items()}
    rec = {"command": "python benchmarks/bench_refusal_ceiling.py " + " ".join(shlex.quote(a) for a in
                                                                                 (argv or sys.argv[1:])),
           "seed": args.seed, "model": args.model, "hook": hook, "fpr": args.fpr, "target_tpr": args.target_tpr,
           "n": {k: len(v) for k, v in sets.items()},
           "train_harmful_sources": {pool: {src: len(set(sp.harmful_train) & set(data.prompts(src)))
                                            for src in pool.split("+")} for pool, sp in splits.items()},
           "pools": pools, "best_layer_by_val": {pool: b["layer"] for pool, b in best.items()},
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.results)
    runs.write_json(out / f"refusal_ceiling_seed{args.seed}.json", rec)
    lines = [f"# Linear-probe refusal ceiling, {args.model}, seed {args.seed}", "",
             f"`{rec['command']}` ({rec['wall_seconds']:.0f} s). Logistic probe on `{hook}` at the last prompt "
             f"token, trained on each pool's SFT prompts ({args.n_harmful_train} harmful vs "
             f"{len(sets['train_benign'])} AlpacaEval), threshold at {args.fpr:.0%} false positives on validation "
             f"AlpacaEval ({len(benign_val)}). Validation harmful: HarmBench val + StrongREJECT val "
             f"({len(harm_val)}); test: HarmBench test + StrongREJECT test (100 + 100) vs held-out AlpacaEval (100). "
             f"Oracle: the threshold set on the test harmful prompts to flag {args.target_tpr:.0%} of them (an "
             f"optimistic bound), benign flagged on the measured 100 / all {len(sets['test_benign_all'])} held-out."]
    for pool, rows in pools.items():
        src = ", ".join(f"{n} {s}" for s, n in rec["train_harmful_sources"][pool].items())
        lines += ["", f"## Harmful pool `{pool}` ({src})", "",
                  "| layer | val AUROC | val harmful flagged | test AUROC | test harmful flagged (HarmBench / "
                  f"StrongREJECT) | test benign flagged | oracle benign at {args.target_tpr:.2f} harmful |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['val_auroc']:.3f} | {r['val_tpr']:.2f} | {r['test_auroc']:.3f} | "
                  f"{r['test_harmful_flagged']:.2f} ({r['test_harmbench_flagged']:.2f} / "
                  f"{r['test_strongreject_flagged']:.2f}) | {r['test_benign_flagged']:.2f} | "
                  f"{r['oracle_benign_flagged']:.2f} / {r['oracle_benign_flagged_all']:.2f} |" for r in rows]
        b = best[pool]
        lines += ["", f"Best layer by validation AUROC: {b['layer']} -- a linear refusal rule learned from this "
                  f"pool flags {b['test_harmful_flagged']:.0%} of the held-out harmful prompts while flagging "
                  f"{b['test_benign_flagged']:.0%} of held-out benign ones."]
    (out / f"refusal_ceiling_seed{args.seed}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rec


if __name__ == "__main__":
    main()
