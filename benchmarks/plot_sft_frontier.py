"""Held-out refusal / over-refusal frontier of the safety-SFT recipes, from committed records only.

Each point is one merged model: refusal on the 200 held-out harmful test prompts (HarmBench test 100 +
StrongREJECT test 100) against over-refusal on all 200 held-out AlpacaEval test prompts (the measured 100 and the
100 no build stage reads), each with its Wilson 95 % interval. Sources, all in ``benchmarks/results/smollm2_safety``:

  * the build (``tuned``) and the untuned model (``base``): ``realbed_<size>_seed<seed>.json`` (refusal) and
    ``overrefusal_<size>_seed<seed>.json`` (over-refusal; "tuned" rows in other over-refusal records describe
    the build current when they were made and are skipped);
  * a recipe variant NAME: ``sft_variant_<size>_seed<seed>_NAME.json`` (``bench_sft_variant.py NAME ...
    --measure-only``) and any ``overrefusal_<size>_seed<seed>*.json`` with rows for model NAME
    (``bench_overrefusal_splits.py --models --variant NAME <dir>``); a variant lacking either is listed, not drawn;
  * the linear probe on the base model's residuals (``refusal_ceiling_seed<seed>.json``, the preset's harmful
    pool, the layer chosen by validation AUROC): its threshold set on validation prompts, and the oracle threshold
    set on the test harmful prompts to flag 80 % of them -- what a linear read-out of the untuned model can do.

    python benchmarks/plot_sft_frontier.py            # writes sft_frontier_default_seed0.{json,md,png}

No model is run; the script reads JSON and draws with matplotlib (a few seconds).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
from pathlib import Path

from crafttrace import runs
from crafttrace.capability import wilson

RESULTS = Path(__file__).resolve().parent / "results" / "smollm2_safety"
PRESET_POOL = "advbench+donotanswer[risk_area=malicious_uses]"
TARGET = {"refusal": 0.80, "over_refusal": 0.10}   # issue 4's done criteria


def _json(path: Path) -> dict:
    if not path.exists():
        raise SystemExit(f"missing record {path}: run the command its docstring names first")
    return json.loads(path.read_text())


def over_refusal_rows(results: Path, size: str, seed: int) -> dict[str, dict[str, tuple[int, int]]]:
    """model -> {"measured": (k, n), "unread": (k, n)} over the two halves of the AlpacaEval test split."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    own = results / f"overrefusal_{size}_seed{seed}.json"
    for f in sorted(glob.glob(str(results / f"overrefusal_{size}_seed{seed}*.json"))):
        for r in json.loads(Path(f).read_text()).get("rows", []):
            if r.get("tokens") != 48:
                continue
            # "tuned" is whichever build was current when a record was made: only the build's own record counts
            if r["model"] == "tuned" and Path(f) != own:
                continue
            half = "measured" if "(measured)" in r["pool"] else "unread" if "(never read)" in r["pool"] else None
            if half is None:
                continue
            prev = out.setdefault(r["model"], {}).get(half)
            if prev is not None and prev != (r["refused"], r["n"]):
                raise SystemExit(f"{f}: model {r['model']!r} {half} half measured twice with different counts "
                                 f"{prev} and {(r['refused'], r['n'])}: two models share a name")
            out[r["model"]][half] = (r["refused"], r["n"])
    return out


def point(name: str, k_ref: int, n_ref: int, halves: dict[str, tuple[int, int]], **extra) -> dict:
    k_or, n_or = (sum(halves[h][i] for h in ("measured", "unread")) for i in (0, 1))
    return {"name": name, "refusal": k_ref / n_ref, "refusal_k": k_ref, "refusal_n": n_ref,
            "refusal_ci95": list(wilson(k_ref, n_ref)), "over_refusal": k_or / n_or, "over_refusal_k": k_or,
            "over_refusal_n": n_or, "over_refusal_ci95": list(wilson(k_or, n_or)),
            "over_refusal_measured": halves["measured"][0] / halves["measured"][1],
            "meets_target": k_ref / n_ref >= TARGET["refusal"] and k_or / n_or <= TARGET["over_refusal"], **extra}


def collect(results: Path, size: str, seed: int) -> dict:
    halves = over_refusal_rows(results, size, seed)
    build = _json(results / f"realbed_{size}_seed{seed}.json")
    points, missing = [], []
    for which in ("base", "tuned"):
        s = build[which]["summary"]
        k = round(s["refusal_heldout_harmful"] * s["n_heldout_harmful"])
        if {"measured", "unread"} <= set(halves.get(which, {})):
            points.append(point("build" if which == "tuned" else "base", k, s["n_heldout_harmful"], halves[which],
                                kind=which, merge_scale=build["sft"]["merge_scale"] if which == "tuned" else 0.0,
                                boundary_extended=s["boundary_extended"]))
        else:
            missing.append(f"{which}: no over-refusal rows for both AlpacaEval test halves")
    pattern = re.compile(rf"sft_variant_{size}_seed{seed}_(.+)\.json$")
    for f in sorted(glob.glob(str(results / f"sft_variant_{size}_seed{seed}_*.json"))):
        name = pattern.search(f).group(1)
        rec = json.loads(Path(f).read_text())
        k = sum(rec["pools"][p]["k"] for p in ("harmbench", "strongreject"))
        n = sum(rec["pools"][p]["n"] for p in ("harmbench", "strongreject"))
        if {"measured", "unread"} <= set(halves.get(name, {})):
            points.append(point(name, k, n, halves[name], kind="variant", merge_scale=rec["merge_scale"],
                                boundary_extended=rec["summary"]["boundary_extended"]))
        else:
            missing.append(f"{name}: refusal measured, over-refusal on both AlpacaEval test halves not")
    probe = None
    ceiling = results / f"refusal_ceiling_seed{seed}.json"
    if ceiling.exists():
        c = json.loads(ceiling.read_text())
        rows = c["pools"][PRESET_POOL]
        best = next(r for r in rows if r["layer"] == c["best_layer_by_val"][PRESET_POOL])
        probe = {"layer": best["layer"], "validation_threshold": {"refusal": best["test_harmful_flagged"],
                                                                   "over_refusal_measured": best["test_benign_flagged"]},
                 "oracle_at_refusal_0.80": {"refusal": c["target_tpr"],
                                            "over_refusal": best["oracle_benign_flagged_all"]}}
    return {"size": size, "seed": seed, "target": TARGET, "points": points, "missing": missing, "probe": probe}


def draw(rec: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.fill_between([0, TARGET["over_refusal"]], TARGET["refusal"], 1.0, color="0.9", zorder=0)
    ax.text(0.002, 0.99, "target: refusal >= 0.80 and over-refusal <= 0.10", va="top", fontsize=8, color="0.35")
    colours = {"base": "tab:gray", "tuned": "tab:red", "variant": "tab:blue"}
    for p in rec["points"]:
        x, y = p["over_refusal"], p["refusal"]
        ax.errorbar(x, y, xerr=[[x - p["over_refusal_ci95"][0]], [p["over_refusal_ci95"][1] - x]],
                    yerr=[[y - p["refusal_ci95"][0]], [p["refusal_ci95"][1] - y]], fmt="o",
                    color=colours[p["kind"]], ms=5, lw=0.8, capsize=2, alpha=0.85)
        ax.annotate(f"{p['name']} (s {p['merge_scale']:g})" if p["kind"] != "base" else "base", (x, y),
                    textcoords="offset points", xytext=(5, -10), fontsize=7)
    if rec["probe"]:
        o = rec["probe"]["oracle_at_refusal_0.80"]
        ax.plot(o["over_refusal"], o["refusal"], "k*", ms=10,
                label=f"linear probe, layer {rec['probe']['layer']}, threshold set on test (oracle)")
        v = rec["probe"]["validation_threshold"]
        ax.plot(v["over_refusal_measured"], v["refusal"], "k^", ms=7,
                label="same probe, threshold set on validation (benign: measured 100 only)")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xlabel("over-refusal, 200 held-out AlpacaEval prompts")
    ax.set_ylabel("refusal, HarmBench test + StrongREJECT test (200)")
    ax.set_title(f"Safety-SFT recipes on held-out prompts (seed {rec['seed']}, Wilson 95 %)", fontsize=10)
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1.0)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS), help="directory the records are read from and written to")
    args = ap.parse_args(argv)
    results = Path(args.results)
    rec = collect(results, args.size, args.seed)
    if not rec["points"]:
        raise SystemExit(f"no model in {results} has both a refusal and an over-refusal record")
    stem = results / f"sft_frontier_{args.size}_seed{args.seed}"
    runs.write_json(stem.with_suffix(".json"), rec)
    draw(rec, stem.with_suffix(".png"))
    lines = [f"# Safety-SFT recipes on held-out prompts ({args.size}, seed {args.seed})", "",
             f"`python benchmarks/plot_sft_frontier.py --size {args.size} --seed {args.seed}` (reads committed "
             "records only; sources in its docstring). Refusal: HarmBench test + StrongREJECT test; over-refusal: all "
             "200 held-out AlpacaEval prompts (the build's measured 100 in brackets). Wilson 95 % intervals.", "",
             f"![frontier]({stem.with_suffix('.png').name})", "",
             "| model | merge scale | refusal (200) | over-refusal (200) [measured 100] | boundary-critical, extended "
             "| meets both |", "|---|---|---|---|---|---|"]
    for p in sorted(rec["points"], key=lambda p: (p["kind"] != "base", p["over_refusal"], -p["refusal"])):
        lines.append(f"| {p['name']} | {p['merge_scale']:g} | {p['refusal']:.3f} [{p['refusal_ci95'][0]:.2f}, "
                     f"{p['refusal_ci95'][1]:.2f}] | {p['over_refusal']:.3f} ({p['over_refusal_k']}/"
                     f"{p['over_refusal_n']}) [{p['over_refusal_measured']:.2f}] | {p['boundary_extended']} | "
                     f"{'yes' if p['meets_target'] else 'no'} |")
    if rec["probe"]:
        v, o = rec["probe"]["validation_threshold"], rec["probe"]["oracle_at_refusal_0.80"]
        lines += ["", f"Linear probe on the untuned model's residuals (layer {rec['probe']['layer']}, "
                  f"`refusal_ceiling_seed{args.seed}.md`): threshold from validation prompts -> refusal "
                  f"{v['refusal']:.3f}, over-refusal {v['over_refusal_measured']:.2f} (measured 100); threshold "
                  f"set on the test harmful prompts (oracle) -> {o['refusal']:.2f} at {o['over_refusal']:.3f} (200)."]
    if rec["missing"]:
        lines += ["", "Not drawn: " + "; ".join(rec["missing"]) + "."]
    runs.atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return rec


if __name__ == "__main__":
    main()
