"""Monitor overhead: a forward pass with the refusal-circuit monitor's read-only hooks vs the same
forward unhooked, printed side by side as a ratio (goal <= 1.05x).

The monitor reads only its own features' encoder rows (k dot products per token per hooked layer) at
``clt.feature_input_hook``. Timings interleave hooked and unhooked forwards and take the minimum over
repetitions, which is the estimate least disturbed by other processes on a shared machine.

    python benchmarks/bench_monitor.py                      # testbed (if built) + SmolLM2-135M (if cached)
    python benchmarks/bench_monitor.py --models tiny smollm2-135m-instruct --batch 8 --reps 30

Measured (2 shared CPU cores, --threads 1 --batch 4 --reps 15): SmolLM2-135M 649.0 ms vs 657.6 ms, 1.013x;
testbed 6.50 vs 7.77 ms, 1.20x; tiny fixture 5.22 vs 6.55 ms, 1.25x. On the toy models the ~1.3 ms is the
fixed Python cost of the hooks, which a real model's forward amortises.

``tiny`` is the 2-layer test fixture; SmolLM2 runs with a random CLT of the right shape (the monitor's
cost does not depend on the encoder's values), 8+8+8 monitored features spread over its layers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from crafttrace import direction, monitor as M


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
    mon = M.Monitor(_features(clt.n_layers, clt.d_transcoder), clt.feature_input_hook,
                    {"harm_mean": 0.0, "harm_std": 1.0, "alpha": 0.0, "beta": 0.0, "resid_std": 1.0,
                     "threshold": 0.0})
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "testbed:0", "smollm2-135m-instruct"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
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


if __name__ == "__main__":
    main()
