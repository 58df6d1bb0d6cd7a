"""attnprune_opt: prune attention weights by optimising the softmax attention matrix."""

__version__ = "0.1.0"
