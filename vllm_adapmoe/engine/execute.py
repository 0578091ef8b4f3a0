"""Runs one layer's ``StepPlan`` on the device: the link for its loads and guesses, the kernel on
the slots.

Per wave: book slots for its loads and queue their copies (``ExpertCache.start_loads``: hits
first, copies already queued by a prefetch are promoted); after the first wave's own loads, queue
the plan's prefetch guesses into the look-ahead layers' caches (behind them on the link); compute
the wave's tokens whose experts have landed while copies run; wait; compute the rest. Every
kernel call gets whole tokens with expert ids remapped to slot ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_adapmoe.engine.cache import ExpertCache
from vllm_adapmoe.engine.kernels import ExpertKernel
from vllm_adapmoe.engine.plan import StepPlan
from vllm_adapmoe.engine.routing import Routing
from vllm_adapmoe.engine.stats import LayerStats
from vllm_adapmoe.engine.step import PhaseClock


class StepExecutor:
    def __init__(self, cache: ExpertCache, kernel: ExpertKernel, stats: LayerStats) -> None:
        self.cache, self.kernel, self.stats = cache, kernel, stats
        self.clock: PhaseClock | None = None  # set by benchmarks to time the phases

    def run(self, plan: StepPlan, x: torch.Tensor, routing: Routing,
            prefetch_caches: Sequence[ExpertCache], counted: bool) -> torch.Tensor:
        out = torch.empty_like(x)
        clock = self.clock
        for i, wave in enumerate(plan.waves):
            pending = self.cache.start_loads(wave.experts)
            clock and clock.mark("residency")
            if i == 0:  # our own first loads go on the link first, then the guesses
                for booking in plan.prefetch:
                    prefetch_caches[booking.depth - 1].prefetch(
                        booking.issue, keep=booking.named, evictable=booking.evictable)
                clock and clock.mark("prefetch")
            self._compute_wave(out, x, routing, wave.rows, wave.experts, pending, counted)
        self.cache.end_step()
        return out

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
            self.kernel(out, x, cache.w13, cache.w2, weights, slot_ids)
            return
        part = torch.empty((rows.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
        self.kernel(part, x[rows], cache.w13, cache.w2, weights, slot_ids)
        out[rows] = part
