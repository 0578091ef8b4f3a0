"""Host tier: every expert of one MoE layer in host memory, in the compute kernel's layout.

A device load is then one contiguous copy per weight; on CUDA the host tensors are pinned so the
copy can run asynchronously on a side stream. Checkpoint shards arrive one weight at a time
(``w1``, ``w2``, ``w3`` per expert); an expert is packed into its row as soon as it is complete,
so loading never holds more than a few unpacked experts in memory, and never touches the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PackFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class HostExpertStore:
    def __init__(self, num_experts: int, hidden: int, intermediate: int, padded_intermediate: int,
                 dtype: torch.dtype, pack: PackFn, pin: bool) -> None:
        self.num_experts = num_experts
        self.hidden, self.intermediate = hidden, intermediate
        self._pack = pack
        # Explicit device="cpu": the model is built under the target device's context.
        self.w13 = torch.empty(num_experts, 2 * padded_intermediate, hidden, dtype=dtype,
                               device="cpu", pin_memory=pin)
        self.w2 = torch.empty(num_experts, hidden, padded_intermediate, dtype=dtype,
                              device="cpu", pin_memory=pin)
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._filled: set[int] = set()

    @property
    def expert_bytes(self) -> int:
        return (self.w13[0].numel() + self.w2[0].numel()) * self.w13.element_size()

    @property
    def complete(self) -> bool:
        return len(self._filled) == self.num_experts

    def put(self, expert: int, which: str, weight: torch.Tensor) -> None:
        """Take one checkpoint weight (``which`` in w1 = gate, w3 = up, w2 = down)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"checkpoint has expert {expert}, the config says {self.num_experts}")
        parts = self._pending.setdefault(expert, {})
        parts[which] = weight.to(device="cpu", dtype=self.w13.dtype)
        if len(parts) < 3:
            return
        del self._pending[expert]
        w13 = torch.cat([parts["w1"], parts["w3"]], dim=0)  # gate | up, as vLLM's w13
        packed13, packed2 = self._pack(w13, parts["w2"])
        self.w13[expert].copy_(packed13)
        self.w2[expert].copy_(packed2)
        self._filled.add(expert)

    def missing(self) -> list[int]:
        return sorted(set(range(self.num_experts)) - self._filled)
