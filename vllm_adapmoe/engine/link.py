"""The host→device link of one model, and what a copy over it costs in decode layers.

All loads go through one ``Link`` per model — one loader thread (CPU) or one copy stream over
pinned memory (CUDA) — one copy at a time, as on one PCIe link. Copies compute waits for go
first; prefetches wait behind them. A queued copy can still be cancelled or promoted; one
already running always completes. With ``link_gbps`` (GB/s) each copy is stretched to what it
would take over that link (an *emulated* link for CPU experiments; an ``emulate`` preset,
``emulation.py``, sets that rate from its physics). ``LinkCost`` turns measured
copy and layer times (or a pinned ``link_layers``) into the prefetch pay-off rule's threshold.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vllm_adapmoe.engine.errors import ExpertCopyError

if TYPE_CHECKING:
    from vllm_adapmoe.engine.emulation import Emulation

logger = logging.getLogger("vllm.adapmoe")


class LinkCost:
    """How many decode layers one expert copy costs (``r``), for the prefetch pay-off rule:
    measured while decoding (moving averages of a copy's duration and of a layer's compute,
    i.e. the time between two layers' steps minus the stall in it), or pinned by ``link_layers``."""

    def __init__(self, pinned: float | None = None) -> None:
        self.pinned = pinned
        # False when copies run inline on the computing thread (CPU, small experts): a copy
        # then hides behind nothing, so a right guess saves no stall and none pays.
        self.overlaps = True
        self.stall_s = 0.0  # every stall of every layer, added by the caches
        # Whether anything reads the measured cost (a block that prefetches): else the layers
        # are not timed at all (host work paid every layer of every token).
        self.in_use = False
        self._copy_s: float | None = None
        self._layer_s: float | None = None
        self._last: tuple[int, float, float] | None = None  # (layer, its start, stall_s then)

    def observe_copy(self, seconds: float) -> None:
        self._copy_s = _average(self._copy_s, seconds)

    def layer_started(self, layer: int) -> None:
        """A counted pure-decode step enters ``layer``: the previous layer's compute ended."""
        now = time.perf_counter()
        last = self._last
        if last is not None and layer == last[0] + 1:
            self._layer_s = _average(self._layer_s, max(now - last[1] - (self.stall_s - last[2]), 0.0))
        self._last = (layer, now, self.stall_s)

    @property
    def can_overlap(self) -> bool:
        """Whether a prefetch can ever pay here (a pinned ``link_layers`` says it can)."""
        return self.overlaps or self.pinned is not None

    @property
    def copy_s(self) -> float | None:
        """One expert copy's measured duration (moving average; None before the first)."""
        return self._copy_s

    def layers_per_load(self) -> float:
        if self.pinned is not None:
            return self.pinned
        if not self._copy_s or not self._layer_s:
            return 0.0  # not measured yet
        return self._copy_s / self._layer_s

    def min_probability(self, depth: int, reuse: float = 0.0) -> float:
        """Issue a prefetch ``depth`` layers ahead when its chance of use p pays: a right one
        saves the stall the head start covers (min(r, depth) layers), a wrong one costs the
        link r layers that later loads wait for, and evicting a resident that is needed again
        with probability ``reuse`` costs a reload: p·min(r, depth) ≥ (1 − p)·r + reuse·r.
        Measured inline copies overlap nothing: no p pays (a pinned ``link_layers`` still rules)."""
        if not self.can_overlap:
            return math.inf
        r = self.layers_per_load()
        if r <= 0:  # not measured, or pinned free: the limit r → 0
            return (1 + reuse) / 2
        return r * (1 + reuse) / (r + min(r, depth))


class Link:
    """The host→device link of one model: one copy at a time, on-demand copies ahead of queued
    prefetches (each kind in submission order). A queued copy can still be cancelled
    (``Future.cancel``) or promoted to on-demand; one already running always completes, so a
    later copy into the same slot lands after it."""

    def __init__(self, device: torch.device, link_gbps: float | None = None,
                 link_layers: float | None = None, emulation: Emulation | None = None,
                 copy_timeout_s: float = 60.0) -> None:
        self.device = device
        # how long compute waits for a copy beyond the link's own backlog (emulated or measured
        # durations of what is queued ahead): a stuck copy fails the step, a slow link does not
        self.copy_timeout_s = copy_timeout_s
        self._gbps_rate = link_gbps * 1e9 if link_gbps else None
        # an emulated machine (``emulate``): its link rate, known once its scale is measured
        self.emulation = emulation
        self.cost = LinkCost(link_layers)
        self._stream = None
        self._queues: tuple[deque[_Copy], deque[_Copy]] = (deque(), deque())  # on demand, ahead
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None
        # CPU without emulation: a copy is a memcpy on the cores that compute. For small experts
        # the hand-off to a loader thread costs more than the copy (bundled model, 2 cores: LRU
        # decode 0.33x → 0.89x of all resident when copied inline); big ones still overlap
        # compute on the thread (Mixtral shape: 0.87x threaded vs 0.61x inline). See ExpertCache.
        self.cpu_free = device.type == "cpu" and link_gbps is None and emulation is None
        self._running = 0  # copies taken off the queues and not finished
        self._started: dict[int, tuple[float, int]] = {}  # running copy → (start, bytes)

    @property
    def bytes_per_s(self) -> float | None:
        """The emulated link's rate on this machine's clock (None: copies as fast as they go)."""
        if self.emulation is not None:
            return self.emulation.link_bytes_per_s
        return self._gbps_rate

    def backlog_s(self) -> float:
        """Seconds until the link is free: what a copy queued now waits for (queued copies at
        the link's rate, or its measured copy time; the running one's remainder)."""
        rate, per_copy = self.bytes_per_s, self.cost.copy_s or 0.0
        with self._wake:
            queued = [item.nbytes for queue in self._queues for item in queue]
            running = list(self._started.values())
        def duration(nbytes: int) -> float:
            return nbytes / rate if rate else per_copy
        now = time.perf_counter()
        return (sum(duration(n) for n in queued)
                + sum(max(duration(n) - (now - start), 0.0) for start, n in running))

    def idle(self) -> bool:
        """No copy queued or running (a promotion then costs later loads no wait)."""
        with self._wake:
            return not (self._running or self._queues[False] or self._queues[True])

    def submit(self, copy: Callable[[], None], nbytes: int, prefetch: bool = False) -> Future:
        future: Future = Future()
        with self._wake:
            if self._worker is None:
                if self.device.type == "cuda":
                    self._stream = torch.cuda.Stream(self.device)
                self._worker = threading.Thread(target=self._serve, name="adapmoe-link", daemon=True)
                self._worker.start()
            # CUDA: the slot may still be read by kernels queued on the compute stream
            after = torch.cuda.current_stream(self.device).record_event() if self._stream else None
            self._queues[prefetch].append(_Copy(future, copy, nbytes, after))
            self._wake.notify()
        return future

    def promote(self, future: Future) -> None:
        """Move a queued prefetch copy to the on-demand queue (compute now waits for it)."""
        with self._wake:
            ahead = self._queues[True]
            for item in ahead:
                if item.future is future:
                    ahead.remove(item)
                    self._queues[False].append(item)
                    return

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._queues[False] or self._queues[True]):
                    self._wake.wait()
                item = (self._queues[False] or self._queues[True]).popleft()
                self._running += 1
            try:
                self._serve_one(item)
            finally:
                with self._wake:
                    self._running -= 1
            # the thread outlives its copies: holding the last one would keep its cache's
            # slots alive after the model (or a benchmark's stack) is gone
            del item

    def _serve_one(self, item: _Copy) -> None:
        if not item.future.set_running_or_notify_cancel():
            return  # cancelled while queued: the link skips it
        try:
            run_with_retry(lambda: self._run(item))
            item.future.set_result(None)
        except BaseException as exc:  # surfaces in the waiting compute thread
            item.future.set_exception(exc)

    def _run(self, item: _Copy) -> None:
        start = time.perf_counter()
        with self._wake:
            self._started[id(item)] = (start, item.nbytes)
        if self._stream is not None:
            self._stream.wait_event(item.after)
            with torch.cuda.stream(self._stream):
                item.copy()
            self._stream.synchronize()
        else:
            item.copy()  # torch releases the GIL inside copy_, so this overlaps compute
        rate = self.bytes_per_s
        if rate:
            sleep_until(start + item.nbytes / rate)
        self.cost.observe_copy(time.perf_counter() - start)
        with self._wake:
            del self._started[id(item)]


@dataclass
class _Copy:
    future: Future
    copy: Callable[[], None]
    nbytes: int
    after: Any = None  # CUDA event the copy must wait for


def _average(mean: float | None, sample: float, weight: float = 0.1) -> float:
    return sample if mean is None else mean + weight * (sample - mean)


def run_with_retry(copy: Callable[[], None]) -> None:
    """A copy that raises is tried once more (a transient fault); a second failure is an
    ``ExpertCopyError`` for the step."""
    try:
        copy()
    except Exception as first:
        logger.warning("adapmoe: an expert copy to the device failed (%s); retrying once", first)
        try:
            copy()
        except Exception as exc:
            raise ExpertCopyError(f"adapmoe: an expert copy to the device failed twice ({exc}); "
                                  "the step fails") from exc


def sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)
