"""Benchmark and autotuning harness for sparse convolution kernels."""

__version__ = "0.1.0"


class UsageError(Exception):
    """Bad user input: the CLI prints the message as one line and exits with code 2."""
