"""merging: adapter arithmetic and merging workbench (LoRA, LoHa, LoKr, IA³)."""

from merging.errors import MergingError

__version__ = "0.1.0"
__all__ = ["MergingError", "__version__"]
