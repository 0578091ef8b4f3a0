"""One layer's look-ahead: guessing the experts of the layers after it from its own MoE input.

For each layer d = 1 .. ``prefetch_lookahead`` ahead, the guess is that layer's router applied to
this layer's input, or a fitted map (``offline/predictor.py``; the block keeps it as a buffer, so
a compiled graph reads it like a weight) where calibration found it better; the guessed routing goes
through the target's own gating rule. Only decode tokens' guesses count (a prefill chunk needs
nearly every expert anyway). The guesses become tokens per expert for the planner
(``plan.py``), which decides what pays for a copy; while a routing trace is recorded, every
token's guess is recorded too (the simulator replays them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_adapmoe.engine.plan import PrefetchBooking, Target
from vllm_adapmoe.engine.prefetch import expert_counts, predicted_expert_sets

if TYPE_CHECKING:
    from vllm_adapmoe.engine.block import AdapMoEBlock
    from vllm_adapmoe.engine.step import StepInfo


class LookAhead:
    """A plain object, not a module: the block reads it on every step's hot path.

    ``prefetch`` is the setting (a trace recorded with it keeps every distance's guess);
    ``guessing`` whether steps guess at all: not where no guess can pay for its copy (copies
    inline on the computing cores with the link cost measured: ``LinkCost.min_probability`` is
    infinite there), so such a machine does not pay the look-ahead routers every layer."""

    def __init__(self, prefetch: bool, guessing: bool = True) -> None:
        self.prefetch = prefetch
        self.guessing = prefetch and guessing
        self.targets: list[AdapMoEBlock] = []  # the look-ahead layers, nearest first (wired by the model)
        self.maps: dict[int, torch.Tensor] = {}  # distance → fitted map [H + 1, E] (the block's buffers)

    def logits(self, x: torch.Tensor, depth: int, target: AdapMoEBlock) -> torch.Tensor:
        """The guess of ``target``'s router logits (``depth`` layers ahead) from this input."""
        fitted = self.maps.get(depth)
        if fitted is None:
            return target.router_logits(x)
        return torch.addmm(fitted[-1], x.to(fitted.dtype), fitted[:-1])

    def predicted_sets(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per target, [T, k'] guessed experts per token (−1: its gating drops one); tensor
        math for ``prepare`` (compiled with the router)."""
        if not self.guessing:
            return []
        out = []
        for depth, target in enumerate(self.targets, 1):
            weights, ids = target.route(self.logits(x, depth, target))
            out.append(predicted_expert_sets(weights, ids, target.gating))
        return out

    def guesses(self, x: torch.Tensor, counts: list[int], predicted: torch.Tensor,
                step: StepInfo) -> dict[int, list[int]]:
        """Decode tokens per expert of each target: from ``counts`` (``prepare``'s per-target
        counts over all tokens, laid end to end) when every token decodes, else from
        ``predicted`` restricted to the decode rows."""
        if not step.counted or not self.targets:
            return {}
        if step.trace is not None:
            return self._record(x, step)
        if not self.guessing:
            return {}
        if not step.all_decode:
            rows = step.decode_row_indices()
            if rows.numel() == 0:
                return {}  # no decode token this step: prefill needs every expert anyway
            predicted = predicted[rows]
        out, offset, column = {}, 0, 0
        for depth, target in enumerate(self.targets, 1):
            n, k = target.num_experts, target.top_k
            out[depth] = (counts[offset:offset + n] if step.all_decode
                          else expert_counts(predicted[:, column:column + k], n).tolist())
            offset, column = offset + n, column + k
        return out

    def planning_targets(self, guesses: dict[int, list[int]]) -> list[Target]:
        return [Target(depth, target.cache.table, target.predictions.score(depth))
                for depth, target in enumerate(self.targets, 1) if depth in guesses]

    def expect(self, bookings: list[PrefetchBooking], all_decode: bool) -> None:
        """Pure-decode steps score the guesses against the target's routing when it runs."""
        if all_decode:
            for booking in bookings:
                self.targets[booking.depth - 1].predictions.expect(booking.depth, booking.named)

    def _record(self, x: torch.Tensor, step: StepInfo) -> dict[int, list[int]]:
        """While a trace is recorded: every row's guess at each distance (only one layer ahead
        without prefetch), and (with prefetch) the decode rows' counts."""
        decode = None if step.all_decode else step.decode_row_indices()
        out = {}
        for depth, target in enumerate(self.targets, 1):
            if depth > 1 and not self.prefetch:
                break
            weights, ids = target.route(self.logits(x, depth, target))
            step.trace.record_prediction(target.layer_idx, weights, ids, depth)
            if decode is not None:
                if decode.numel() == 0:
                    continue
                weights, ids = weights[decode], ids[decode]
            if self.prefetch:
                sets = predicted_expert_sets(weights, ids, target.gating)
                out[depth] = expert_counts(sets, target.num_experts).tolist()
        return out
