"""The console script: settle torch's threads before anything imports torch, then run the commands."""

from __future__ import annotations

import sys


def main() -> None:
    """``merging``: the threading environment first (``merging.settle_threads``), then the click group."""
    import merging

    merging.settle_threads(sys.argv[1:])
    from .main import main as run

    run()
