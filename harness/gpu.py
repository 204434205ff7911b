"""What NVML says about the GPU while a case runs: its clocks and the other processes on it.

A GPU row records the SM and memory clocks at the start and the end of its timing (a GPU that
idled or throttled shows it there) and every process NVML lists on the device meanwhile other
than this one and its parent (the lease or sweep driver), so a figure measured beside someone
else's work can be told apart. Without NVML (no driver, the interpreter's pipeline check) every
answer is None: the columns are nullable.
"""

from __future__ import annotations

import json
import os


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - no driver, no library: nothing to record
        return None


def _handle(nv, index: int | None = None):
    if index is None:
        try:
            import torch

            index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001
            index = 0
    return nv.nvmlDeviceGetHandleByIndex(index)


def clocks(index: int | None = None) -> dict | None:
    """Current and maximum SM and memory clocks (MHz), temperature (C) and power (W)."""
    nv = _nvml()
    if nv is None:
        return None
    try:
        h = _handle(nv, index)
        out = {"sm_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
               "mem_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
               "sm_max_mhz": nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM),
               "mem_max_mhz": nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)}
        for key, call, scale in (("temp_c", lambda: nv.nvmlDeviceGetTemperature(
                h, nv.NVML_TEMPERATURE_GPU), 1), ("power_w", lambda: nv.nvmlDeviceGetPowerUsage(h),
                                                  1e-3)):
            try:
                out[key] = round(call() * scale, 1)
            except Exception:  # noqa: BLE001 - not every GPU or runtime reports these
                out[key] = None
        return out
    except Exception:  # noqa: BLE001
        return None
    finally:
        _shutdown(nv)


def processes(index: int | None = None) -> list[dict] | None:
    """Every process NVML lists on the device: ``{"pid", "used_mib"}``."""
    nv = _nvml()
    if nv is None:
        return None
    try:
        h = _handle(nv, index)
        seen = {}
        for call in (nv.nvmlDeviceGetComputeRunningProcesses,
                     nv.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                for p in call(h):
                    used = getattr(p, "usedGpuMemory", None)
                    seen[int(p.pid)] = None if used is None else round(used / 2**20)
            except Exception:  # noqa: BLE001
                continue
        return [{"pid": pid, "used_mib": mib} for pid, mib in sorted(seen.items())]
    except Exception:  # noqa: BLE001
        return None
    finally:
        _shutdown(nv)


def _shutdown(nv) -> None:
    try:
        nv.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass


def others(procs: list[dict] | None, mine=None) -> list[dict] | None:
    """The processes that are neither this one nor its parent."""
    if procs is None:
        return None
    mine = set(mine) if mine is not None else {os.getpid(), os.getppid()}
    return [p for p in procs if p["pid"] not in mine]


class Watch:
    """Clocks and other processes at the start and the end of a timed region:
    ``Watch()`` ... ``watch.finish()`` -> ``{"gpu_clocks": JSON, "gpu_others": JSON}``
    (None where NVML is not there)."""

    def __init__(self, index: int | None = None):
        self.index = index
        self.start = clocks(index)
        self.procs_start = processes(index)

    def finish(self) -> dict:
        end = clocks(self.index)
        procs_end = processes(self.index)
        if self.start is None and end is None:
            return {"gpu_clocks": None, "gpu_others": None}
        both = [c for c in (self.start, end) if c]
        record = {k: [c.get(k) for c in both] for k in ("sm_mhz", "mem_mhz", "temp_c",
                                                          "power_w")}
        record.update(sm_max_mhz=both[0]["sm_max_mhz"], mem_max_mhz=both[0]["mem_max_mhz"])
        seen = {}
        for p in (others(self.procs_start) or []) + (others(procs_end) or []):
            seen[p["pid"]] = p
        own = {p["pid"] for p in (self.procs_start or []) + (procs_end or [])}
        record_others = {"others": list(seen.values()),
                         # in a container NVML may list host process ids: then this process is
                         # not recognised and counts among the others
                         "self_listed": os.getpid() in own}
        return {"gpu_clocks": json.dumps(record), "gpu_others": json.dumps(record_others)}


def cudnn_version() -> str | None:
    """cuDNN's version as torch reports it (None without CUDA): part of a GPU row's key."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        v = torch.backends.cudnn.version()
        return str(v) if v else None
    except Exception:  # noqa: BLE001
        return None
