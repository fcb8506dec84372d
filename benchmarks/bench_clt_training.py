"""CLT training throughput: sparse decode vs the dense reference, same CLT size, same data, same init.

Both paths train the same number of steps on identical batches of activations collected once (collection is
timed separately: it is the same model forward for both). Reported per mode: optimisation tokens/s (median step
time), NMSE of the in-memory model and of the exported circuit-tracer JumpReLU CLT on held-out tokens, and L0.

    .venv/bin/python benchmarks/bench_clt_training.py                       # random 12-layer Llama, d 256
    .venv/bin/python benchmarks/bench_clt_training.py --model smollm2-135m-instruct --steps 6 --threads 1

``--model random`` runs a randomly initialised Llama (``--layers``, ``--d-model``) on the text corpus with a
byte-level tokenizer, so it needs nothing but the corpus; any other value goes to ``crafttrace.models.load_model``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from crafttrace.runs import write_json
from crafttrace.training import (
    ActivationStream, CLTTrainConfig, _Trainer, calibrate_topk_thresholds, evaluate_clt, read_texts,
    to_circuit_tracer,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CRAFTTRACE_DATA", ROOT.parent / "shared" / "data"))


class ByteTokenizer:
    """Bytes as token ids (+3), BOS = 1: enough for a random model, no vocabulary files needed."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [b + 3 for b in text.encode("utf-8")]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def random_llama(layers: int, d_model: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=259, hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=layers,
                      num_attention_heads=max(1, d_model // 64), num_key_value_heads=max(1, d_model // 64),
                      max_position_embeddings=2048)
    cfg.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(cfg).eval(), ByteTokenizer()


def run_mode(name: str, cfg: CLTTrainConfig, L: int, d: int, x: torch.Tensor, y: torch.Tensor,
             x_eval: torch.Tensor, y_eval: torch.Tensor, steps: int, warmup: int) -> dict:
    trainer = _Trainer(L, d, cfg)
    trainer.initialise_from(x, y)
    B = cfg.batch_tokens
    times = []
    for s in tqdm(range(steps), desc=name, unit="step"):
        t0 = time.perf_counter()
        info = trainer.train_step(x[s * B:(s + 1) * B], y[s * B:(s + 1) * B])
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    with torch.no_grad():
        _, ev = trainer.clt.loss(x_eval / trainer.in_scale[:, None], y_eval / trainer.out_scale[:, None], 0.0,
                                 sparse=True)
        if cfg.activation == "topk":
            theta = calibrate_topk_thresholds(trainer.clt, x[:8192] / trainer.in_scale[:, None])
        else:
            theta = trainer.clt.log_threshold.exp()
    exported = evaluate_clt(to_circuit_tracer(trainer.clt, trainer.in_scale, trainer.out_scale, theta, cfg),
                            x_eval, y_eval)
    step_s = statistics.median(times)
    return {"mode": name, "tokens_per_s": B / step_s, "median_step_s": step_s, "timed_steps": len(times),
            "final_train_loss": info["loss"], "nmse_model": ev["nmse"], "l0_model": ev["l0"],
            "nmse_exported_jumprelu": exported["nmse_mean"], "l0_exported": exported["l0_mean"],
            "dead_fraction_exported": exported["dead_fraction"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--texts", default=str(DATA / "text" / "corpus.jsonl"))
    p.add_argument("--d-transcoder", type=int, default=512)
    p.add_argument("--activation", choices=["topk", "jumprelu"], default="topk")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--sparsity-coef", type=float, default=None, help="JumpReLU lambda (default: trainer default)")
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="steps trained but not timed")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--modes", default="sparse,dense", help="comma list of sparse, sparse_adam, dense")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default). On a shared, "
                   "oversubscribed machine 1 thread avoids OpenMP spin-waits and gives steadier ratios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "clt_training.json"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.steps <= a.warmup:
        p.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup})")

    if a.model == "random":
        model, tok = random_llama(a.layers, a.d_model, a.seed)
    else:
        from crafttrace.models import load_model
        loaded = load_model(a.model)
        model, tok = loaded.model, loaded.tokenizer
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    extra = {} if a.sparsity_coef is None else {"sparsity_coef": a.sparsity_coef}
    base = dict(d_transcoder=a.d_transcoder, activation=a.activation, k=a.k, batch_tokens=a.batch_tokens,
                chunk_tokens=a.batch_tokens * a.steps, total_tokens=a.batch_tokens * a.steps, lr=a.lr,
                lr_warmup_steps=max(1, a.steps // 10), eval_tokens=a.eval_tokens, seed=a.seed,
                threshold_init_l0=float(a.k), preact_coef=0.0, **extra)

    texts = read_texts(a.texts)
    stream = ActivationStream(model, tok, texts, CLTTrainConfig(**base))
    t0 = time.perf_counter()
    _, x, y = next(stream.chunks(0))
    collect_s = time.perf_counter() - t0
    x_eval, y_eval = stream.eval_set()
    print(f"model {a.model}: {L} layers, d_model {d}; CLT {a.d_transcoder} features/layer, {a.activation}"
          f"{' k=' + str(a.k) if a.activation == 'topk' else ''}; batch {a.batch_tokens} tokens; "
          f"{a.steps} steps ({a.warmup} untimed); torch threads {torch.get_num_threads()}")
    print(f"activation collection: {len(x) / collect_s:.0f} tok/s")

    modes = {"sparse": dict(sparse_decode=True, sparse_adam=False),
             "sparse_adam": dict(sparse_decode=True, sparse_adam=True),
             "dense": dict(sparse_decode=False, sparse_adam=False)}
    results = []
    for name in a.modes.split(","):
        if name not in modes:
            p.error(f"unknown mode {name!r}; choose from {sorted(modes)}")
        results.append(run_mode(name, CLTTrainConfig(**base, **modes[name]), L, d, x, y, x_eval, y_eval,
                                a.steps, a.warmup))

    cols = ["tokens_per_s", "median_step_s", "nmse_model", "nmse_exported_jumprelu", "l0_model", "l0_exported"]
    print(f"\n{'mode':12s}" + "".join(f"{c:>24s}" for c in cols))
    for r in results:
        print(f"{r['mode']:12s}" + "".join(f"{r[c]:24.4f}" for c in cols))
    by = {r["mode"]: r for r in results}
    summary = {"model": a.model, "n_layers": L, "d_model": d, "args": vars(a), "collect_tokens_per_s": len(x) / collect_s,
               "threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(), "results": results}
    if "dense" in by:
        for name in by:
            if name != "dense":
                ratio = by[name]["tokens_per_s"] / by["dense"]["tokens_per_s"]
                summary[f"speedup_{name}_vs_dense"] = ratio
                print(f"{name} / dense throughput: {ratio:.2f}x  (NMSE {by[name]['nmse_model']:.4f} vs "
                      f"{by['dense']['nmse_model']:.4f})")
    print(f"load average: {os.getloadavg()}")
    write_json(a.out, summary)
    print(f"wrote {a.out}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
