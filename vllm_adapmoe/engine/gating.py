"""AdapMoE's sensitivity-based adaptive gating: per token and layer, how many experts to keep.

Dropping a token's trailing experts (lowest weights) changes the layer output by
Δy = y − y', and a Fisher estimate of the loss change is ΔL ≈ ½·(Σ dropped w)²·S_l, with S_l the
layer's sensitivity measured by ``adapmoe calibrate`` (see ``calibrate.py``). Rule: drop the
trailing experts while (sum of their weights)² · S_l < T. For Mixtral's top-2 that is the
paper's rule — use only expert 1 when w2² · S_l < T. T = 0 keeps stock top-k. Kept weights are
renormalised to sum to 1 (top-1 tokens get weight 1 on expert 1).
"""

from __future__ import annotations

import torch


class AdaptiveGate:
    def __init__(self, threshold: float, sensitivity: float, gate_prefill: bool,
                 device: torch.device | None = None) -> None:
        # (T, S_l) also as a tensor, which the rule reads: a compiled graph captures tensors by
        # reference, so a threshold changed at run time (``set_gating``) takes effect there
        # without recompiling (a Python float would be frozen into the graph).
        self.params = torch.zeros(2, dtype=torch.float32, device=device)
        self.threshold = threshold
        self.sensitivity = sensitivity
        self.gate_prefill = gate_prefill
        # Whether a compiled graph evaluates the rule: decided once, at build (a graph cannot
        # follow a Python flag that changes later). Off (built at T = 0), the step gates
        # eagerly if a threshold is set later (``set_gating``), which is correct but slower.
        self.in_graph = threshold > 0

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = float(value)
        self._set_param(0, value)

    @property
    def sensitivity(self) -> float:
        return self._sensitivity

    @sensitivity.setter
    def sensitivity(self, value: float) -> None:
        self._sensitivity = float(value)
        self._set_param(1, value)

    def _set_param(self, i: int, value: float) -> None:
        with torch.inference_mode():  # the tensor may have been made in inference mode
            self.params[i] = value

    @property
    def active(self) -> bool:
        return self.threshold > 0

    def applies(self) -> bool:
        """Whether to evaluate the rule: inside a compiled graph, if built with gating (whatever
        the threshold is later; at T = 0 the rule keeps every expert); eagerly, while on."""
        return self.in_graph if torch.compiler.is_compiling() else self.active

    def experts_per_token(self, sorted_weights: torch.Tensor,
                          decode_mask: torch.Tensor | None) -> torch.Tensor:
        """``sorted_weights`` [T, k] in descending order → kept experts per token [T] (1..k).

        ``decode_mask`` [T] marks decode tokens; None means every token may be gated.
        """
        k = sorted_weights.shape[1]
        # tail[:, j] = weight of experts j..k-1, for j = 1..k-1 (shrinks as j grows, so the
        # droppable positions form a suffix and their count is how many experts to drop)
        tail = (sorted_weights[:, 1:] if k == 2  # one trailing expert: its tail is itself
                else sorted_weights.flip(1).cumsum(1).flip(1)[:, 1:])
        droppable = tail.square() * self.params[1] < self.params[0]
        keep = k - droppable.sum(1)
        if decode_mask is not None and not self.gate_prefill:
            keep = torch.where(decode_mask, keep, torch.full_like(keep, k))
        return keep
