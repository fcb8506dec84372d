"""How much refusal can the safety-SFT data buy on SmolLM2-135M? A linear-probe ceiling (issue #4).

The realbed's SFT sees harmful prompts from AdvBench only (HarmBench and StrongREJECT are held out). A refusal
decision the tuned model learns from that data is, at best, a classifier of the prompt's representation. This
script fits the best *linear* one directly: a logistic probe on the base model's residual stream
(``hook_resid_mid``, last prompt token) trained on exactly the SFT prompts (AdvBench train vs AlpacaEval train),
thresholded to 10 % false positives on validation AlpacaEval, and reports the fraction of held-out harmful
prompts above the threshold -- what a refusal rule of this kind would refuse at the over-refusal target. It
also reports AUROC on the validation pool (HarmBench val + StrongREJECT val vs AlpacaEval val) per layer.

    python benchmarks/bench_refusal_ceiling.py --seed 0 --threads 2

Writes ``benchmarks/results/smollm2_safety/refusal_ceiling_seed<seed>.{json,md}``. Prompts are scored one at a
time (no padding effects); 765 s on 2 cores beside other jobs.
"""

from __future__ import annotations

import argparse
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


def last_token_states(loaded, prompts: list[str], layers: list[int], hook: str) -> torch.Tensor:
    """[n, len(layers), d_model] at the last prompt token (the position that emits the first response token)."""
    out = []
    for p in tqdm(prompts, desc="residuals", leave=False):
        ids = loaded.encode_prompt(p).reshape(1, -1)
        with torch.no_grad(), capture(loaded.model, hook, layers) as xs:
            loaded.model(input_ids=ids)
        out.append(torch.stack([xs[l][0, -1] for l in layers]).float())
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-harmful-train", type=int, default=256, help="AdvBench prompts (the realbed default)")
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 10, 14, 18, 22, 26])
    ap.add_argument("--fpr", type=float, default=0.10, help="false-positive rate on validation AlpacaEval")
    ap.add_argument("--l2", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = SafetyConfig(n_harmful_train=args.n_harmful_train, calibration_pool="harmbench+strongreject",
                       n_calibration=10_000, seed=args.seed)
    sp = make_splits(cfg)
    harm_val, benign_val = calibration_prompts(cfg, sp)
    harm_test = data.prompts("harmbench", split="test")[:100] + data.prompts("strongreject", split="test")[:100]
    loaded = load_model(args.model)
    hook = "hook_resid_mid"
    sets = {"train_harmful": sp.harmful_train, "train_benign": sp.benign_train, "val_harmful": harm_val,
            "val_benign": benign_val, "test_harmful": harm_test, "test_benign": sp.benign_test[:100]}
    states = {k: last_token_states(loaded, v, args.layers, hook) for k, v in sets.items()}
    rows = []
    for j, layer in enumerate(args.layers):
        xtr = torch.cat([states["train_harmful"][:, j], states["train_benign"][:, j]])
        ytr = torch.cat([torch.ones(len(sets["train_harmful"])), torch.zeros(len(sets["train_benign"]))])
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        w = fit_logistic((xtr - mu) / sd, ytr, args.l2)

        def score(k: str) -> torch.Tensor:
            return ((states[k][:, j].double() - mu) / sd) @ w[:-1] + w[-1]

        thr = torch.quantile(score("val_benign"), 1 - args.fpr)
        rows.append({"layer": layer, "val_auroc": auroc(score("val_harmful"), score("val_benign")),
                     "val_tpr": float((score("val_harmful") > thr).double().mean()),
                     "test_harmful_flagged": float((score("test_harmful") > thr).double().mean()),
                     "test_benign_flagged": float((score("test_benign") > thr).double().mean()),
                     "test_auroc": auroc(score("test_harmful"), score("test_benign"))})
    best = max(rows, key=lambda r: r["val_auroc"])
    rec = {"command": "python benchmarks/bench_refusal_ceiling.py " + " ".join(shlex.quote(a) for a in
                                                                                 (argv or sys.argv[1:])),
           "seed": args.seed, "model": args.model, "hook": hook, "fpr": args.fpr,
           "n": {k: len(v) for k, v in sets.items()}, "rows": rows, "best_layer_by_val": best["layer"],
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.results)
    runs.write_json(out / f"refusal_ceiling_seed{args.seed}.json", rec)
    lines = [f"# Linear-probe refusal ceiling, {args.model}, seed {args.seed}", "",
             f"`{rec['command']}` ({rec['wall_seconds']:.0f} s). Logistic probe on `{hook}` at the last prompt "
             f"token, trained on the SFT prompts ({len(sets['train_harmful'])} AdvBench vs "
             f"{len(sets['train_benign'])} AlpacaEval), threshold at {args.fpr:.0%} false positives on validation "
             f"AlpacaEval ({len(benign_val)}). Validation harmful: HarmBench val + StrongREJECT val "
             f"({len(harm_val)}); test: HarmBench test + StrongREJECT test (100 + 100) vs held-out AlpacaEval (100).",
             "", "| layer | val AUROC | val harmful flagged | test AUROC | test harmful flagged | test benign flagged |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['val_auroc']:.3f} | {r['val_tpr']:.2f} | {r['test_auroc']:.3f} | "
              f"{r['test_harmful_flagged']:.2f} | {r['test_benign_flagged']:.2f} |" for r in rows]
    lines += ["", f"Best layer by validation AUROC: {best['layer']} -- a linear refusal rule learned from this data "
              f"flags {best['test_harmful_flagged']:.0%} of the held-out harmful prompts while flagging "
              f"{best['test_benign_flagged']:.0%} of held-out benign ones."]
    (out / f"refusal_ceiling_seed{args.seed}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rec


if __name__ == "__main__":
    main()
