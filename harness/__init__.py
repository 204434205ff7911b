"""Benchmark and autotuning harness for sparse convolution kernels."""

__version__ = "0.1.0"


class UsageError(Exception):
    """Bad user input: the CLI prints the message as one line and exits with code 2."""


def sparsify(model, pattern, sparsity, plan=None, device="cpu", **kw):
    """A copy of ``model`` whose convolutions run the harness's sparse kernels (BN folded);
    see :func:`harness.sparse_model.sparsify`."""
    from .sparse_model import sparsify as _sparsify

    return _sparsify(model, pattern, sparsity, plan=plan, device=device, **kw)
