"""The public API's implementation, one module per room; ``import merging`` exposes it lazily."""
