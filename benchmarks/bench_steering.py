"""Steered vs unsteered greedy generation: time per new token and the ratio (goal <= 1.10x).

    .venv/bin/python benchmarks/bench_steering.py [--tokens 48] [--trials 5] [--no-smollm]

Models: a random 8-layer Llama (d_model 256) and, when its converted preset is cached, SmolLM2-135M
(``crafttrace.models`` preset ``smollm2-135m-instruct``). The CLT is random (timing does not depend
on its weights). Cases: one feature at layer 0 (a CLT feature there writes to *every* layer: the
most hooks) and a bundle of 8 features spread over layers. Trials interleave steered and plain runs; we
report medians of CPU time per token (the headline: robust on a shared machine) and of wall time. One torch thread by default: on a loaded 2-core box two threads ran ~10x slower
(measured 29 ms vs 180-370 ms per token on the random model). Results go to
``benchmarks/results/bench_steering.json`` (atomic write).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from crafttrace.runs import atomic_write_text
from crafttrace.steering import FeatureSteer, steer


def random_clt(n_layers: int, d_model: int, d_t: int) -> CrossLayerTranscoder:
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(n_layers, d_t, d_model, activation_function="jump_relu", lazy_decoder=False,
                               device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        clt.W_enc.normal_(0, d_model ** -0.5)
        for w in clt.W_dec:
            w.normal_(0, 0.01)
    return clt


def time_generate(model, ids, n_tokens: int) -> tuple[float, float]:
    """(wall, CPU) seconds per new token for one greedy, KV-cached generate of exactly ``n_tokens``.

    CPU time of this process is the robust measure on a shared machine (one torch thread, so it
    counts only our work); wall time is what a user sees.
    """
    t, c = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                             min_new_tokens=n_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + n_tokens
    return (time.perf_counter() - t) / n_tokens, (time.process_time() - c) / n_tokens


def bench(name: str, model, clt, ids, n_tokens: int, trials: int) -> list[dict]:
    L = clt.n_layers
    cases = {"1 feature @ layer 0 (writes to all layers)": [FeatureSteer(0, 7, "clamp", -5.0)],
             "8 features over layers": [FeatureSteer(l * L // 8, 11 + l, "scale", 3.0) for l in range(8)]}
    time_generate(model, ids, 4)  # warm-up
    rows = []
    for case, specs in cases.items():
        plain, steered = [], []
        for _ in tqdm(range(trials), desc=f"{name}: {case}", leave=False):
            plain.append(time_generate(model, ids, n_tokens))
            with steer(model, clt, specs):
                steered.append(time_generate(model, ids, n_tokens))
        row = {"model": name, "case": case, "n_tokens": n_tokens, "trials": trials}
        for k, what in enumerate(("wall", "cpu")):
            p = statistics.median(t[k] for t in plain)
            s = statistics.median(t[k] for t in steered)
            row.update({f"plain_{what}_ms_per_token": 1e3 * p, f"steered_{what}_ms_per_token": 1e3 * s,
                        f"{what}_ratio": s / p})
        rows.append(row)
        print(f"{name:>22} | {case:<42} | CPU plain {row['plain_cpu_ms_per_token']:7.2f} ms/tok, steered "
              f"{row['steered_cpu_ms_per_token']:7.2f} -> {row['cpu_ratio']:5.3f}x | wall ratio "
              f"{row['wall_ratio']:5.3f}x", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-smollm", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_steering.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []

    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 1000, (1, 32))
    rows += bench("random Llama 8x256", tiny, random_clt(8, 256, 4096), ids, args.tokens, args.trials)

    if not args.no_smollm:
        from crafttrace.models import load_model
        try:
            loaded = load_model("smollm2-135m-instruct")
        except Exception as e:  # not cached and offline: say so and keep the small-model numbers
            print(f"SmolLM2 skipped: {e}", file=sys.stderr)
        else:
            clt = random_clt(loaded.n_layers, loaded.d_model, 256)
            ids = loaded.encode_prompt("Give me three tips for staying focused while studying.")
            rows += bench("SmolLM2-135M-Instruct", loaded.model, clt, ids, args.tokens, args.trials)

    atomic_write_text(args.out, json.dumps({"device": "cpu", "torch_threads": torch.get_num_threads(),
                                            "results": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
