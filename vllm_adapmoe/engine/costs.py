"""What a cold expert costs where it could run: loaded over the link into a slot, or computed
where it lives, on the host, for the tokens that need it. One model for the live planner and the
simulator (both hand it to ``plan_step``).

* ``load_s``: one expert's copy over the link (the link's measured copy time);
* ``host_s(tokens)``: one expert computed on the host for ``tokens`` tokens. Reading the expert's
  weights from host memory dominates at decode sizes (a few tokens cost about what one does), so
  the model is a fixed part plus a per-token part, both measured on this host: a start-up
  microbenchmark at 1 and 16 tokens, refreshed by every live host computation.

``PinnedCosts`` fixes all three numbers (the ``hybrid_costs`` setting): decisions that do not
depend on timing, which tests and replays need. ``EmulatedCosts`` reads an ``emulate`` preset
(``emulation.py``): the durations the engine pads its copies and host work to.

A host computation of several experts costs the sum of theirs: they share one memory bus.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from vllm_adapmoe.engine.emulation import Emulation


@dataclass(frozen=True)
class PinnedCosts:
    load_s: float
    host_fixed_s: float
    host_token_s: float

    def host_s(self, tokens: int) -> float:
        return self.host_fixed_s + self.host_token_s * tokens

    def observe_host(self, experts: int, tokens: int, seconds: float) -> None:
        pass  # pinned: nothing to learn


class EmulatedCosts:
    """The preset's load and host times on this machine's clock (``Emulation``)."""

    def __init__(self, emulation: Emulation) -> None:
        self.emulation = emulation

    @property
    def load_s(self) -> float:
        return self.emulation.copy_s(self.emulation.expert_bytes)

    def host_s(self, tokens: int) -> float:
        return self.emulation.host_s(tokens)

    def observe_host(self, experts: int, tokens: int, seconds: float) -> None:
        pass  # the preset's figures rule


class MeasuredCosts:
    """``load`` reads the link's current copy-time estimate; the host part is fitted from
    timings of one expert at 1 and 16 tokens (``calibrate``), then tracked from live calls."""

    def __init__(self, load: Callable[[], float]) -> None:
        self._load = load
        self.host_fixed_s: float | None = None
        self.host_token_s = 0.0

    @property
    def calibrated(self) -> bool:
        return self.host_fixed_s is not None

    @property
    def load_s(self) -> float:
        return self._load()

    def calibrate(self, run: Callable[[int], None], repeats: int = 5) -> None:
        """``run(tokens)`` computes one expert on the host for that many tokens."""
        one, many = (min(_timed(run, t) for _ in range(repeats)) for t in (1, 16))
        self.host_token_s = max(many - one, 0.0) / 15
        self.host_fixed_s = max(one - self.host_token_s, 0.0)

    def host_s(self, tokens: int) -> float:
        return (self.host_fixed_s or 0.0) + self.host_token_s * tokens

    def observe_host(self, experts: int, tokens: int, seconds: float) -> None:
        """A live host computation of ``experts`` distinct experts over ``tokens`` token-expert
        pairs: move the fixed part toward what it showed (the per-token slope stays fitted)."""
        if experts and self.host_fixed_s is not None:
            sample = max(seconds - self.host_token_s * tokens, 0.0) / experts
            self.host_fixed_s += 0.1 * (sample - self.host_fixed_s)


def _timed(run: Callable[[int], None], tokens: int) -> float:
    start = time.perf_counter()
    run(tokens)
    return time.perf_counter() - start


ExpertCosts = Union[PinnedCosts, EmulatedCosts, MeasuredCosts]
