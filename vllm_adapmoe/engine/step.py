"""What a model's MoE blocks share about the current forward pass, and a phase timer.

``StepInfo`` is refreshed at the first block of each pass (``describe``, set by the model: the
model's Python forward does not run per step once vLLM compiles it) and read by every block:
how many tokens decode, whether the step is counted (vLLM's dummy/profiling runs are not), and
whether a routing trace is being recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from vllm_adapmoe.engine.link import LinkCost


class RoutingRecorder(Protocol):
    """Records routing while a trace is taken (``offline/trace.py``'s ``TraceRecorder``)."""

    def begin_step(self, query_lens: torch.Tensor) -> None: ...

    def record(self, layer: int, ids: torch.Tensor, weights: torch.Tensor,
               decode_mask: torch.Tensor | None) -> None: ...

    def record_prediction(self, layer: int, weights: torch.Tensor, ids: torch.Tensor,
                          depth: int = 1) -> None: ...


@dataclass
class StepInfo:
    decode_tokens: int = 0
    decode_mask: torch.Tensor | None = None  # [T] True for decode tokens (query length 1)
    all_decode: bool = False  # every token of the step is a decode token
    decode_rows: torch.Tensor | None = None  # indices of the decode tokens (first use per step)
    counted: bool = False  # False for vLLM's dummy/profiling runs: they do not touch the stats
    trace: RoutingRecorder | None = None  # set while a routing trace is being recorded
    # Set by the model: refreshes the fields above at the first block of each forward pass.
    describe: Callable[[int], None] | None = None
    # Set by the model: called by its last block after a counted step (e.g. export counters).
    on_step_end: Callable[[], None] | None = None

    def enter(self, layer: int, num_tokens: int, cost: LinkCost) -> None:
        """A block starts its step: describe the pass (first block only), time the layers of
        pure-decode steps for the prefetch pay-off rule."""
        if self.describe is not None:
            self.describe(num_tokens)
        if self.counted and self.all_decode and cost.in_use and cost.pinned is None:
            cost.layer_started(layer)

    def leave(self, last: bool) -> None:
        if last and self.counted and self.on_step_end is not None:
            self.on_step_end()

    def decode_row_indices(self) -> torch.Tensor:
        """Rows of the decode tokens in a step that also prefills (once per step, shared)."""
        if self.decode_rows is None:
            self.decode_rows = self.decode_mask.nonzero().squeeze(1)
        return self.decode_rows


class PhaseClock:
    """Attributes wall time between successive ``mark(phase)`` calls to the named phase
    (``benchmarks/bench_layer.py``). On CUDA it synchronises at every mark, so only for timing."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.start()

    def start(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now
