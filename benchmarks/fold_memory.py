"""What a fold keeps beside the model: ``merge_into`` (an undo copy of each weight it changes) against
``fold_into`` (a bake's fold: none).

On the bundled example (the ``add`` LoRA on q_proj and v_proj, SmolLM2-135M in float32), each fold runs
``--repeats`` times, interleaved, in a fresh process that loads the base, resets its peak RSS (Linux's
/proc/self/clear_refs), folds, and reads how far VmHWM rose above the RSS before the fold::

    python -m benchmarks.fold_memory [--repeats 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

FOLDS = ("merge_into", "fold_into")


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key))
    return int(line.split()[1]) * 1024


def child(fold: str) -> None:
    """Load the example base, fold the add LoRA with ``fold``, print the peak RSS growth in bytes."""
    from merging.base.example_model import example_base_model
    from merging.base.load import load_base
    from merging.formats import sources
    from merging.runtime import fold as folds

    base = example_base_model()
    model = load_base(base, "cpu", "float32")[0]
    pairs = sources.load_inputs(["examples/adapters/add"], base=base)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM reset to the current RSS
    start = _status("VmRSS:")
    getattr(folds, fold)(model, pairs)
    print(_status("VmHWM:") - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=FOLDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    for _ in range(args.repeats):
        for fold in FOLDS:
            run = subprocess.run([sys.executable, "-m", "benchmarks.fold_memory", "--child", fold],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            print(f"{fold}: peak RSS growth {int(run.stdout.split()[-1]) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
