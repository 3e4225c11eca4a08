"""How long `sparq --help` and `import sparq` take, in fresh processes; writes JSON under benchmarks/results/.

    PYTHONPATH=src python benchmarks/cli_startup.py [--runs 5] [--out benchmarks/results]

Each measurement is a new Python process (nothing cached in the interpreter; the OS file cache
is warm after the first run, as for a user who runs the command twice). Reported: every run's
wall time and the median. The target (issue 16) is `sparq --help` under 2 s; before the lazy
imports it took 5.5-6 s on a 2-core machine (10-19 s on a busy one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

CASES = {
    # what the console script runs (sparq.__main__ imports sparq.tools.cli); `-m sparq.tools.cli` also works on old versions
    "sparq --help": [sys.executable, "-m", "sparq.tools.cli", "--help"],
    "sparq generate --help": [sys.executable, "-m", "sparq.tools.cli", "generate", "--help"],
    "import sparq": [sys.executable, "-c", "import sparq"],
    "import sparq; sparq.SparQConfig": [sys.executable, "-c", "import sparq; sparq.SparQConfig(r=8, k=64)"],
    "import torch (for scale)": [sys.executable, "-c", "import torch"],
}


def time_once(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    import sparq

    results = {}
    for name, cmd in CASES.items():
        time_once(cmd)  # warm the file cache
        runs = [time_once(cmd) for _ in range(args.runs)]
        results[name] = {"median_s": round(statistics.median(runs), 3), "runs_s": [round(t, 3) for t in runs]}
        print(f"{name:36s} median {results[name]['median_s']:.2f} s  ({', '.join(f'{t:.2f}' for t in runs)})")
    try:
        load = os.getloadavg()
    except (AttributeError, OSError):
        load = None
    report = {
        "benchmark": "cli_startup",
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sparq": sparq.__version__,
        "sparq_path": str(Path(sparq.__file__).parent),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": load,
        "runs": args.runs,
        "results": results,
        "target": "sparq --help under 2 s",
        "meets_target": results["sparq --help"]["median_s"] < 2.0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cli-startup-{report['when'].replace(':', '')}.json"
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
