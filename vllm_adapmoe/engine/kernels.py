"""How the experts held in a layer's slots are computed.

Every kernel takes the same inputs: token activations ``x`` [T, H], the layer's slot tensors
(``w13`` as ``[S, 2I, H]`` = gate|up stacked, ``w2`` as ``[S, H, I]``, each in the kernel's own
layout, see ``pack``), float32 routing weights and int32 *slot* ids ``[T, k]``, and writes the
weighted sum of the token's experts into ``out`` [T, H]. Every id must name a filled slot (vLLM's
CPU kernel corrupts memory on an id of -1).

The engine ships two kernels that need torch alone:
  * ``ReferenceKernel`` — a plain per-expert loop: slow, obviously right, the yardstick of tests;
  * ``GroupedKernel``   — tokens sorted by slot, one GEMM pair per used slot on a contiguous
    chunk, one host sync per call: the engine's path on CUDA without vLLM.
The vLLM side registers the kernels stock vLLM itself runs (``register_kernel``), so inside
vLLM the slots are computed exactly as stock computes its experts (``models/kernels.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from vllm_adapmoe.engine.errors import AdapMoEConfigError


class ExpertKernel(Protocol):
    name: str

    def padded_intermediate(self, intermediate: int) -> int: ...

    def pack(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None: ...


class _PlainLayout:
    """Slots hold the checkpoint's layout unchanged."""

    def padded_intermediate(self, intermediate: int) -> int:
        return intermediate

    def pack(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return w13.contiguous(), w2.contiguous()


class ReferenceKernel(_PlainLayout):
    name = "reference"

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None:
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        for slot in topk_slots.unique().tolist():
            rows, col = (topk_slots == slot).nonzero(as_tuple=True)
            gate, up = (x[rows] @ w13[slot].t()).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ w2[slot].t()
            acc.index_add_(0, rows, y.float() * topk_weights[rows, col].unsqueeze(-1))
        out.copy_(acc)


class GroupedKernel(_PlainLayout):
    """Grouped GEMM in torch: (token, expert) pairs sorted by slot, each used slot's rows in one
    contiguous chunk, weighted outputs summed back in float32. The only host sync is the one
    list of per-slot counts; zero-weight pairs (gated tokens' dropped positions) are skipped."""

    name = "grouped"

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None:
        k = topk_slots.shape[1]
        slots = topk_slots.reshape(-1).long()
        weights = topk_weights.reshape(-1)
        slots = torch.where(weights != 0, slots, w13.shape[0])  # dropped pairs sort last
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=w13.shape[0] + 1).tolist()
        tokens = order // k
        xs = x[tokens]
        ys = torch.empty_like(xs)
        start = 0
        for slot, n in enumerate(counts[:-1]):
            if n:
                gate, up = (xs[start:start + n] @ w13[slot].t()).chunk(2, dim=-1)
                ys[start:start + n] = (F.silu(gate) * up) @ w2[slot].t()
                start += n
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        acc.index_add_(0, tokens[:start], ys[:start].float() * weights[order[:start]].unsqueeze(-1))
        out.copy_(acc)


KernelFactory = Callable[[torch.dtype, int, int], ExpertKernel]
# device type → the fused kernel of the serving stack on that device (registered by the vLLM side)
_FUSED: dict[str, KernelFactory] = {}


def register_kernel(device_type: str, factory: KernelFactory) -> None:
    """Make ``factory(dtype, hidden, intermediate)`` the ``"fused"`` kernel on ``device_type``;
    it raises ``AdapMoEConfigError`` when the shape or dtype does not suit it."""
    _FUSED[device_type] = factory


def make_kernel(choice: str, device: torch.device, dtype: torch.dtype, hidden: int,
                intermediate: int) -> ExpertKernel:
    """``"reference"``, ``"grouped"``, ``"fused"`` (the registered kernel; an error if there is
    none or it does not fit) or ``"auto"`` (fused where it fits, else grouped)."""
    if choice == "reference":
        return ReferenceKernel()
    if choice == "grouped":
        return GroupedKernel()
    factory = _FUSED.get(device.type)
    if factory is None:
        if choice == "fused":
            raise AdapMoEConfigError(
                f'adapmoe: kernel="fused" needs a fused MoE kernel for {device.type}, and none is '
                f'registered (it comes with vLLM); use "auto", "grouped" or "reference"')
        return GroupedKernel()
    try:
        return factory(dtype, hidden, intermediate)
    except AdapMoEConfigError:
        if choice == "fused":
            raise
        return GroupedKernel()
