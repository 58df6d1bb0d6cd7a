"""The layer-by-layer pruning pipeline: capture, the per-layer loop, and applying rules to weights."""
