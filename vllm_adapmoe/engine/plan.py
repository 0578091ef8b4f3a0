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
hybrid execution, where it lives: the tokens of some cold experts go, whole, to the host
(``StepPlan.host_rows``). ``"auto"`` picks those experts to shorten the layer's critical path,
max(link: the loads the device waits for, host: the host computations, which share one memory
bus), with costs from ``costs.py``; ``"host-only"`` sends every cold expert there and loads
nothing. Under ``"auto"`` (where the link works beside the host) one host-computed expert per
step may be promoted into an own slot that no token of the step used (``StepPlan.promote``; the
executor copies it only while the link is idle), so the cache keeps adapting although misses no
longer load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from vllm_adapmoe.engine.prefetch import PredictionScore, worth_prefetching

if TYPE_CHECKING:
    from vllm_adapmoe.engine.costs import ExpertCosts
    from vllm_adapmoe.engine.link import LinkCost

HYBRID_MODES = ("off", "auto", "host-only")


def never_loads(hybrid: str) -> bool:
    """``"host-only"``: every cold expert runs on the host, so nothing is ever copied in and a
    layer needs no staging rows below top-k own slots (its device tokens are all resident)."""
    return hybrid == "host-only"


def layer_loads(hybrid: str, own_slots: int) -> bool:
    """Whether a layer copies experts in. A layer with no own slot (hybrid only: llama.cpp's
    ``--n-cpu-moe`` form) lives on the host whole, under ``"auto"`` too: loading it would
    need ``top_k`` staging rows, the most any plan pays for, to cache nothing."""
    return own_slots > 0 and not never_loads(hybrid)


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
    # (hybrid) resident experts whose copies are still on the link: the device would wait for
    # them, so the planner weighs them like cold ones (the copy lands anyway, for later steps)
    landing: frozenset[int] = frozenset()
    link_backlog_s: float = 0.0  # (hybrid) until the link is free: copies queued or running


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
    promote: list[int] = field(default_factory=list)  # host experts to copy in after the step


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
    # every needed expert on the host (a layer with no slot; batch 1 always): every token goes
    every = len(on_host) == len(summary.needed)
    host_rows = None if every else torch.isin(
        sets, torch.tensor(on_host, dtype=sets.dtype, device=sets.device)).any(1)
    if every or bool(host_rows.all()):  # every token on the host: no rows to split
        promote = (_promotion(sets, residency, set(), summary.tokens_per_expert)
                   if hybrid == "auto" and host.parallel else [])
        return StepPlan([], bookings, torch.arange(sets.shape[0], device=sets.device),
                        list(summary.needed), promote)
    device_rows = (~host_rows).nonzero().squeeze(1)
    host_rows = host_rows.nonzero().squeeze(1)
    device_sets = sets[device_rows]
    device_needed = _distinct(device_sets)
    waves = plan_waves(device_sets, device_needed, residency.num_slots, residency.slot_of)
    for wave in waves:  # rows of the device tokens → rows of the step
        wave.rows = device_rows if wave.rows is None else device_rows[wave.rows]
    host_sets = sets[host_rows]
    # promotions pay where the link works beside the host (a copy in the background); where
    # copies and host work share the cores a promotion only adds a copy and device waves
    promote = (_promotion(host_sets, residency, set(device_needed), summary.tokens_per_expert)
               if hybrid == "auto" and host.parallel else [])
    return StepPlan([w for w in waves if w.rows.numel()], bookings, host_rows,
                    _distinct(host_sets), promote)


def experts_for_host(summary: StepSummary, residency: Residency, hybrid: str,
                     host: ExpertCosts | None) -> list[int]:
    """The cold experts whose tokens go to the host: every one (``"host-only"``), or (``"auto"``)
    those that shorten the layer's critical path ``max(link, host)`` (``split_by_critical_path``)."""
    if hybrid == "off" or host is None:
        return []
    landing = summary.landing
    cold = [e for e in summary.needed if e not in residency.slot_of or e in landing]
    if hybrid == "host-only" or residency.num_slots == 0 or not cold:
        return cold  # (no slot at all: a layer that lives on the host)
    return split_by_critical_path(summary.expert_sets, cold, summary.tokens_per_expert, host,
                                  summary.link_backlog_s, residency.num_slots)


def split_by_critical_path(expert_sets: torch.Tensor, cold: list[int], tokens: list[int],
                           host: ExpertCosts, backlog_s: float = 0.0,
                           capacity: int | None = None) -> list[int]:
    """Greedy over the cold experts, fewest tokens first: send an expert's tokens (whole: with
    all their experts, resident ones included) to the host when that shortens the layer:
    ``max(device, host)`` where host work runs beside the device and the link
    (``host.parallel``), else ``device + host``. ``device`` = ``backlog_s`` (copies already on
    the link: a promotion, a prefetch) + load_s × the cold experts the device tokens still need
    + ``device_call_s`` × the waves they take (their distinct experts over ``capacity`` slots);
    ``host`` = ``host_call_s`` + Σ over the host's experts of host_s(its host tokens). Side by
    side, even an expert dearer on the host than one load can go there while the link has a
    queue. Every candidate on the host at once is tried too (one host call's fixed part can make
    the first expert alone look dear while all of them pay), and, where host and device share
    the cores, every token on the host (one call instead of the device's waves). The experts
    returned may then include resident ones: their tokens all go to the host."""
    rows = [[e for e in row if e >= 0] for row in expert_sets.tolist()]
    if len(rows) == 1:  # one token (batch-1 decode): all its experts on the host, or load
        return _one_token(rows[0], cold, tokens, host, backlog_s, capacity)
    rows_of: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        for e in row:
            rows_of.setdefault(e, []).append(i)
    def split() -> _HostSplit:
        return _HostSplit(rows, rows_of, cold, host, backlog_s, capacity)
    everything_loaded = split().value()
    # alone on the host it would already cost at least what loading every cold expert does
    candidates = sorted((e for e in cold if host.host_call_s + _host(host, tokens[e]) < everything_loaded),
                        key=lambda e: (tokens[e], e))
    greedy, every = split(), split()
    for e in candidates:
        greedy.try_add(e)
        every.try_add(e, force=True)
    choices = [greedy, every]
    if not host.parallel:
        # the host and the device are the same cores: one host call for every token may beat
        # a device wave for the tokens whose experts are resident (what a CPU-only box does)
        whole = split()
        for e in sorted(rows_of):
            whole.try_add(e, force=True)
        choices.append(whole)
    # ties (to float noise): the fewest tokens moved
    best = min(choices, key=lambda s: (round(s.value(), 12), len(s.on_host)))
    return sorted(best.chosen) if best.value() < everything_loaded else []


def _one_token(row: list[int], cold: list[int], tokens: list[int], host: ExpertCosts,
               backlog_s: float, capacity: int | None) -> list[int]:
    """``split_by_critical_path`` for one token, where the greedy's every choice is the same
    move (the token whole): its experts if the host's path is the shorter, else none. Returning
    them all lets ``plan_step`` skip its row split (a per-layer cost at batch 1)."""
    split = _HostSplit([row], {e: [0] for e in row}, cold, host, backlog_s, capacity)
    on_host = host.host_call_s + sum(_host(host, tokens[e]) for e in row)
    return sorted(row) if split._path(0, 0, on_host) < split.value() else []


class _HostSplit:
    """A growing choice of experts whose tokens go to the host, with the device's and the
    host's paths."""

    def __init__(self, rows: list[list[int]], rows_of: dict[int, list[int]], cold: list[int],
                 host: ExpertCosts, backlog_s: float, capacity: int | None) -> None:
        self.rows, self.rows_of, self.costs = rows, rows_of, host
        self.backlog_s, self.capacity = backlog_s, capacity
        self.cold = set(cold)
        self.on_host: set[int] = set()                       # token rows moved
        self.tokens: dict[int, int] = {}                     # expert → its tokens on the host
        self.device_rows = {e: len(r) for e, r in rows_of.items()}  # expert → device tokens
        self.device_experts = len(rows_of)
        self.needing_load = len(cold)
        self.host_s = 0.0
        self.chosen: list[int] = []

    def _path(self, needing_load: int, device_experts: int, host_s: float) -> float:
        costs = self.costs
        waves = -(-device_experts // self.capacity) if self.capacity and device_experts else 0
        device = (self.backlog_s + costs.load_s * needing_load
                  + getattr(costs, "device_call_s", 0.0) * waves)
        return max(device, host_s) if costs.parallel else device + host_s

    def value(self) -> float:
        return self._path(self.needing_load, self.device_experts, self.host_s)

    def try_add(self, expert: int, force: bool = False) -> None:
        if self.device_rows[expert] == 0:
            return  # its tokens went to the host with an earlier choice
        moving = [i for i in self.rows_of[expert] if i not in self.on_host]
        added: dict[int, int] = {}
        for i in moving:
            for f in self.rows[i]:
                added[f] = added.get(f, 0) + 1
        costs = self.costs
        extra = sum(_host(costs, self.tokens.get(f, 0) + n) - _host(costs, self.tokens.get(f, 0))
                    for f, n in added.items())
        if not self.chosen:
            extra += costs.host_call_s  # the host's one call of the step
        gone = [f for f, n in added.items() if self.device_rows[f] == n]  # no device token left
        freed = sum(1 for f in gone if f in self.cold)
        after = self._path(self.needing_load - freed, self.device_experts - len(gone),
                           self.host_s + extra)
        if not force and after >= self.value():
            return
        self.chosen.append(expert)
        self.on_host.update(moving)
        self.host_s += extra
        self.needing_load -= freed
        self.device_experts -= len(gone)
        for f, n in added.items():
            self.tokens[f] = self.tokens.get(f, 0) + n
            self.device_rows[f] -= n


def _host(costs: ExpertCosts, tokens: int) -> float:
    """One expert's host time for ``tokens`` tokens (none: not computed there)."""
    return costs.host_s(tokens) if tokens else 0.0


def _promotion(host_sets: torch.Tensor, residency: Residency, used: set[int],
               tokens: list[int]) -> list[int]:
    """The cold host expert most tokens of the step wanted, if an own slot can take it without
    evicting an expert the step used on the device (an empty slot, or an idle resident)."""
    cold = [e for e in _distinct(host_sets) if e not in residency.slot_of]
    if not cold or residency.own == 0:
        return []
    owned = [e for e, s in residency.slot_of.items() if s < residency.own]
    if len(owned) >= residency.own and all(e in used for e in owned):
        return []
    return [max(cold, key=lambda e: (tokens[e], -e))]


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


def prompt_step_loads(num_experts: int, top_k: int, own: int, capacity: int,
                      tokens: int) -> int:
    """The loads ``plan_waves`` takes for a prompt step of ``tokens`` tokens routed uniformly at
    random (a seeded draw), ``own`` experts resident and ``capacity`` slots (own + the staging
    rows the layer may use): what the expert-aware scheduler assumes before it has measured a
    prompt step. Waves are token-complete, so with fewer slots than the step's experts a cold
    expert is loaded once per wave that needs it, not once (8 experts, top-2, 2 slots, 128
    tokens: 28 loads, against 6 in one wave with 6 more rows)."""
    if own >= num_experts or tokens <= 0:
        return 0
    draw = torch.rand(tokens, num_experts, generator=torch.Generator().manual_seed(0))
    sets = draw.argsort(dim=1)[:, :top_k]
    waves = plan_waves(sets, sets.unique().tolist(), max(capacity, top_k),
                       {e: e for e in range(own)})
    return sum(len(w.loads) for w in waves)


def _bitmask(experts) -> int:
    """Bit e set for every expert id e >= 0 (−1 marks experts gating dropped)."""
    mask = 0
    for e in experts:
        if e >= 0:
            mask |= 1 << e
    return mask
