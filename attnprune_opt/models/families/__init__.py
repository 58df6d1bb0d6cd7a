"""One module per model family; each registers its adapter (see models/registry.py)."""
