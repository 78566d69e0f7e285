"""Adapters on a live torch model: stacked layers, folding, grouped candidates."""
