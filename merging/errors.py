"""The one small error hierarchy: every user-facing failure is a MergingError."""

from __future__ import annotations


class MergingError(Exception):
    """Base class: a failure the user can act on, described in one line."""


class FormatError(MergingError):
    """A checkpoint file or folder is missing, corrupt, or not what it claims to be."""


class ShapeMismatch(MergingError):
    """A tensor does not have the shape its module or its partner tensors require."""


class IncompatibleAdapters(MergingError):
    """Adapters cannot be combined: different base models, conflicting auxiliary modules, ..."""


class UnsupportedError(MergingError):
    """A valid input that this operation or strategy cannot handle (named, never skipped silently)."""


class NonFiniteError(MergingError):
    """A tensor holds NaN or Inf values."""


class SourceError(MergingError):
    """An adapter or model source (path, Hub id, cache) cannot be resolved."""


class DeviceError(MergingError):
    """The requested device is not available."""


class NotAnAdapter(FormatError):
    """A readable tensor file in an adapter format's container that holds no adapter (a model checkpoint)."""
