"""Prune experts out of Mixture-of-Experts checkpoints on disk."""

__version__ = "0.1.0"
