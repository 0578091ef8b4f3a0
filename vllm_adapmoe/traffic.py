"""Expert traffic time from the workers to the expert-aware scheduler, after every step.

A prompt step's cost in expert traffic is what the scheduler weighs (``engine/admission.py``),
and it is measured in the workers: the seconds their layers stalled for copies or computed on the
host (``LayerStats.stall_s + host_s``). vLLM runs the scheduler in its engine-core process and,
on CPU even for one worker, the workers in processes it spawns from there, so each worker keeps
its running total in a small shared file named by its parent's pid and its own
(``<dir>/<parent>-<pid>-<rank>.f64``), rewritten after each step (one 8-byte store); the scheduler
adds up the files of its own children, or its own (a uni-process executor). Workers elsewhere
(Ray, other machines) are not seen: the scheduler keeps the plan's prior then.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

import numpy as np

from vllm_adapmoe.engine.stats import LayerStats

DIRECTORY = Path(tempfile.gettempdir()) / "vllm-adapmoe-traffic"


class TrafficWriter:
    """Worker side: one float64, the layers' stall + host seconds so far."""

    def __init__(self, stats: list[LayerStats], rank: str) -> None:
        DIRECTORY.mkdir(parents=True, exist_ok=True)
        self.stats = stats
        self.path = DIRECTORY / f"{os.getppid()}-{os.getpid()}-{rank}.f64"
        self._value = np.memmap(self.path, dtype=np.float64, mode="w+", shape=(1,))
        atexit.register(self.path.unlink, missing_ok=True)

    def write(self) -> None:
        self._value[0] = sum(s.stall_s + s.host_s for s in self.stats)


def read_traffic_s(pid: int | None = None) -> float | None:
    """Scheduler side: the total over the workers of process ``pid`` (default: this one), its
    children's files or its own; None when it has none."""
    pid = os.getpid() if pid is None else pid
    if not DIRECTORY.is_dir():
        return None
    total, found = 0.0, False
    for path in DIRECTORY.glob("*.f64"):
        parent, child, _ = path.stem.split("-", 2)
        if str(pid) not in (parent, child):
            continue
        try:
            total += float(np.fromfile(path, dtype=np.float64, count=1)[0])
            found = True
        except (OSError, IndexError, ValueError):  # a worker just starting or gone
            continue
    return total if found else None
