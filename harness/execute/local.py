"""The executor of this machine: one node, in this process, over one worker process."""

from __future__ import annotations

from ..interrupts import Stop
from .base import DECLINE, Executor, NodeInfo
from .node import Node


class LocalExecutor(Executor):
    def __init__(self, timing, case_timeout: float, init_timeout: float = 1800.0):
        self.node = Node(timing, case_timeout, init_timeout)
        self.info = self.node.info()

    def infos(self) -> list[NodeInfo]:
        return [self.info]

    def run(self, jobs, call, done, lost=None) -> list:
        unrun = []
        try:
            with Stop() as stop:
                for job in jobs:
                    if stop.requested:
                        unrun.append(job)
                        continue
                    spec = call(self.info, job)
                    if spec is None:
                        continue
                    if spec is DECLINE:  # no other node to take it
                        if lost is not None:
                            lost(self.info, job)
                        continue
                    method, args = spec
                    items = getattr(self.node, method)(*args)
                    for item in items:
                        done(self.info, job, item)
                        if stop.requested:  # the rest of this job is not run
                            items.close()
                            unrun.append(job)
                            break
        except BaseException:  # SIGTERM, a second Ctrl-C: the item in flight is abandoned
            self.node.abandon()
            raise
        return unrun

    def close(self) -> None:
        self.node.close()
