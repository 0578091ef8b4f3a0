"""Host tier: every expert of one MoE layer in host memory, in the compute kernel's layout.

A device load is then one contiguous copy per part (``expert_tensors.py``); on CUDA the host
tensors are pinned so the copy can run asynchronously on a side stream. Checkpoint shards arrive
one weight at a time — ``w1`` (gate), ``w3`` (up), ``w2`` (down) per expert, or ``w13`` already
stacked (gpt-oss), and biases where the family has them; an expert is packed into its row as
soon as it is complete, so loading never holds more than a few unpacked experts in memory, and
never touches the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_adapmoe.engine.expert_tensors import ExpertFormat, ExpertRows, quantize_block

PackFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class HostExpertStore:
    def __init__(self, num_experts: int, hidden: int, intermediate: int, padded_intermediate: int,
                 dtype: torch.dtype, pack: PackFn, pin: bool,
                 fmt: ExpertFormat = ExpertFormat(), quantize_at_load: bool = False) -> None:
        self.num_experts = num_experts
        self.hidden, self.intermediate = hidden, intermediate
        self.fmt = fmt
        self.dtype = dtype  # the model's: activations, and weights unless quantized
        self._pack = pack
        # unquantized checkpoint weights into an FP8 store (``expert_dtype``): quantized here,
        # once, with the offline tool's rule
        if quantize_at_load and fmt.quant != "fp8-block":
            raise ValueError(f"adapmoe: quantizing at load makes FP8 block experts, not {fmt.quant}")
        self.quantize_at_load = quantize_at_load
        # Explicit device="cpu": the model is built under the target device's context.
        self.rows = ExpertRows.zeros(
            num_experts, fmt.part_shapes(hidden, padded_intermediate, dtype), "cpu", pin)
        self._biases = {"w13_bias", "w2_bias"} if fmt.bias else set()
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._filled: set[int] = set()

    @property
    def expert_bytes(self) -> int:
        return self.rows.row_bytes

    @property
    def complete(self) -> bool:
        return len(self._filled) == self.num_experts

    def put(self, expert: int, which: str, weight: torch.Tensor) -> None:
        """Take one checkpoint weight of ``expert``: ``which`` in w1 = gate, w3 = up, w2 = down,
        w13 = gate and up already stacked as the activation reads them, w13_bias, w2_bias, and
        for quantized experts w1_scale, w3_scale (or w13_scale), w2_scale (stored as they
        come: no dequantization on the load path)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"checkpoint has expert {expert}, the config says {self.num_experts}")
        if self.quantize_at_load and which in ("w1", "w3", "w2"):
            weight, scale = quantize_block(weight, self.fmt.block)
            self._take(expert, f"{which}_scale", scale)
        self._take(expert, which, weight)

    def _take(self, expert: int, which: str, weight: torch.Tensor) -> None:
        scales = {"w1_scale", "w3_scale", "w13_scale", "w2_scale"} if self.fmt.quant else set()
        if which not in ("w1", "w2", "w3", "w13") and which not in self._biases | scales:
            raise ValueError(f"adapmoe: the checkpoint has an expert tensor ({which}) this "
                             f"model's experts do not have ({self.fmt})")
        target = self.rows[{"w1": "w13", "w3": "w13", "w1_scale": "w13_scale",
                            "w3_scale": "w13_scale"}.get(which, which)]
        parts = self._pending.setdefault(expert, {})
        parts[which] = weight.to(device="cpu", dtype=target.dtype)
        if not parts.keys() >= self._needed(parts):
            return
        del self._pending[expert]
        if "w13" not in parts:  # gate | up, as vLLM's w13 (and their block scales alike)
            parts["w13"] = torch.cat([parts.pop("w1"), parts.pop("w3")], dim=0)
        if "w1_scale" in parts:
            parts["w13_scale"] = torch.cat([parts.pop("w1_scale"), parts.pop("w3_scale")], dim=0)
        self.rows.set_row(expert, self._pack(parts))
        self._filled.add(expert)

    def _needed(self, parts: dict[str, torch.Tensor]) -> set[str]:
        """The checkpoint tensors that complete one expert: gate and up stacked already
        (gpt-oss) or one tensor each, their scales alike, the down projection, biases."""
        gate_up = ["w13"] if parts.keys() & {"w13", "w13_scale"} else ["w1", "w3"]
        weights = [*gate_up, "w2"]
        return set(weights) | self._biases | (
            {f"{w}_scale" for w in weights} if self.fmt.quant else set())

    def missing(self) -> list[int]:
        return sorted(set(range(self.num_experts)) - self._filled)
