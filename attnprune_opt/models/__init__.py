"""Model-specific knowledge: loading models and the architecture adapters."""
