"""Ground-truth synthetic testbed: a small Llama trained from scratch on a chat language whose
refusal rule is known (``language.HARM_TABLE``), plus its cross-layer transcoder.

    loaded, clt = load_testbed()        # the committed seed-0 artifact in transcoders/testbed/
    loaded, clt = load_testbed(seed=3)  # other seeds: built once into the cache, then loaded

See ``transcoders/testbed/README.md`` for the generating process and the expected mechanism.
"""

from __future__ import annotations

import sys
from pathlib import Path

from crafttrace.testbed.build import TestbedConfig, build_testbed
from crafttrace.testbed.language import COMPLIANCE_OPENER, EOS, REFUSAL_OPENER, capability_items, pool, score_capability

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "transcoders" / "testbed"


def default_dir(seed: int) -> Path:
    """Seed 0: the committed artifact; other seeds: ``<crafttrace cache>/testbed/seed-<N>``."""
    if seed == 0:
        return SHIPPED_DIR
    from crafttrace.data import cache_dir
    return cache_dir() / "testbed" / f"seed-{seed}"


def load_testbed(seed: int = 0, device: str = "cpu", build_if_missing: bool = True):
    """(LoadedModel, CrossLayerTranscoder) for ``seed``; builds it first when absent (with a message)."""
    from crafttrace.models import load_model
    from crafttrace.transcoders import load_transcoder

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"testbed seed must be a non-negative int, got {seed!r}")
    d = default_dir(seed)
    if not (d / "metrics.json").exists():
        if not build_if_missing:
            raise FileNotFoundError(f"no testbed for seed {seed} at {d} (metrics.json missing); "
                                    f"build it with `crafttrace testbed build --seed {seed}`")
        print(f"testbed seed {seed} not found at {d}; building it (about 10 minutes on 2 CPU cores)",
              file=sys.stderr)
        build_testbed(seed, d)
    loaded = load_model(d / "model", device=device)
    loaded.name = f"testbed-seed{seed}"
    return loaded, load_transcoder(d / "clt", device=device)


__all__ = ["load_testbed", "build_testbed", "default_dir", "TestbedConfig", "pool", "capability_items",
           "score_capability", "REFUSAL_OPENER", "COMPLIANCE_OPENER", "EOS", "SHIPPED_DIR"]
