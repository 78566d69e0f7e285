"""The maths and the in-memory model of an adapter: deltas, their algebra, DoRA/aLoRA semantics."""
