"""The thread that feeds the device runs first. A worker child's side threads (finishing, watching
progress and leases, claiming ahead, the registry watch) lower their own CPU scheduling priority,
so on a busy host the kernel lets the denoising thread run when both want a core: a denoising
loop preempted by its own bookkeeping leaves the GPU waiting for its next launch.

Linux only: there a thread's nice value is its own (``setpriority`` on its thread id); elsewhere
the same call would name a process, so nothing is done."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

SIDE_NICE = 5  # added to the process's nice value: still served whenever a core is free


def yield_to_device() -> None:
    """Lower the calling thread's priority (a side thread calls it as it starts). Never raises."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + SIDE_NICE, 19))
