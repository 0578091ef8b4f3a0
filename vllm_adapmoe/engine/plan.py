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
waves group whole tokens and outputs equal stock's wherever the plan puts them. Today an
expert runs from a device slot, resident or loaded; ``Wave.resident`` / ``Wave.loads`` say
which, the place where a third answer (compute it on the host) belongs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from vllm_adapmoe.engine.prefetch import PredictionScore, worth_prefetching

if TYPE_CHECKING:
    from vllm_adapmoe.engine.link import LinkCost


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
    waves: list[Wave]
    prefetch: list[PrefetchBooking]   # queued after the first wave's own loads


def plan_step(summary: StepSummary, residency: Residency, targets: Sequence[Target] = (),
              cost: LinkCost | None = None) -> StepPlan:
    """Waves for this layer's tokens, and the guesses for the look-ahead ``targets`` that pay."""
    waves = plan_waves(summary.expert_sets, summary.needed, residency.num_slots, residency.slot_of)
    bookings = []
    for target in targets:
        counts = summary.guesses.get(target.depth)
        if counts is not None and cost is not None:
            bookings.append(plan_prefetch(counts, target, cost))
    return StepPlan(waves, bookings)


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
