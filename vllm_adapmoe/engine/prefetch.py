"""Cross-layer prefetch: guess layer l+d's experts during layer l and start loading them.

While layer l runs, layer l+d's router (d = 1 .. ``prefetch_lookahead``) is applied to layer
l's MoE input for every decode token of the step (hidden states change little between nearby
layers, so the guess is often right). The guessed routing goes through layer l+d's own gating
rule. An expert guessed for c tokens is booked only if it pays for its copy: with the guess's
measured precision a (``PredictionScore``, per target layer and distance), it is needed with
probability p = 1 − (1 − a)^c; a right guess saves up to d layers of stall, a wrong one costs
the link one load, r layers (``LinkCost``), so it is issued when p·min(r, d) ≥ (1 − p)·r — into
a free slot; evicting a resident that the layer needs again with probability q costs q·r more.
Booked guesses (most-requested first, at most the target's slots) queue behind on-demand copies on the
same link. Layer l+d's real routing stays authoritative: a wrong guess costs bandwidth and
maybe an eviction, never correctness.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_adapmoe.engine.gating import AdaptiveGate
from vllm_adapmoe.engine.slot_table import MASS_SCALE, SlotTable

if TYPE_CHECKING:
    from vllm_adapmoe.engine.link import LinkCost


def predicted_expert_sets(weights: torch.Tensor, ids: torch.Tensor, gate: AdaptiveGate) -> torch.Tensor:
    """[T, k] experts the target layer would need for these predicted decode-token routings
    (top-k ``weights``/``ids`` from its router); −1 where its gating would drop one. The same
    sets as ``Routing.gated(...).expert_sets``, without building the kernel's arguments."""
    if not gate.applies():
        return ids
    sorted_weights, order = weights.sort(dim=1, descending=True)
    keep = gate.experts_per_token(sorted_weights, None)
    dropped = torch.arange(ids.shape[1], device=ids.device) >= keep[:, None]
    return ids.gather(1, order).masked_fill(dropped, -1)


def expert_counts(expert_sets: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many tokens of ``expert_sets`` [T, k] need each expert (−1 ignored).
    A compare-and-sum, not ``bincount``/scatter: traceable with a dynamic T, and inductor fuses
    it into one reduction kernel with the routing ops around it."""
    experts = torch.arange(num_experts, device=expert_sets.device, dtype=expert_sets.dtype)
    return (expert_sets.unsqueeze(-1) == experts).sum((0, 1))


def expert_mass(weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: the router weight ``weights`` [T, k] gives each expert, summed over tokens, in
    fixed point (× ``MASS_SCALE``, rounded per token): what a score-based eviction observes."""
    experts = torch.arange(num_experts, device=ids.device, dtype=ids.dtype)
    fixed = (weights.float() * MASS_SCALE).round().to(torch.int64)
    return (fixed.unsqueeze(-1) * (ids.unsqueeze(-1) == experts)).sum((0, 1))


def rank_prefetch(counts: list[int], capacity: int, precision: float = 1.0,
                  min_probability: float = 0.0) -> list[int]:
    """``counts[e]``: predicted tokens needing expert e → the experts to book, most requested
    first (ties: lower id), at most ``capacity``, and only those that pay: an expert predicted
    for c tokens is used with probability 1 − (1 − precision)^c (each prediction right with
    the predictor's measured ``precision``), which must reach ``min_probability``."""
    ranked = sorted((e for e, c in enumerate(counts) if c), key=lambda e: (-counts[e], e))
    return [e for e in ranked[:capacity] if use_probability(precision, counts[e]) >= min_probability]


def use_probability(precision: float, count: int) -> float:
    """Chance an expert guessed for ``count`` tokens is needed, each guess right with ``precision``."""
    return 1 - (1 - precision) ** count


def worth_prefetching(counts: list[int], table: SlotTable, score: PredictionScore,
                      cost: LinkCost, depth: int) -> tuple[list[int], set[int]]:
    """(guesses worth a free slot, those of them also worth evicting a resident for): the
    pay-off rule without and with the risk that the evicted expert is needed again."""
    issue = rank_prefetch(counts, table.own, score.precision, cost.min_probability(depth))
    # the bar with reuse is never lower, so the evicting guesses are a subset of ``issue``
    bar = cost.min_probability(depth, table.reuse)
    return issue, {e for e in issue if use_probability(score.precision, counts[e]) >= bar}


class PredictionScore:
    """How often one predictor (layer l+d's router on layer l's input) named an expert the
    target layer then needed, over pure-decode steps; starts at 1 of 2 (precision 0/1 would
    otherwise stick after one step). Live and simulator feed it the same sets."""

    def __init__(self) -> None:
        self.right, self.named = 1, 2

    @property
    def precision(self) -> float:
        return self.right / self.named

    def state(self) -> list[int]:
        return [self.right, self.named]

    def load_state(self, state: list[int]) -> None:
        self.right, self.named = int(state[0]), int(state[1])

    def observe(self, predicted: list[int], needed: list[int]) -> None:
        self.named += len(predicted)
        self.right += len(set(predicted).intersection(needed))


class PredictionLog:
    """Of one layer: how well the layers looking ahead at it guess it, per distance (1: the layer
    before), and what they guessed for the current pure-decode step, scored once it has routed."""

    def __init__(self) -> None:
        self.scores: dict[int, PredictionScore] = {}
        self._named: dict[int, list[int]] = {}

    def score(self, depth: int) -> PredictionScore:
        return self.scores.setdefault(depth, PredictionScore())

    def expect(self, depth: int, named: list[int]) -> None:
        self._named[depth] = named

    def observe(self, needed: list[int]) -> None:
        for depth, named in self._named.items():
            self.scores[depth].observe(named, needed)
        self._named.clear()
