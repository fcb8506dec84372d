"""Which features an ablation's ranking would pick at each ``min_activation_cv``, from a committed ranking.json.

    python benchmarks/inspect_template_features.py benchmarks/results/smollm2_safety/ablation_default_seed0_loose10/ranking.json
    python benchmarks/inspect_template_features.py RANKING.json --positions 0/362 3/466 9/74 15/168   # + the model

Reads the ``features`` rows of ``Ranking.to_json`` (every mode's top 50, with ``activation_cv``) and prints each
mode's first eligible feature at each threshold; a filtered ranking is the same order with the low-cv rows left out,
so no model is run. ``--positions`` loads the built realbed (tuned model + CLT) and prints, for each feature, where
its activation peaks (position and token) on the first two HarmBench and AlpacaEval prompts: a feature peaking on a
chat-template token with the same value on every prompt reads the template, not the request.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crafttrace.ranking import MODES

GRID = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.25, 0.26, 0.27, 0.3)


def picks(ranking: dict, thresholds=GRID) -> dict[float, dict[str, tuple[int, int, float] | None]]:
    """threshold -> mode -> (layer, index, activation_cv) of the first eligible feature with cv >= threshold."""
    rows = [r for r in ranking["features"] if r["eligible"]]
    if rows and "activation_cv" not in rows[0]:
        raise SystemExit("this ranking.json predates activation_cv (session 16); rerun the ablation")
    out = {}
    for t in thresholds:
        out[t] = {}
        for m in MODES:
            c = sorted((r for r in rows if r["activation_cv"] >= t and r[f"rank_{m}"] is not None),
                       key=lambda r: r[f"rank_{m}"])
            out[t][m] = (c[0]["layer"], c[0]["index"], round(c[0]["activation_cv"], 3)) if c else None
    return out


def positions(features: list[tuple[int, int]]) -> None:
    import torch

    from crafttrace import data, realbed
    from crafttrace.hooks import capture
    from crafttrace.transcoders import load_transcoder
    src = realbed.default_dir()
    bed = realbed.read_status(src, needs=("sft", "clt"))
    loaded = realbed._Context(bed.config, src, progress=False).tuned()
    clt = load_transcoder(src / "clt" / "transcoder")
    layers = sorted({layer for layer, _ in features})
    for p in data.prompts("harmbench")[:2] + data.prompts("alpaca_eval")[:2]:
        ids = loaded.tokenizer(loaded.format_prompt(p), return_tensors="pt").input_ids
        toks = loaded.tokenizer.convert_ids_to_tokens(ids[0])
        cells = []
        with capture(loaded.model, clt.feature_input_hook, layers) as store, torch.no_grad():
            loaded.model(ids)
            for layer, f in features:   # position 0 is left out, as in ranking.max_activations
                a = clt.encode_layer(store[layer][0, 1:].to(clt.dtype), layer).float()[:, f]
                j = int(a.argmax()) + 1
                cells.append(f"L{layer}/{f} max {float(a.max()):.2f} at {j}/{len(toks)} {toks[j]!r}")
        print(f"{p[:40]!r}: " + "; ".join(cells))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ranking", type=Path)
    ap.add_argument("--positions", nargs="*", default=[], help="LAYER/INDEX features to locate in the prompts")
    args = ap.parse_args(argv)
    res = picks(json.loads(args.ranking.read_text()))
    for t, by_mode in res.items():
        print(f"min_activation_cv {t}: " + "; ".join(f"{m} {v}" for m, v in by_mode.items()))
    if args.positions:
        positions([tuple(int(x) for x in s.split("/")) for s in args.positions])
    return res


if __name__ == "__main__":
    main()
