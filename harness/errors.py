"""What went wrong, as a typed status and one line of text: how an exception raised while
preparing or running a kernel (or a whole network) is recorded."""

from __future__ import annotations

import kernels

from .records import Status


def status_of(exc: BaseException) -> Status:
    """The typed status of an exception raised while preparing or running a case."""
    if isinstance(exc, kernels.KernelBuildError):
        return Status.COMPILE_ERROR
    try:
        from triton.compiler.errors import CompilationError
    except ImportError:  # no triton: nothing of it can have raised
        return Status.RUNTIME_ERROR
    return Status.COMPILE_ERROR if isinstance(exc, CompilationError) else Status.RUNTIME_ERROR


def error_text(exc: BaseException) -> str:
    """The exception's type and the first line of its message, at most 500 characters."""
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return msg[:500]
