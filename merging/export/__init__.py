"""Bake into full models, publish to the Hub, plots."""
