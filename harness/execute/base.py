"""The executor interface every command's driver runs its jobs through."""

from __future__ import annotations

from dataclasses import dataclass


class _Decline:
    def __repr__(self):
        return "DECLINE"


# What ``call(info, job)`` returns for a job this node must not run (another kind of machine):
# another node may take it. None instead means the job needs no run at all (already stored).
DECLINE = _Decline()


@dataclass(frozen=True)
class NodeInfo:
    """One node a job may run on: its fingerprint and the hashes rows are stored under, and its
    label in the store's ``node`` column (the hostname, or ``ray:<node id>``)."""

    fingerprint: dict
    identity: str
    machine: str
    node: str | None
    node_id: str | None = None  # Ray's node id; None on this machine

    @property
    def short(self) -> str:
        """The node as a log line names it."""
        return (self.node_id or self.node or "local")[:8]


class Executor:
    """Runs jobs on nodes (see ``harness.execute``). A job is opaque to the executor:
    ``call(info, job)`` says what to run for it on the node ``info`` describes, as a node method
    name and its arguments, None where the job needs no run (it is dropped), or ``DECLINE``
    where this node must not run it (another node may); ``done(info, job, item)`` takes each
    item the method yields (locally as it is yielded, from a Ray node when the job ends); a
    job whose node died and that no other node could take, or that every node declined, is
    given to ``lost(info, job)`` (``info``: the last node that had it).

    ``run`` returns the jobs not started or not finished because of a first Ctrl-C (the item in
    flight finishes, nothing new starts); a second Ctrl-C, SIGTERM or an error abandons what is
    in flight (its worker is killed) and is raised."""

    multinode = False  # whether jobs may run on more than one machine

    def infos(self) -> list[NodeInfo]:
        raise NotImplementedError

    def run(self, jobs, call, done, lost=None) -> list:
        raise NotImplementedError

    def close(self) -> None:
        """End the nodes (their worker processes, Ray actors)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
