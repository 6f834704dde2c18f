"""`make bench`: every benchmark, one after the other, each measuring its variants side by side in one run.

    python benchmarks/run.py           (with a stack's python; `make bench` uses .venv/current)

- import_cost.py: the start-up hook and `import mps_shim` against a bare interpreter;
- memory_overhead.py: the shim's per-step overhead against no shim, a run that must recover from out-of-memory
  against one configured right from the start, and the memory estimate against the measured peak;
- long_runs.py: a long mixed-length run with and without the shim's padding buckets (driver-memory growth from MPS's
  graph cache, step time, tokens per second).
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("import_cost.py", "memory_overhead.py", "long_runs.py")


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"=== {name} ===", flush=True)
        if subprocess.run([sys.executable, HERE / name]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
