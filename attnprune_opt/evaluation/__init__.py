"""Evaluation of (pruned) models, offline on the local data copies."""
