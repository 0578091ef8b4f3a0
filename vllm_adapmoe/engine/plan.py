"""One layer's step, decided: which tokens run in which wave, which experts each wave finds
resident and which it must load, and which guessed experts of the next layers to copy ahead.

``plan_step`` is a pure function of the step's small host summary (``StepSummary``), the
layer's residency (``Residency``: a ``SlotTable`` read, never written), the look-ahead layers'
residencies and predictor scores (``Target``) and what a load costs (``LinkCost``). The live
block runs its plan (``execute.py``: the link and the kernel); the simulator
(``offline/simulator.py``) applies the same plans to tables alone, which is why a replay with
the recorded settings reproduces the live counters exactly.

A token is always computed whole, by one kernel call over all its kept experts (the fused
kernel sums a token's experts internally, and splitting that sum would change the rounding), so
waves group whole tokens and outputs equal stock's wherever the plan puts them. A needed expert
runs from a device slot (resident, or loaded first: ``Wave.resident`` / ``Wave.loads``) or, with
hybrid execution, where it lives: a cold expert whose tokens cost less to compute on the host
than the expert costs to load (``costs.py``) sends those tokens, whole, to the host
(``StepPlan.host_rows``); with ``"host-only"`` every cold expert does, and nothing is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Union

import torch

from vllm_adapmoe.engine.prefetch import PredictionScore, worth_prefetching

if TYPE_CHECKING:
    from vllm_adapmoe.engine.costs import MeasuredCosts, PinnedCosts
    from vllm_adapmoe.engine.link import LinkCost

    ExpertCosts = Union[MeasuredCosts, PinnedCosts]

HYBRID_MODES = ("off", "auto", "host-only")


class Residency(Protocol):
    """What the planner reads of a layer's slots (``SlotTable`` provides it)."""

    slot_of: Mapping[int, int]   # resident expert → slot
    num_slots: int               # own slots + shared staging rows the layer may use
    own: int                     # own slots (what a prefetch may fill)

    @property
    def reuse(self) -> float: ...  # how often a resident is needed again (the pay-off rule)


@dataclass(slots=True)
class StepSummary:
    """One layer's step as the host sees it after the step's one device→host transfer."""

    needed: list[int]                 # distinct experts the step needs, ascending
    expert_sets: torch.Tensor         # [T, k] each token's experts (−1: gated off); read only
                                      # when the needed experts do not fit at once
    guesses: dict[int, list[int]] = field(default_factory=dict)
    # ``guesses[d]``: decode tokens per expert that the layer d ahead is predicted to need
    tokens_per_expert: list[int] | None = None  # [E] (hybrid: what a host computation costs)


@dataclass(frozen=True, slots=True)
class Target:
    """A look-ahead layer ``depth`` layers ahead, as the planner sees it."""

    depth: int
    residency: Residency
    score: PredictionScore   # how well guesses at this distance have done for that layer


@dataclass(slots=True)
class Wave:
    rows: torch.Tensor | None   # token rows (None: every token)
    experts: list[int]          # every expert the wave's tokens need: resident ones first
    resident: list[int]         # of those, resident when the wave starts (planner's view)

    @property
    def loads(self) -> list[int]:
        """Experts to copy in before the wave's tokens can run."""
        have = set(self.resident)
        return [e for e in self.experts if e not in have]


@dataclass(frozen=True, slots=True)
class PrefetchBooking:
    depth: int            # which look-ahead layer
    issue: list[int]      # guesses worth a copy, most wanted first
    named: list[int]      # every expert guessed (never evicted by these guesses)
    evictable: set[int]   # of ``issue``, those also worth evicting a resident for


@dataclass(slots=True)
class StepPlan:
    waves: list[Wave]                 # the device's tokens
    prefetch: list[PrefetchBooking]   # queued after the first wave's own loads
    host_rows: torch.Tensor | None = None  # tokens computed whole on the host (None: none)
    host_experts: list[int] = field(default_factory=list)  # distinct experts those need


def plan_step(summary: StepSummary, residency: Residency, targets: Sequence[Target] = (),
              cost: LinkCost | None = None, hybrid: str = "off",
              host: ExpertCosts | None = None) -> StepPlan:
    """Where this layer's tokens run (waves on the device, or the host), and the guesses for the
    look-ahead ``targets`` that pay."""
    bookings = []
    for target in targets:
        counts = summary.guesses.get(target.depth)
        if counts is not None and cost is not None:
            bookings.append(plan_prefetch(counts, target, cost))
    on_host = experts_for_host(summary, residency, hybrid, host)
    if not on_host:
        waves = plan_waves(summary.expert_sets, summary.needed, residency.num_slots,
                           residency.slot_of)
        return StepPlan(waves, bookings)
    sets = summary.expert_sets
    host_rows = torch.isin(sets, torch.tensor(on_host, dtype=sets.dtype, device=sets.device)).any(1)
    device_rows = (~host_rows).nonzero().squeeze(1)
    host_rows = host_rows.nonzero().squeeze(1)
    device_sets = sets[device_rows]
    waves = plan_waves(device_sets, _distinct(device_sets), residency.num_slots, residency.slot_of)
    for wave in waves:  # rows of the device tokens → rows of the step
        wave.rows = device_rows if wave.rows is None else device_rows[wave.rows]
    return StepPlan([w for w in waves if w.rows.numel()], bookings, host_rows,
                    _distinct(sets[host_rows]))


def experts_for_host(summary: StepSummary, residency: Residency, hybrid: str,
                 host: ExpertCosts | None) -> list[int]:
    """The cold experts whose tokens go to the host: every one (``"host-only"``), or those whose
    tokens cost less to compute there than the expert costs to load (``"auto"``)."""
    if hybrid == "off" or host is None:
        return []
    cold = [e for e in summary.needed if e not in residency.slot_of]
    if hybrid == "host-only" or not cold:
        return cold
    load_s, tokens = host.load_s, summary.tokens_per_expert
    return [e for e in cold if host.host_s(tokens[e]) < load_s]


def _distinct(expert_sets: torch.Tensor) -> list[int]:
    return [e for e in expert_sets.unique().tolist() if e >= 0]


def plan_prefetch(counts: list[int], target: Target, cost: LinkCost) -> PrefetchBooking:
    """The pay-off rule (``prefetch.py``) on ``counts`` (guessed tokens per expert of ``target``)."""
    issue, evictable = worth_prefetching(counts, target.residency, target.score, cost, target.depth)
    return PrefetchBooking(target.depth, issue, [e for e, c in enumerate(counts) if c], evictable)


def plan_waves(expert_sets: torch.Tensor, needed: list[int], capacity: int,
               resident: Mapping[int, int]) -> list[Wave]:
    """Group tokens into waves whose experts fit in ``capacity`` slots.

    ``expert_sets`` is [T, k] with −1 for experts gating dropped. Resident experts come first in
    each wave (hits before loads); tokens sharing an expert set are kept together. Greedy: the
    expert-set groups that overlap most with what is resident, then the most common, join a wave
    while its union still fits. After a wave, its experts are what the planner counts as
    resident for the next one.
    """
    if len(needed) <= capacity:
        hits = [e for e in needed if e in resident]
        return [Wave(None, hits + [e for e in needed if e not in resident], hits)]
    sets, inverse = torch.unique(expert_sets.sort(dim=1).values, dim=0, return_inverse=True)
    counts = torch.bincount(inverse, minlength=sets.shape[0]).tolist()
    # Expert sets as bit masks: unions, overlaps and sizes are int operations, which keeps a
    # many-token prefill over 64-128 experts cheap (one wave per few tokens at small budgets).
    masks = [_bitmask(row) for row in sets.tolist()]
    remaining = list(range(len(masks)))
    present = _bitmask(resident)
    waves: list[Wave] = []
    while remaining:
        remaining.sort(key=lambda g: (-(masks[g] & present).bit_count(), -counts[g]))
        wave, chosen, rest = 0, [], []
        for g in remaining:
            union = wave | masks[g]
            if union.bit_count() <= capacity:
                wave = union
                chosen.append(g)
            else:
                rest.append(g)
        remaining = rest
        rows = torch.isin(inverse, torch.tensor(chosen, device=inverse.device)).nonzero().squeeze(1)
        experts = [e for e in range(wave.bit_length()) if wave >> e & 1]
        hits = [e for e in experts if present >> e & 1]
        waves.append(Wave(rows, hits + [e for e in experts if not present >> e & 1], hits))
        present = wave
    return waves


def _bitmask(experts) -> int:
    """Bit e set for every expert id e >= 0 (−1 marks experts gating dropped)."""
    mask = 0
    for e in experts:
        if e >= 0:
            mask |= 1 << e
    return mask
