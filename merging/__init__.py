"""merging: adapter arithmetic and merging workbench (LoRA, LoHa, LoKr, IA³)."""

from merging.errors import MergingError
from merging.version import __version__

__all__ = ["MergingError", "__version__"]
