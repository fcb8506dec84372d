"""Language-model fidelity of the safety-tuned SmolLM2 against its base: the capability check that can move at 135M.

    python benchmarks/bench_realbed_fidelity.py --size default --seed 0 --threads 2

MMLU sits at chance and GSM8K at zero for this model, so "MMLU lost <= 2 points" cannot fail. This measures what
the tuning could have damaged (``crafttrace.capability.lm_fidelity``):
  * next-token NLL on held-out English passages (the corpus passages the realbed's CLT did not train on);
  * NLL of the base model's own greedy answers to the held-out AlpacaEval requests of the over-refusal
    measurement, under each model;
  * how often the tuned model's greedy answer equals the base model's.
Needs a built realbed (``crafttrace testbed build smollm2-safety`` or bench_realbed.py). Writes
``benchmarks/results/smollm2_safety/fidelity_<size>_seed<seed>.json`` and ``.md`` (metrics only, no answers).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from crafttrace import capability, realbed, runs
from crafttrace.models import load_model

RESULTS = Path(__file__).resolve().parent / "results" / "smollm2_safety"


def render(r: dict) -> str:
    t, a, g = r["fidelity"]["text"], r["fidelity"]["answers"], r["fidelity"]["greedy_agreement"]
    L = [f"# Language-model fidelity: base vs safety-tuned {r['base']} ({r['size']}, seed {r['seed']})", "",
         f"Command: `{r['command']}`  ", f"Wall time: {r['wall_seconds']:.0f} s; torch threads {r['threads']}.", "",
         "| measure | base | tuned | tuned - base (95 % bootstrap CI) |", "|---|---|---|---|",
         f"| NLL/token, {t['n_items']} held-out English passages ({t['n_tokens']} tokens) | {t['base_nll']:.3f} "
         f"(ppl {t['base_ppl']:.1f}) | {t['new_nll']:.3f} (ppl {t['new_ppl']:.1f}) | {t['delta_nll']:+.3f} "
         f"[{t['delta_ci_low']:+.3f}, {t['delta_ci_high']:+.3f}] |"]
    if a is not None:
        L.append(f"| NLL/token of the base model's greedy answers, {a['n_items']} held-out AlpacaEval requests "
                 f"({a['n_tokens']} tokens) | {a['base_nll']:.3f} | {a['new_nll']:.3f} | {a['delta_nll']:+.3f} "
                 f"[{a['delta_ci_low']:+.3f}, {a['delta_ci_high']:+.3f}] |")
    L += ["", f"Greedy answers ({g['answer_tokens']} tokens) identical to the base model's: {g['exact']:.2f} of "
              f"{g['n_prompts']}; mean fraction of the base answer reproduced before the first difference: "
              f"{g['mean_matching_prefix']:.2f}."]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="default", choices=realbed.SIZES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="realbed directory (default: the realbed cache dir)")
    ap.add_argument("--n-texts", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=100, help="held-out AlpacaEval requests (the over-refusal set)")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bed = realbed.read_status(args.out or realbed.default_dir(args.size, args.seed))
    if "sft" not in bed.done:
        raise SystemExit(f"the realbed at {bed.out_dir} has no finished sft stage; build it first")
    from crafttrace.safety import make_splits
    prompts = make_splits(bed.config.safety).benign_test[:args.n_prompts]
    texts = realbed.heldout_passages(bed.config, args.n_texts)
    base, tuned = load_model(bed.config.base), load_model(bed.model_dir)
    fid = capability.lm_fidelity(base, tuned, texts, prompts, max_text_tokens=args.text_tokens,
                                 answer_tokens=args.answer_tokens)
    result = {"command": "python benchmarks/bench_realbed_fidelity.py "
                         + shlex.join(argv if argv is not None else sys.argv[1:]),
              "base": bed.config.base, "size": args.size, "seed": args.seed, "out_dir": str(bed.out_dir),
              "merge_scale": bed.done["sft"].get("merge_scale"), "threads": torch.get_num_threads(),
              "wall_seconds": time.perf_counter() - t0, "fidelity": fid}
    stem = Path(args.results) / f"fidelity_{args.size}_seed{args.seed}"
    runs.write_json(stem.with_suffix(".json"), result)
    runs.atomic_write_text(stem.with_suffix(".md"), render(result))
    print(render(result))
    return result


if __name__ == "__main__":
    main()
