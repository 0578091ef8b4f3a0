"""Runs one layer's ``StepPlan`` on the device: the link for its loads and guesses, the kernel on
the slots.

Per wave: book slots for its loads and queue their copies (``ExpertCache.start_loads``: hits
first, copies already queued by a prefetch are promoted); after the first wave's own loads, queue
the plan's prefetch guesses into the look-ahead layers' caches (behind them on the link); compute
the wave's tokens whose experts have landed while copies run; wait; compute the rest. Every
kernel call gets whole tokens with expert ids remapped to slot ids. Tokens the plan sends to the
host are computed from the host store with their expert ids (``HostExecutor``), started before
the waves and waited for after them: on CPU with the same kernel on the same layout, so a
token's output is the same wherever it runs. Last, a host expert the plan promotes is copied into
an idle own slot if the link is idle.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from vllm_adapmoe.engine.cache import ExpertCache
from vllm_adapmoe.engine.costs import ExpertCosts
from vllm_adapmoe.engine.emulation import Emulation
from vllm_adapmoe.engine.link import sleep_until
from vllm_adapmoe.engine.prefetch import expert_counts
from vllm_adapmoe.engine.kernels import ExpertKernel, GroupedKernel
from vllm_adapmoe.engine.plan import StepPlan
from vllm_adapmoe.engine.routing import Routing
from vllm_adapmoe.engine.stats import LayerStats
from vllm_adapmoe.engine.step import PhaseClock
from vllm_adapmoe.engine.store import HostExpertStore


class StepExecutor:
    def __init__(self, cache: ExpertCache, kernel: ExpertKernel, stats: LayerStats,
                 host: HostExecutor | None = None) -> None:
        self.cache, self.kernel, self.stats, self.host = cache, kernel, stats, host
        self.clock: PhaseClock | None = None  # set by benchmarks to time the phases

    def run(self, plan: StepPlan, x: torch.Tensor, routing: Routing,
            prefetch_caches: Sequence[ExpertCache], counted: bool) -> torch.Tensor:
        try:
            return self._run(plan, x, routing, prefetch_caches, counted)
        finally:  # also when a copy or the host failed: no staging row stays booked
            self.cache.end_step()

    def _run(self, plan: StepPlan, x: torch.Tensor, routing: Routing,
             prefetch_caches: Sequence[ExpertCache], counted: bool) -> torch.Tensor:
        out = torch.empty_like(x)
        clock = self.clock
        job = None
        if plan.host_rows is not None:  # started first: the host works while the device does
            job = self.host.start(out, x, routing, plan.host_rows, len(plan.host_experts))
            clock and clock.mark("host")
        for i, wave in enumerate(plan.waves):
            started, stalled = time.perf_counter(), self.stats.stall_s
            pending = self.cache.start_loads(wave.experts)
            clock and clock.mark("residency")
            if i == 0:  # our own first loads go on the link first, then the guesses
                self._prefetch(plan, prefetch_caches)
            self._compute_wave(out, x, routing, wave.rows, wave.experts, pending, counted)
            if self.host is not None:  # what a wave costs beside its loads (hybrid decisions)
                self.host.costs.observe_wave(time.perf_counter() - started
                                             - (self.stats.stall_s - stalled))
        if not plan.waves:  # every token ran on the host
            self._prefetch(plan, prefetch_caches)
        if job is not None:
            self.host.finish(job, out, counted)
            clock and clock.mark("host wait")
        if plan.promote and self.cache.link.idle():
            self.cache.promote(plan.promote, {e for w in plan.waves for e in w.experts})
        return out

    def _prefetch(self, plan: StepPlan, prefetch_caches: Sequence[ExpertCache]) -> None:
        for booking in plan.prefetch:
            prefetch_caches[booking.depth - 1].prefetch(
                booking.issue, keep=booking.named, evictable=booking.evictable)
        self.clock and self.clock.mark("prefetch")

    def _compute_wave(self, out: torch.Tensor, x: torch.Tensor, routing: Routing,
                      rows: torch.Tensor | None, experts: list[int], pending: list,
                      counted: bool) -> None:
        """Compute ``rows`` (None: all); while copies are pending, first the rows whose experts
        have landed, then wait for the copies and compute the rest."""
        clock = self.clock
        if pending:
            ready = [e for e in experts if self.cache.ready(e)]
            if ready:
                sets = routing.expert_sets if rows is None else routing.expert_sets[rows]
                landed = torch.tensor(ready, dtype=sets.dtype, device=sets.device)
                hit = (torch.isin(sets, landed) | (sets < 0)).all(1)
                rows = (torch.arange(sets.shape[0], device=sets.device) if rows is None else rows)
                self._compute(out, x, routing, rows[hit], counted)
                rows = rows[~hit]
                clock and clock.mark("compute")
            self.cache.wait(pending)
            clock and clock.mark("stall")
        self._compute(out, x, routing, rows, counted)
        clock and clock.mark("compute")

    def _compute(self, out: torch.Tensor, x: torch.Tensor, routing: Routing,
                 rows: torch.Tensor | None, counted: bool) -> None:
        """Run the kernel once for ``rows`` (None: all; their experts resident) on the slots."""
        if rows is not None and rows.numel() == 0:
            return
        self.stats.waves += counted
        ids, weights = routing.kernel_args(rows)
        slot_ids = self.cache.slot_ids(ids)
        cache = self.cache
        if rows is None:
            self.kernel(out, x, cache.slots, weights, slot_ids)
            return
        part = torch.empty((rows.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
        self.kernel(part, x[rows], cache.slots, weights, slot_ids)
        out[rows] = part


class HostExecutor:
    """Computes tokens whole from the host store (every expert lives there), by expert id.

    On CPU the host *is* the device: the same kernel on the store (which is in the kernel's
    layout) runs inline on vLLM's own OpenMP threads, so it adds no threads beside vLLM's
    binding; with an ``emulate`` preset the step then waits until the preset's host time for
    those experts has passed since the host started (the device's waves run meanwhile). On
    CUDA the tokens' activations go to pinned host memory and one host thread computes them
    with the engine's grouped GEMM from the pinned store (the device kernel's plain layout)
    while the device computes its waves; their outputs come back at the end of the step.
    (The CUDA path has not run on a GPU yet.)
    """

    def __init__(self, store: HostExpertStore, kernel: ExpertKernel, stats: LayerStats,
                 costs: ExpertCosts, device: torch.device,
                 emulation: Emulation | None = None, threads: int | None = None) -> None:
        self.store, self.stats, self.costs, self.device = store, stats, costs, device
        self.emulation, self.threads = emulation, threads
        self.kernel = kernel if device.type == "cpu" else GroupedKernel(store.fmt)
        self._pool: ThreadPoolExecutor | None = None

    def start(self, out: torch.Tensor, x: torch.Tensor, routing: Routing, rows: torch.Tensor,
              experts: int) -> _HostJob:
        """Start computing ``rows`` (their ``experts`` distinct experts) on the host."""
        started = time.perf_counter()
        every = rows.numel() == x.shape[0]  # every token (batch 1): no gather and scatter
        ids, weights = routing.kernel_args(None if every else rows)
        xs = x if every else x[rows]
        if self.emulation:
            emulated = self._emulated_s(routing.expert_sets if every else routing.expert_sets[rows])
        else:
            emulated = None
        job = _HostJob(rows, experts, ids.numel(), started, emulated)
        if self.device.type == "cpu":
            if every:
                self.kernel(out, xs, self.store.rows, weights, ids)
            else:
                part = torch.empty_like(xs)
                self.kernel(part, xs, self.store.rows, weights, ids)
                out[rows] = part
            job.seconds = time.perf_counter() - started
            return job
        xs, ids, weights = (t.to("cpu", non_blocking=True) for t in (xs, ids, weights))
        ready = torch.cuda.current_stream(self.device).record_event()
        if self._pool is None:
            if self.threads:  # torch's intra-op pool is per process: the CUDA worker's only user
                torch.set_num_threads(self.threads)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapmoe-host")
        job.future = self._pool.submit(self._compute_on_host, ready, xs, ids, weights)
        return job

    def finish(self, job: _HostJob, out: torch.Tensor, counted: bool) -> None:
        """Wait for the host's part (a failure in it raises here, in the step) and count it."""
        if job.future is not None:
            part = job.future.result()
            out[job.rows] = part.to(out.device, non_blocking=True)
            job.seconds = time.perf_counter() - job.started
        if job.emulated is not None:
            sleep_until(job.started + job.emulated)
        seconds = job.emulated if job.emulated is not None else job.seconds
        self.costs.observe_host(job.experts, job.pairs, seconds)
        if counted:
            self.stats.host_tokens += job.rows.numel()
            self.stats.host_experts += job.experts
            self.stats.host_s += seconds

    def _compute_on_host(self, ready: Any, xs: torch.Tensor, ids: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
        ready.synchronize()  # the activations have reached host memory
        part = torch.empty_like(xs)
        self.kernel(part, xs, self.store.rows, weights, ids)
        return part

    def _emulated_s(self, sets: torch.Tensor) -> float:
        """The preset's host time for these tokens: each expert they need, for its tokens,
        one after another (the experts share the host's memory bus)."""
        counts = expert_counts(sets, self.store.num_experts).tolist()
        return sum(self.emulation.host_s(n) for n in counts if n)

    def time_host(self, experts: int, tokens: int) -> None:
        """One host call of ``experts`` experts, ``tokens`` tokens each (the cost model's
        start-up microbenchmark)."""
        n = experts * tokens
        x = torch.randn(n, self.store.hidden, dtype=self.store.dtype)
        ids = torch.arange(n, dtype=torch.int32).remainder(experts).view(n, 1)
        weights = torch.ones(n, 1, dtype=torch.float32)
        self.kernel(torch.empty_like(x), x, self.store.rows, weights, ids)


@dataclass(slots=True)
class _HostJob:
    rows: torch.Tensor
    experts: int            # distinct experts computed
    pairs: int              # token-expert pairs (kernel ids are never negative)
    started: float
    emulated: float | None  # the preset's duration (emulated runs)
    seconds: float = 0.0    # measured
    future: Future | None = None  # CUDA: the host thread's part
