"""Wall time of `crafttrace demo` on the embedded testbed (goal: within 60 s on 2 CPU cores).

    python benchmarks/bench_demo.py            # runs the demo twice: cold (fresh run dir) and warm (cached graphs)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main():
    out = Path(tempfile.mkdtemp()) / "demo"
    times = []
    for label in ("cold", "warm (graphs cached)"):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "crafttrace.cli", "demo", "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
        print(f"crafttrace demo, {label}: {times[-1]:.1f} s")
    print(f"goal 60 s: cold run {'meets' if times[0] <= 60 else 'misses'} it ({times[0] / 60:.2f}x of budget)")
    shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
