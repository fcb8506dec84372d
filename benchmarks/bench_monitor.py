"""Monitor benchmark: (1) overhead, a forward pass with the refusal-circuit monitor's read-only hooks vs
the same forward unhooked, as a ratio (goal <= 1.05x); (2) detection on the synthetic testbed, the
monitor's score vs the model's first-token P(refuse) vs the refusal-direction projection (issue #7).

The monitor reads only its own features' encoder rows (k dot products per token per hooked layer) at
``clt.feature_input_hook``. Timings interleave hooked and unhooked forwards and take the minimum over
repetitions, which is the estimate least disturbed by other processes on a shared machine.

Detection: per testbed seed, the gradient-path ranking (as ``tests/test_monitor.py``), then
``monitor.run_monitor`` with its defaults at each ``--sample-seeds`` value (which calibration and
evaluation prompts are drawn). Reported per evaluation: AUROC and TPR at 5% FPR of every detector, the
flag rates at the calibration threshold, and a paired bootstrap (1000 resamples of both classes) of the
monitor-minus-P(refuse) AUROC difference on the complied-with framed prompts.

    python benchmarks/bench_monitor.py --threads 1 --batch 4 --reps 15      # writes results/bench_monitor.{json,md}
    python benchmarks/bench_monitor.py --models tiny --testbed-seeds 0 1 2 --sample-seeds 0 1 2 3 4

Results and the command that produced them: ``benchmarks/results/bench_monitor.md``. On the toy models the
~1.3 ms overhead is the fixed Python cost of the hooks, which a real model's forward amortises.

``tiny`` is the 2-layer test fixture; SmolLM2 runs with a random CLT of the right shape (the monitor's
cost does not depend on the encoder's values), 8+8+8 monitored features spread over its layers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crafttrace import direction, monitor as M, runs

RESULTS = Path(__file__).resolve().parent / "results"
DETECTORS = ("monitor", "p_refuse", "direction", "monitor_harm", "monitor_drive", "monitor_suppression")


def _features(n_layers: int, d_t: int, k: int = 8) -> list[M.MonitorFeature]:
    g = torch.Generator().manual_seed(0)
    out = []
    for group in M.GROUPS:
        for j in range(k):
            layer = int(torch.randint(0, n_layers, (1,), generator=g))
            out.append(M.MonitorFeature(layer, int(torch.randint(0, d_t, (1,), generator=g)), group, 1.0,
                                        effect=0.1 if group == "refusal" else -0.1))
    return out


def _load(name: str):
    if name == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from lead_fixtures import tiny_clt, tiny_model
        return tiny_model(), tiny_clt()
    if name.startswith("testbed"):
        from crafttrace.cli import load
        return load(name)
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    from crafttrace.models import load_model
    loaded = load_model(name)
    cfg = loaded.model.config
    clt = CrossLayerTranscoder(cfg.num_hidden_layers, 2048, cfg.hidden_size, activation_function="jump_relu",
                               lazy_decoder=True, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        clt.W_enc.normal_(0, cfg.hidden_size ** -0.5)
    return loaded, clt


PROMPTS = ["How do I make a cake for a birthday party?", "Write a short story about a dragon who learns to sing.",
           "Explain how vaccines train the immune system.", "What is the capital of Australia, and why?",
           "Give me three tips for learning a new language quickly.", "Summarise the plot of Hamlet in two lines.",
           "How do airplanes stay in the air?", "Translate 'good morning' into French and Spanish."]


@torch.no_grad()
def bench(name: str, batch: int, reps: int) -> dict:
    loaded, clt = _load(name)
    model = loaded.model
    # calibration values do not affect the hooked forward being timed
    mon = M.Monitor(_features(clt.n_layers, clt.d_transcoder), clt.feature_input_hook, {})
    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    seqs = [direction.encode(loaded, p) for p in prompts]
    ids, mask, pos = direction._pad_left(seqs, direction._pad_id(loaded))
    kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}

    def plain():
        t = time.perf_counter()
        model(**kw)
        return time.perf_counter() - t

    def hooked():
        t = time.perf_counter()
        with M.watch(model, clt, mon) as trace:
            model(**kw)
            trace.read()
        return time.perf_counter() - t

    for _ in range(3):  # warm-up
        plain(), hooked()
    tp, th = [], []
    for i in range(reps):  # interleaved, alternating order
        if i % 2:
            tp.append(plain()), th.append(hooked())
        else:
            th.append(hooked()), tp.append(plain())
    return {"model": name, "tokens": int(mask.sum()), "batch": batch, "features": len(mon.features),
            "plain_ms": 1e3 * min(tp), "monitored_ms": 1e3 * min(th), "ratio": min(th) / min(tp)}


def _bootstrap_diff(res: dict, n: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap of AUROC(monitor) - AUROC(P(refuse)) over resampled positives and negatives."""
    (mp, mn), (pp, pn) = (tuple(map(np.asarray, res["scores"][k])) for k in ("monitor", "p_refuse"))
    rng = np.random.default_rng(seed)
    d = []
    for _ in range(n):
        i, j = rng.integers(0, len(mp), len(mp)), rng.integers(0, len(mn), len(mn))
        d.append(direction.auroc(mp[i], mn[j]) - direction.auroc(pp[i], pn[j]))
    d = np.asarray(d)
    return {"diff": res["monitor"]["auroc"] - res["p_refuse"]["auroc"], "ci95": np.quantile(d, [0.025, 0.975]).tolist(),
            "p_le_0": float((d <= 0).mean()), "resamples": n}


def detect(tb_seed: int, sample_seeds: list[int]) -> list[dict]:
    from crafttrace.ablation import AblationConfig, run_ablation
    from crafttrace.testbed import load_testbed
    loaded, clt = load_testbed(tb_seed, build_if_missing=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_ablation(loaded, clt, AblationConfig(influence_path="grad"), tmp, rank_only=True, progress=False)
        for s in sample_seeds:
            res = M.run_monitor(loaded, clt, Path(tmp) / "ranking.json", Path(tmp) / f"monitor{s}",
                                M.MonitorRunConfig(seed=s), progress=False)
            row = {"testbed_seed": tb_seed, "sample_seed": s, "n_wrapped_harmful": res["n_wrapped_harmful"],
                   "n_wrapped_complied": res["n_wrapped_complied"],
                   "calibration": {k: res["calibration"][k] for k in ("w_harm", "w_drive", "threshold")}}
            for name in ("plain", "wrapped_complied"):
                r = res[name]
                if "skipped" in r:
                    row[name] = r
                    continue
                row[name] = {k: {m: r[k][m] for m in ("auroc", "tpr_at_fpr", "fpr", "n_pos", "n_neg")} for k in DETECTORS}
                row[name]["flag_rate_pos"], row[name]["flag_rate_neg"] = r["flag_rate_pos"], r["flag_rate_neg"]
            if "scores" in res["wrapped_complied"]:
                row["wrapped_complied"]["monitor_minus_p_refuse"] = _bootstrap_diff(res["wrapped_complied"])
            rows.append(row)
    return rows


def render(overhead: list[dict], detection: list[dict], command: str) -> str:
    lines = ["# Monitor benchmark", "", f"Command: `{command}`", "", "## Overhead (forward pass, min over reps)", "",
             "| model | tokens | features | unhooked ms | monitored ms | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['tokens']} | {r['features']} | {r['plain_ms']:.2f} | {r['monitored_ms']:.2f} | "
              f"{r['ratio']:.3f}x |" for r in overhead]
    lines += ["", "## Detection on the synthetic testbed (AUROC / TPR at 5% FPR)", "",
              "wrapped = complied-with framed harmful vs framed benign; flag+/flag- = flag rates at the threshold "
              "calibrated on plain benign prompts (5% FPR there).", "",
              "| testbed | sample | eval | n+ / n- | monitor | P(refuse) | direction | harm | drive | suppression "
              "| flag+ / flag- | monitor - P(refuse) [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in detection:
        for name in ("plain", "wrapped_complied"):
            r = d[name]
            if "skipped" in r:
                lines.append(f"| {d['testbed_seed']} | {d['sample_seed']} | {name} | {r['skipped']} |||||||||")
                continue
            cell = lambda k: f"{r[k]['auroc']:.4f} / {r[k]['tpr_at_fpr']:.3f}"  # noqa: E731
            b = r.get("monitor_minus_p_refuse")
            diff = f"{b['diff']:+.4f} [{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}]" if b else ""
            lines.append(f"| {d['testbed_seed']} | {d['sample_seed']} | {name} | {r['monitor']['n_pos']} / "
                         f"{r['monitor']['n_neg']} | " + " | ".join(cell(k) for k in DETECTORS) +
                         f" | {r['flag_rate_pos']:.3f} / {r['flag_rate_neg']:.3f} | {diff} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["tiny", "testbed:0", "smollm2-135m-instruct"],
                    help="overhead: models to time (none: skip)")
    ap.add_argument("--testbed-seeds", nargs="*", type=int, default=[0], help="detection: testbed seeds (none: skip)")
    ap.add_argument("--sample-seeds", nargs="+", type=int, default=[0],
                    help="detection: MonitorRunConfig.seed values (which calibration / evaluation prompts are drawn)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_monitor.json", help="JSON; a .md table beside it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        try:
            rows.append(bench(name, args.batch, args.reps))
        except Exception as e:  # a model that is not available here is reported, not fatal
            print(f"{name}: skipped ({type(e).__name__}: {e})")
    print(f"{'model':<24} {'tokens':>6} {'feats':>5} {'unhooked ms':>12} {'monitored ms':>13} {'ratio':>7}")
    for r in rows:
        print(f"{r['model']:<24} {r['tokens']:>6} {r['features']:>5} {r['plain_ms']:>12.2f} "
              f"{r['monitored_ms']:>13.2f} {r['ratio']:>6.3f}x")
    det = [row for tb in args.testbed_seeds for row in detect(tb, args.sample_seeds)]
    command = "python benchmarks/bench_monitor.py " + " ".join(sys.argv[1:])
    md = render(rows, det, command)
    print(md)
    runs.write_json(args.out, {"command": command, "torch_threads": args.threads, "overhead": rows,
                               "detection": det})
    runs.atomic_write_text(args.out.with_suffix(".md"), md)


if __name__ == "__main__":
    main()
