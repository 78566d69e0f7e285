"""Base models with and without weights: layout, loading, diffusers pipelines, tied weights."""
