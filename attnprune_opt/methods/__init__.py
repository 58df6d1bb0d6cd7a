"""Pruning methods, one module each; every module registers its method (see methods/base.py)."""
