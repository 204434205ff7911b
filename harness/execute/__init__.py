"""How commands run their work: one executor interface, two implementations.

An executor runs jobs on nodes. A node (``node.Node``) is one machine's worker process with the
kernels built for it; its methods (``run_group``, ``run_e2e``, ``race``, ``tune_layer``) are the
only work a command sends. ``LocalExecutor`` holds one node in this process; ``RayExecutor``
(``harness.execute.ray``) holds one per machine of a Ray cluster, as actors. The drivers in
``harness.drivers`` (one per command: sweep, tune, e2e, confirm) take either and never ask which:
resume, storing results as they arrive, the progress bar, Ctrl-C and lost nodes are written
once, here and there.
"""

from .base import DECLINE, Executor, NodeInfo
from .local import LocalExecutor

__all__ = ["DECLINE", "Executor", "NodeInfo", "LocalExecutor", "make", "check"]


def check(kind: str, address=None) -> None:
    """Refuse, before a run is recorded, an executor this machine cannot use (Ray missing)."""
    if kind == "ray":
        from .ray import require_ray

        require_ray(address)


def make(kind: str, timing, case_timeout: float, *, address=None, gpus: bool = False) -> Executor:
    """The executor ``--executor`` names: 'local' (this machine) or 'ray' (a Ray cluster at
    ``address``, or a local instance)."""
    if kind == "ray":
        from .ray import RayExecutor

        return RayExecutor(timing, case_timeout, address=address, gpus=gpus)
    return LocalExecutor(timing, case_timeout)
