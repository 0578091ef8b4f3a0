"""What a cold expert costs where it could run: loaded over the link into a slot, or computed
where it lives, on the host, for the tokens that need it. One model for the live planner and the
simulator (both hand it to ``plan_step``).

* ``load_s``: one expert's copy over the link (the link's measured copy time);
* ``host_s(tokens)``: one expert computed on the host for ``tokens`` tokens. Reading the expert's
  weights from host memory dominates at decode sizes (a few tokens cost about what one does), so
  the model is a fixed part plus a per-token part; a step's host experts run in one kernel
  call, so they cost the sum of theirs (they share one memory bus) plus ``host_call_s`` once;
* ``device_call_s``: one kernel call on the device (a wave); more waves when the device tokens'
  experts do not fit the slots at once (measured from live waves where it matters: CPU);
* ``parallel``: whether host work runs beside the link's copies (a GPU machine: the link, the
  host and the device are three resources; an emulated link) or after them on the same cores
  (CPU without emulation: copies are memcpys on the cores and memory bus the host computes
  with, inline or on the loader thread). The planner minimises the layer's
  critical path, max(link, host), in the first case and their sum in the second.

``PinnedCosts`` fixes the numbers (the ``hybrid_costs`` setting): decisions that do not depend
on timing, which tests and replays need. ``EmulatedCosts`` reads an ``emulate`` preset
(``emulation.py``): the durations the engine pads its copies and host work to.
``MeasuredCosts`` times the host at start-up (one call of 1 expert x 1 token, 1 x 16, 4 x 1)
and refreshes the per-expert part from live host computations.

``StepTimes`` turns what a layer's plan does (its waves, copies, host call) into seconds: the
simulator's time replay (``offline/simulator.py``) with the same call / expert / token split.
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
    host_call_s: float = 0.0
    parallel: bool = True
    device_call_s: float = 0.0

    def host_s(self, tokens: int) -> float:
        return self.host_fixed_s + self.host_token_s * tokens

    def observe_host(self, experts: int, tokens: int, seconds: float) -> None:
        pass  # pinned: nothing to learn

    def observe_wave(self, seconds: float) -> None:
        pass


class EmulatedCosts:
    """The preset's load and host times on this machine's clock (``Emulation``)."""

    host_call_s = 0.0  # the preset's physics: memory-bound experts, no per-call part
    device_call_s = 0.0  # a wave's launch is small against the preset's loads
    parallel = True

    def __init__(self, emulation: Emulation) -> None:
        self.emulation = emulation

    @property
    def load_s(self) -> float:
        return self.emulation.copy_s(self.emulation.expert_bytes)

    def host_s(self, tokens: int) -> float:
        return self.emulation.host_s(tokens)

    def observe_host(self, experts: int, tokens: int, seconds: float) -> None:
        pass  # the preset's figures rule

    def observe_wave(self, seconds: float) -> None:
        pass


class MeasuredCosts:
    """``load`` reads the link's current copy-time estimate; the host part is fitted from
    timed host calls (``calibrate``), then its per-expert part tracked from live calls."""

    def __init__(self, load: Callable[[], float], parallel: bool) -> None:
        self._load = load
        self.parallel = parallel
        self.host_fixed_s: float | None = None  # per expert
        self.host_token_s = 0.0
        self.host_call_s = 0.0
        # a wave where waves cost what matters against a load (inline CPU copies: the same
        # cores); on a GPU the launch is small against a PCIe copy and is left out
        self.device_call_s = 0.0

    @property
    def calibrated(self) -> bool:
        return self.host_fixed_s is not None

    @property
    def load_s(self) -> float:
        return self._load()

    def calibrate(self, run: Callable[[int, int], None], repeats: int = 5) -> None:
        """``run(experts, tokens)`` computes that many experts, ``tokens`` tokens each, in one
        host call: c + e·experts + t·pairs fitted from (1, 1), (1, 16) and (4, 1)."""
        one, many, wide = (min(_timed(run, e, t) for _ in range(repeats))
                           for e, t in ((1, 1), (1, 16), (4, 1)))
        self.host_token_s = max(many - one, 0.0) / 15
        per_expert = max(wide - one - 3 * self.host_token_s, 0.0) / 3
        self.host_call_s = max(one - per_expert - self.host_token_s, 0.0)
        self.host_fixed_s = per_expert
        if not self.parallel:  # the device runs the same kernel here: start from the host's
            self.device_call_s = self.host_call_s

    def host_s(self, tokens: int) -> float:
        return (self.host_fixed_s or 0.0) + self.host_token_s * tokens

    def observe_host(self, experts: int, tokens: int, seconds: float) -> None:
        """A live host call of ``experts`` distinct experts over ``tokens`` token-expert pairs:
        move the per-expert part toward what it showed (the call and token parts stay fitted)."""
        if experts and self.host_fixed_s is not None:
            sample = max(seconds - self.host_call_s - self.host_token_s * tokens, 0.0) / experts
            self.host_fixed_s += 0.1 * (sample - self.host_fixed_s)


    def observe_wave(self, seconds: float) -> None:
        """A live wave (its kernel call and the step's work around it) took ``seconds``."""
        if not self.parallel:
            self.device_call_s += 0.1 * (seconds - self.device_call_s)


@dataclass(frozen=True)
class StepTimes:
    """What one layer's step takes, from what its plan does: the simulator's time replay.

    A kernel call costs ``call_s`` + ``expert_s`` per distinct expert it reads + ``pair_s`` per
    token-expert pair (the host's call likewise, with ``host`` = its (call, expert, pair) parts;
    None: the device's, as on CPU, where both run the same kernel on the same cores), a host call
    ``host_extra_s`` more (its plan's split of the step and the hand-off around the kernel); a
    copy ``load_s``; a call on part of the step's tokens ``subset_s`` more (their gather and
    scatter); ``layer_s`` the rest of a layer's step (routing, planning, small
    ops). With ``plan_timed`` the replay adds its own ``plan_step`` time (the live planner's
    code on this machine: a split step plans far longer than an all-resident one). Where copies
    and host work run beside the device (``parallel``: a GPU, an emulated machine) a layer takes
    max(device + its on-demand copies, host), guesses and promotions landing in the background;
    else everything adds up, every copy included.
    """

    load_s: float
    call_s: float
    expert_s: float
    pair_s: float
    layer_s: float = 0.0
    parallel: bool = False
    host: tuple[float, float, float] | None = None
    host_extra_s: float = 0.0
    subset_s: float = 0.0
    plan_timed: bool = False

    @classmethod
    def measured(cls, costs: MeasuredCosts, load_s: float, layer_s: float = 0.0,
                 host_extra_s: float = 0.0, subset_s: float = 0.0) -> StepTimes:
        """From a calibrated host cost model (on CPU it times the device's kernel too), with
        the replay's planner timed as it runs."""
        if not costs.calibrated:
            raise ValueError("StepTimes.measured needs calibrated costs (MeasuredCosts.calibrate)")
        return cls(load_s, costs.host_call_s, costs.host_fixed_s or 0.0, costs.host_token_s,
                   layer_s, costs.parallel, host_extra_s=host_extra_s, subset_s=subset_s,
                   plan_timed=True)

    def kernel_s(self, experts: int, pairs: int, on_host: bool = False) -> float:
        call, expert, pair = (self.host if on_host and self.host is not None
                              else (self.call_s, self.expert_s, self.pair_s))
        return call + expert * experts + pair * pairs + (self.host_extra_s if on_host else 0.0)

    def step_s(self, waves: list[tuple[int, int]], host: tuple[int, int] | None, copies: int,
               on_demand: int, subsets: tuple[int, bool] = (0, False)) -> float:
        """``waves``: (distinct experts, pairs) per device kernel call; ``host``: the host call's
        (experts, pairs) or None; ``copies``: every copy the step queued (``on_demand`` of them
        for its own tokens); ``subsets``: the device calls on part of the step's tokens, and
        whether the host's call is one."""
        device = (self.layer_s + sum(self.kernel_s(e, p) for e, p in waves)
                  + subsets[0] * self.subset_s)
        on_host = (self.kernel_s(*host, on_host=True) + subsets[1] * self.subset_s
                   if host else 0.0)
        if self.parallel:
            return max(device + on_demand * self.load_s, on_host)
        return device + copies * self.load_s + on_host


def _timed(run: Callable[[int, int], None], experts: int, tokens: int) -> float:
    start = time.perf_counter()
    run(experts, tokens)
    return time.perf_counter() - start


ExpertCosts = Union[PinnedCosts, EmulatedCosts, MeasuredCosts]
