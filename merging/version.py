"""The package version, at the bottom of the house so that any layer may record it."""

__version__ = "0.1.0"
