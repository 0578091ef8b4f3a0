"""The engine's per-layer counters on the API server's ``/metrics`` (see README "Serving").

The counters live in vLLM's worker processes; ``/metrics`` is answered by the API server. Two ways
across, chosen per worker at start-up:

* **Snapshots (the default, nothing to set up).** A process vLLM did not spawn (the one running
  ``vllm serve``, or a script holding an ``LLM``) owns a small directory and registers
  ``SnapshotCollector`` in prometheus_client's default registry, the one vLLM's ``/metrics``
  serves next to its own ``vllm:`` metrics. Each worker finds the directory of its nearest such
  ancestor and rewrites one JSON file there from a background thread (``SnapshotWriter``), so the
  decode path pays nothing; ``/metrics`` lags the engine by at most ``FLUSH_S``.
* **Prometheus multiprocess mode**, when ``PROMETHEUS_MULTIPROC_DIR`` is set (by the user, or by
  vLLM itself for ``--api-server-count`` > 1, where each API server builds a multiprocess
  registry): every worker increments real ``Counter`` objects after each step. We never switch
  modes ourselves: doing so after prometheus_client is imported would drop vLLM's own metrics.

Either way the samples are ``adapmoe_<name>_total{layer="N"}``, monotonic (``reset_stats`` zeroes
the snapshot ``stats()`` returns, never these), and tensor-parallel ranks count once (rank 0's, as
``stats()`` reports them); several engines under one owner (data-parallel replicas) add up.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

from vllm_adapmoe.engine.stats import LayerStats

logger = logging.getLogger("vllm.adapmoe")

NAMES: tuple[str, ...] = tuple(f.name for f in fields(LayerStats))
FLUSH_S = 0.25                       # snapshot period: how far /metrics may lag the engine
_BASE = Path(tempfile.gettempdir()) / "vllm-adapmoe-metrics"
_COUNTERS: dict[str, object] = {}    # multiprocess mode: one registration per process
SCHEDULER_PREFIX = "scheduler-"      # the expert-aware scheduler's file among the snapshots
_OWNER: Path | None = None           # this process's snapshot directory, when it owns one


class CounterMirror:
    """Turns the resettable ``LayerStats`` into monotonic totals: each ``poll`` adds what every
    counter gained since the last one (a counter that went down was reset: all of it is new)."""

    def __init__(self, stats: list[LayerStats]) -> None:
        self.stats = stats
        self._last = [self._read(s) for s in stats]
        self.totals = [[0.0] * len(NAMES) for _ in stats]

    @staticmethod
    def _read(stats: LayerStats) -> list[float]:
        return [getattr(stats, name) for name in NAMES]

    def poll(self) -> list[tuple[int, str, float]]:
        """``(layer position, counter name, increase)`` for every counter that moved."""
        moved = []
        for i, (st, last) in enumerate(zip(self.stats, self._last)):
            now = self._read(st)
            for j, (a, b) in enumerate(zip(now, last)):
                delta = a - b if a >= b else a
                if delta > 0:
                    self.totals[i][j] += delta
                    moved.append((i, NAMES[j], delta))
            self._last[i] = now
        return moved


class PrometheusExporter:
    """Multiprocess mode: mirrors the counters into prometheus_client ``Counter`` objects after
    each step (their values reach the API server through ``PROMETHEUS_MULTIPROC_DIR``)."""

    def __init__(self, stats: list[LayerStats], layers: list[int]) -> None:
        from prometheus_client import Counter

        self.mirror = CounterMirror(stats)
        self.layers = [str(i) for i in layers]
        for name in NAMES:
            if name not in _COUNTERS:
                _COUNTERS[name] = Counter(f"adapmoe_{name}", f"AdapMoE {name} per MoE layer",
                                          ["layer"])
            for layer in self.layers:  # every layer on /metrics from the start, at 0
                _COUNTERS[name].labels(layer=layer)

    def sync(self) -> None:
        for i, name, delta in self.mirror.poll():
            _COUNTERS[name].labels(layer=self.layers[i]).inc(delta)


class SnapshotWriter:
    """Snapshot mode, worker side: a daemon thread rewrites ``<owner dir>/<pid>-<n>.json`` (the
    totals of this engine's layers) every ``FLUSH_S`` when something moved, atomically."""

    _count = 0

    def __init__(self, stats: list[LayerStats], layers: list[int], tp_rank: int,
                 directory: Path) -> None:
        SnapshotWriter._count += 1
        self.path = directory / f"{os.getpid()}-{SnapshotWriter._count}.json"
        self.mirror = CounterMirror(stats)
        self.layers = layers
        self.tp_rank = tp_rank
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.flush(force=True)
        self._thread = threading.Thread(target=self._run, name="adapmoe-metrics", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self.flush()

    def flush(self, force: bool = False) -> None:
        """Write the totals now (also called before ``reset_stats`` so nothing is lost)."""
        with self._lock:
            if not self.mirror.poll() and not force:
                return
            body = {"tp_rank": self.tp_rank, "names": list(NAMES),
                    "layers": {str(layer): totals
                               for layer, totals in zip(self.layers, self.mirror.totals)}}
            if not _write_atomically(self.path, body):  # the owner went away: nothing to serve
                self._stop.set()

    def close(self) -> None:
        if not self._stop.is_set():
            self.flush()
            self._stop.set()


class SnapshotCollector:
    """Snapshot mode, owner side: a prometheus_client collector that reads the workers' files at
    scrape time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def totals(self) -> dict[str, dict[str, float]]:
        """``{layer: {name: total}}`` over this owner's engines, tensor-parallel rank 0 only."""
        out: dict[str, dict[str, float]] = {}
        for path in sorted(self.directory.glob("*.json")):
            if path.name.startswith(SCHEDULER_PREFIX):
                continue
            try:
                body = json.loads(path.read_text())
            except (OSError, ValueError):  # replaced or removed while we read: next scrape
                continue
            if body.get("tp_rank", 0) != 0:
                continue
            for layer, values in body["layers"].items():
                acc = out.setdefault(layer, dict.fromkeys(body["names"], 0.0))
                for name, value in zip(body["names"], values):
                    acc[name] = acc.get(name, 0.0) + value
        return out

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily

        totals = self.totals()
        layers = sorted(totals, key=int)
        for name in NAMES:
            family = CounterMetricFamily(f"adapmoe_{name}", f"AdapMoE {name} per MoE layer",
                                         labels=["layer"])
            for layer in layers:
                family.add_metric([layer], totals[layer].get(name, 0.0))
            yield family
        from prometheus_client.core import GaugeMetricFamily

        for name, value in scheduler_totals(self.directory).items():
            yield GaugeMetricFamily(f"adapmoe_scheduler_{name}",
                                    f"AdapMoE expert-aware scheduler: {name}", value=value)


class SchedulerReport:
    """The expert-aware scheduler's counters, written where the layers' snapshots go (the engine
    core process writes; ``scheduler_totals`` reads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = float("-inf")

    @classmethod
    def for_this_process(cls) -> SchedulerReport | None:
        directory = _nearest_owner()
        return None if directory is None else cls(directory / f"{SCHEDULER_PREFIX}{os.getpid()}.json")

    def publish(self, stats: object, force: bool = False) -> None:
        """At most every ``FLUSH_S``; ``force`` when the scheduler runs out of requests, so a
        finished batch's counters are on disk before its outputs reach the caller."""
        now = time.monotonic()
        if not force and now - self._last < FLUSH_S:
            return
        self._last = now
        _write_atomically(self.path, stats.as_dict())


def scheduler_totals(directory: Path, pids: set[int] | None = None) -> dict[str, float]:
    """The schedulers' counters in ``directory`` (only those of engine processes ``pids``),
    added up (maxima taken)."""
    out: dict[str, float] = {}
    for path in sorted(directory.glob(f"{SCHEDULER_PREFIX}*.json")):
        if pids is not None and int(path.stem[len(SCHEDULER_PREFIX):]) not in pids:
            continue
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for name, value in body.items():
            merge = max if name.endswith("max_s") or name.endswith("cost_s") else (lambda a, b: a + b)
            out[name] = merge(out[name], value) if name in out else value
    return out


def _write_atomically(path: Path, body: object) -> bool:
    """``body`` as JSON in ``path``, replaced whole (a reader never sees half a file); False
    when the directory is gone (its owner exited)."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(body))
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def owner_dir() -> Path | None:
    """This process's snapshot directory (it must own one: ``install_collector``)."""
    return _OWNER


def _owner_dir(pid: int, create_time: float) -> Path:
    # The start time keeps a recycled pid from inheriting a dead owner's directory.
    return _BASE / f"{pid}-{int(create_time * 1000)}"


def install_collector() -> Path | None:
    """In a process vLLM did not spawn: own a snapshot directory and serve it from the default
    registry. Returns the directory (None in vLLM's own children, which write instead)."""
    if multiprocessing.parent_process() is not None:
        return None
    import psutil
    from prometheus_client import REGISTRY

    me = psutil.Process()
    directory = _owner_dir(me.pid, me.create_time())
    directory.mkdir(parents=True, exist_ok=True)
    global _OWNER
    _OWNER = directory
    atexit.register(shutil.rmtree, directory, True)
    REGISTRY.register(SnapshotCollector(directory))
    return directory


def _nearest_owner() -> Path | None:
    import psutil

    for proc in [psutil.Process(), *psutil.Process().parents()]:
        try:
            directory = _owner_dir(proc.pid, proc.create_time())
        except psutil.Error:
            continue
        if directory.is_dir():
            return directory
    return None


def make_exporter(stats: list[LayerStats], layers: list[int],
                  tp_rank: int) -> PrometheusExporter | SnapshotWriter | None:
    """The worker's exporter for these layers (numbered among MoE layers)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return PrometheusExporter(stats, layers)
    directory = _nearest_owner()
    if directory is None:  # e.g. a Ray worker under no owner process: stats() still works
        logger.debug("adapmoe: no metrics owner among this worker's ancestors; /metrics off")
        return None
    return SnapshotWriter(stats, layers, tp_rank, directory)
