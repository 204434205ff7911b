"""Processes and their listening sockets, read from /proc (Linux): what a test needs to check
that a command's workers ended and that its Ray processes listen on loopback only."""

import ipaddress
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def reaped(proc):
    """Run the block with ``proc`` started; whatever happens in it, ``proc`` is not left
    running afterwards."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


def stop(proc, sig, timeout: float) -> tuple[str, str]:
    """Send ``sig`` and wait for ``proc`` to end: its (stdout, stderr)."""
    proc.send_signal(sig)
    return proc.communicate(timeout=timeout)


def wait_gone(pids, limit=15.0) -> list[int]:
    """The processes of ``pids`` still alive after up to ``limit`` seconds."""
    t_end = time.time() + limit
    while time.time() < t_end and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def _address(hexaddr: str, v6: bool) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if v6:  # four host-order 32-bit words
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)


def listening(pids) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket the processes ``pids`` listen on."""
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in owner:  # 0A: LISTEN
                try:
                    name = Path(f"/proc/{owner[f[9]]}/comm").read_text().strip()
                except OSError:
                    name = "?"
                out.append((*_address(f[1], v6), name))
    return sorted(set(out))


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def slow_serve(conn, parent_pid=None):
    """The worker's serving loop after a 3 s start-up (a busy machine's interpreter and torch
    import), to run as a worker process's target."""
    time.sleep(3)
    from harness.worker import serve
    serve(conn, parent_pid)
