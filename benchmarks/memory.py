"""Peak resident memory of the current process, measured so that a parent's peak does not leak in.

``getrusage(RUSAGE_SELF).ru_maxrss`` survives ``execve`` on Linux: a process started by a benchmark that had
already grown to 1 GB reports at least 1 GB whatever it does. ``VmHWM`` in /proc/self/status belongs to the
process's own address space and starts from zero at exec.
"""

from __future__ import annotations

import resource


def peak_rss_mib(children: bool = False) -> float:
    """Peak RSS of this process (VmHWM), or the largest of it and of waited-for children (DataLoader workers)."""
    with open("/proc/self/status") as status:
        own = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    if children:
        own = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return own / 1024
