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
import time
from pathlib import Path

import numpy as np

from vllm_adapmoe.engine.stats import LayerStats

DIRECTORY = Path(tempfile.gettempdir()) / "vllm-adapmoe-traffic"


class TrafficWriter:
    """Worker side: one float64, the layers' stall + host seconds so far."""

    def __init__(self, stats: list[LayerStats], rank: str) -> None:
        DIRECTORY.mkdir(parents=True, exist_ok=True)
        _remove_stale()
        self.stats = stats
        self.path = DIRECTORY / f"{os.getppid()}-{os.getpid()}-{rank}.f64"
        self._value = np.memmap(self.path, dtype=np.float64, mode="w+", shape=(1,))
        atexit.register(self.path.unlink, missing_ok=True)

    def write(self) -> None:
        self._value[0] = sum(s.traffic_s for s in self.stats)


class TrafficReader:
    """Scheduler side: the total over the workers of this process (its children's files, or its
    own with a uni-process executor). The files are found once (workers start before vLLM builds
    the scheduler); while none is found, looked for again at most once a second."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = str(os.getpid() if pid is None else pid)
        self._values: list[np.ndarray] = []
        self._looked = float("-inf")

    def seconds(self) -> float | None:
        """None while no worker's file was found."""
        if not self._values and time.monotonic() - self._looked >= 1.0:
            self._looked = time.monotonic()
            self._values = [np.memmap(path, dtype=np.float64, mode="r", shape=(1,))
                            for path in _files() if self.pid in path.stem.split("-")[:2]]
        if not self._values:
            return None
        return float(sum(v[0] for v in self._values))


def _files() -> list[Path]:
    return list(DIRECTORY.glob("*.f64")) if DIRECTORY.is_dir() else []


def _remove_stale() -> None:
    """Files of workers that died without cleaning up (killed): neither pid alive."""
    for path in _files():
        try:
            parent, child = (int(p) for p in path.stem.split("-")[:2])
        except ValueError:
            continue
        if not (_alive(parent) or _alive(child)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
