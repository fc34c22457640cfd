"""Serve an LLM on a Slurm node's idle GPUs and hand them back the instant a job needs them."""

__version__ = "0.1.0"
