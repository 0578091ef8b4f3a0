"""Which expert sits in which device slot, and whom to evict — bookkeeping only, no tensors.

The live cache (``cache.py``) and the trace simulator (``offline/simulator.py``) both run this
exact code, which is why a replayed trace reproduces the live hit/miss/load counters exactly.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable
from typing import Any

from vllm_adapmoe.engine.stats import LayerStats


class LRUPolicy:
    """Evict the resident expert used longest ago."""

    name = "lru"
    uses_router_mass = False  # True: ``observe`` wants the step's router weight per expert

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def touch(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def forget(self, expert: int) -> None:
        self._order.pop(expert, None)

    def victim(self, resident: Container[int], protected: set[int]) -> int:
        for expert in self._order:
            if expert not in protected and expert in resident:
                return expert
        raise RuntimeError("every slot holds an expert the current wave needs")

    def _lowest(self, resident: Container[int], protected: set[int],
                score: Callable[[int], Any]) -> int:
        """The unprotected resident expert with the lowest ``score`` (ties: least recently
        used), for the score-based subclasses."""
        recency = {e: i for i, e in enumerate(self._order)}
        candidates = [e for e in self._order if e in resident and e not in protected]
        if not candidates:
            raise RuntimeError("every slot holds an expert the current wave needs")
        return min(candidates, key=lambda e: (score(e), recency.get(e, -1)))

    def state(self) -> dict[str, Any]:
        return {"order": list(self._order)}

    def load_state(self, state: dict[str, Any]) -> None:
        self._order = OrderedDict((int(e), None) for e in state["order"])


class LFUPolicy(LRUPolicy):
    """Evict the resident expert used least often (ties: least recently used).

    Counts survive eviction: frequency is a property of the expert, not of its residency.
    """

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._count: dict[int, int] = {}

    def touch(self, expert: int) -> None:
        self._count[expert] = self._count.get(expert, 0) + 1
        super().touch(expert)

    def victim(self, resident: Container[int], protected: set[int]) -> int:
        return self._lowest(resident, protected, lambda e: self._count.get(e, 0))

    def state(self) -> dict[str, Any]:
        return {"order": list(self._order), "count": {str(e): c for e, c in self._count.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self._count = {int(e): int(c) for e, c in state.get("count", {}).items()}


class BeladyPolicy(LRUPolicy):
    """Offline optimum (for the simulator): evict the expert whose next use is furthest away.

    ``uses[e]`` are the sorted step indices at which expert e is needed; the simulator sets
    ``now`` before each step. Ties (never used again) fall back to LRU order.
    """

    name = "belady"

    def __init__(self, uses: dict[int, list[int]]) -> None:
        super().__init__()
        self.uses = uses
        self.now = -1

    def _next_use(self, expert: int) -> float:
        steps = self.uses.get(expert, [])
        i = bisect.bisect_right(steps, self.now)
        return steps[i] if i < len(steps) else float("inf")

    def victim(self, resident: Container[int], protected: set[int]) -> int:
        return self._lowest(resident, protected, lambda e: -self._next_use(e))  # furthest first


# Router weights reach the MRS score as integers (fixed point, 2^-20): a sum of integers is the
# same in any order, so the live engine (summing in its compiled graph) and the simulator
# (summing a trace in numpy) feed the policy identical numbers and make identical choices.
MASS_SCALE = 2 ** 20


class MRSPolicy(LRUPolicy):
    """Score-based eviction from what the router says (the idea of HybriMoE's MRS): every step
    of the layer, each expert's score decays by ``decay`` and gains the router weight the step's
    tokens gave it (their top-k weights, before gating); evict the lowest score (ties: LRU).

    An expert the router keeps favouring stays even if its last use was a few steps ago, and
    one used once by a single token at a small weight goes first.
    """

    name = "mrs"
    uses_router_mass = True

    def __init__(self, decay: float = 0.8) -> None:
        super().__init__()
        self.decay = decay
        # Stored scores are true scores × gain, gain = decay^-steps: a step touches only the
        # experts it routed to (not all E); rescaled before the gain could overflow.
        self._score: dict[int, float] = {}
        self._gain = 1.0

    def observe(self, mass: list[int]) -> None:
        """One step of the layer: ``mass[e]`` = its tokens' router weight on e, × MASS_SCALE."""
        self._gain /= self.decay
        if self._gain > 1e100:
            self._score = {e: v / self._gain for e, v in self._score.items()}
            self._gain = 1.0
        for e, m in enumerate(mass):
            if m:
                self._score[e] = self._score.get(e, 0.0) + m / MASS_SCALE * self._gain

    def victim(self, resident: Container[int], protected: set[int]) -> int:
        return self._lowest(resident, protected, lambda e: self._score.get(e, 0.0))

    def state(self) -> dict[str, Any]:
        return {"order": list(self._order), "gain": self._gain,
                "score": {str(e): v for e, v in self._score.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self._gain = float(state.get("gain", 1.0))
        self._score = {int(e): float(v) for e, v in state.get("score", {}).items()}


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy, "mrs": MRSPolicy}


def make_policy(name: str) -> LRUPolicy:
    return POLICIES[name]()


class SlotTable:
    """Slots ``0 .. own - 1`` are the layer's own; slots ``own .. num_slots - 1`` (if any) are
    rows of the model's shared staging area (``staging.py``): a layer with fewer own slots than
    a token has experts loads the rest there, and they hold nothing once its step ends (the
    next layer may overwrite them). Staging is used only when every own slot holds an expert
    the current wave needs, and never for a prefetch."""

    def __init__(self, num_slots: int, policy: LRUPolicy, stats: LayerStats,
                 own: int | None = None) -> None:
        self.num_slots = num_slots
        self.own = num_slots if own is None else own
        self.policy = policy
        self.stats = stats
        self.expert_in_slot: list[int] = [-1] * num_slots
        self.slot_of: dict[int, int] = {}
        self.prefetched: set[int] = set()  # prefetched, not yet checked against real routing
        # (hits + 1, needed + 2) over this table's life (not reset with the stats): how likely a
        # resident expert is to be needed again, i.e. what evicting one for a guess risks
        self.reuse_counts = [1, 2]
        # True while every expert ever placed went to the slot of its own id (e.g. every expert
        # resident): then expert ids are slot ids. Once false it stays false (cheap to keep).
        self.in_place = True

    def count_step(self, needed: list[int], mass: list[int] | None = None,
                   dropped: set[int] | frozenset[int] = frozenset()) -> None:
        """One step of this layer: hits/misses, each distinct needed expert once (as README's
        "Statistics" defines them; a booked prefetch is a hit), and what became of the
        prefetches booked for it: used (correct), cancelled before copying (``dropped``, by the
        live link) or not (wasted);
        ``mass`` (router weight per expert, fixed point) feeds a score-based policy."""
        if mass is not None:
            self.policy.observe(mass)
        hits = sum(1 for e in needed if e in self.slot_of)
        self.reuse_counts[0] += hits
        self.reuse_counts[1] += len(needed)
        self.stats.hits += hits
        self.stats.misses += len(needed) - hits
        kept = self.prefetched - dropped
        correct = len(kept.intersection(needed))
        self.stats.prefetch_correct += correct
        self.stats.prefetch_dropped += len(self.prefetched) - len(kept)
        self.stats.prefetch_wasted += len(kept) - correct
        self.prefetched.clear()

    @property
    def reuse(self) -> float:
        return self.reuse_counts[0] / self.reuse_counts[1]

    def prefetch(self, experts: list[int], keep: Iterable[int] = (),
                 evictable: set[int] | None = None) -> list[tuple[int, int]]:
        """Book ``experts`` ahead of need, most wanted first: into free slots, or by evicting a
        resident only for those in ``evictable`` (None: all), and never one of ``experts`` or
        ``keep`` (the target layer's other predicted experts). Returns the placements (loads)."""
        placed = self.admit(experts, self.prefetched.union(experts, keep), evictable)
        self.prefetched.update(e for e, _ in placed)
        self.stats.prefetch_issued += len(placed)
        return placed

    def admit(self, experts: list[int], protected: set[int] | None = None,
              evictable: set[int] | None = None) -> list[tuple[int, int]]:
        """Make room for every non-resident expert of ``experts`` (never evicting one of them,
        or of ``protected``); returns the new (expert, slot) placements, i.e. the loads to
        perform (counted here). With ``protected`` given (a prefetch), an expert that would need
        an eviction is skipped unless it is in ``evictable`` (None: all) and a victim exists."""
        optional = protected is not None
        protected = set(experts) if protected is None else protected
        placed = []
        for e in experts:
            if e not in self.slot_of:
                if optional and -1 not in self.expert_in_slot[:self.own] and (
                        (evictable is not None and e not in evictable)
                        or protected.issuperset(self._owned())):
                    continue
                slot = self._free_slot(protected, staging=not optional)
                self.place(e, slot)
                placed.append((e, slot))
            self.policy.touch(e)
        self.stats.loads += len(placed)
        return placed

    def promote(self, expert: int, used: set[int]) -> list[tuple[int, int]]:
        """Book ``expert`` (computed on the host this step) into an own slot: a free one, or the
        policy's victim among residents the step did not use. Returns the placement (a load,
        counted as one and as a promotion), or none when every own slot holds a used expert."""
        if expert in self.slot_of or self.own == 0:
            return []
        own = self.expert_in_slot[:self.own]
        if -1 not in own and used.issuperset(self._owned()):
            return []
        slot = self._free_slot(used, staging=False)
        self.place(expert, slot)
        self.policy.touch(expert)
        self.stats.loads += 1
        self.stats.promotions += 1
        return [(expert, slot)]

    def drop(self, expert: int) -> None:
        """Un-book ``expert`` if resident (its copy was cancelled): its slot is free again."""
        slot = self.slot_of.pop(expert, None)
        if slot is not None:
            self.expert_in_slot[slot] = -1
            self.policy.forget(expert)

    def clear(self) -> None:
        """Forget every resident expert (the slots' data stays; nothing is counted)."""
        for e in list(self.slot_of):
            self.policy.forget(e)
        self.expert_in_slot = [-1] * self.num_slots
        self.slot_of.clear()
        self.prefetched.clear()

    def place(self, expert: int, slot: int) -> None:
        self.expert_in_slot[slot] = expert
        self.slot_of[expert] = slot
        self.in_place = self.in_place and expert == slot and slot < self.own

    def release_staging(self) -> None:
        """End of the layer's step: what it loaded into shared staging rows is gone."""
        for slot in range(self.own, self.num_slots):
            expert = self.expert_in_slot[slot]
            if expert >= 0:
                self.drop(expert)

    def _owned(self) -> dict[int, int]:
        """Resident experts in the layer's own slots (expert → slot)."""
        if self.own == self.num_slots:
            return self.slot_of
        return {e: s for e, s in self.slot_of.items() if s < self.own}

    def _free_slot(self, protected: set[int], staging: bool = True) -> int:
        """An empty own slot, else the policy's victim among the unprotected own residents,
        else (``staging``: an on-demand load whose wave fills every own slot) a staging row."""
        own = self.expert_in_slot[:self.own]
        if -1 in own:
            return own.index(-1)
        owned = self._owned()
        if staging and protected.issuperset(owned):
            if -1 in self.expert_in_slot:
                return self.expert_in_slot.index(-1)
            owned = self.slot_of  # a later wave of the step: its staged experts make room
        victim = self.policy.victim(owned, protected)
        slot = self.slot_of.pop(victim)
        self.policy.forget(victim)
        self.expert_in_slot[slot] = -1
        self.stats.evictions += 1
        return slot

    def state(self) -> dict[str, Any]:
        return {"expert_in_slot": list(self.expert_in_slot), "policy": self.policy.state(),
                "reuse": list(self.reuse_counts)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.expert_in_slot = [int(e) for e in state["expert_in_slot"]]
        self.slot_of = {e: s for s, e in enumerate(self.expert_in_slot) if e >= 0}
        self.in_place = all(e == s and s < self.own for e, s in self.slot_of.items())
        self.policy.load_state(state["policy"])
        self.reuse_counts = [int(n) for n in state.get("reuse", [1, 2])]
