"""The merge pipeline: align inputs, run a strategy module by module, recipe, serving layout."""
