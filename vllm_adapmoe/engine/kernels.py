"""How the experts held in a layer's slots are computed.

Every kernel takes the same inputs: token activations ``x`` [T, H], the layer's slot rows
(``ExpertRows``: ``w13`` ``[S, 2I, H]``, ``w2`` ``[S, H, I]``, biases where the family has them,
each in the kernel's own layout, see ``pack``), float32 routing weights and int32 *slot* ids
``[T, k]``, and writes the weighted sum of the token's experts into ``out`` [T, H]. A kernel is
built for one ``ExpertFormat`` (activation, biases). Every id must name a filled slot (vLLM's
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

from vllm_adapmoe.engine.errors import AdapMoEConfigError
from vllm_adapmoe.engine.expert_tensors import ExpertFormat, ExpertRows


class ExpertKernel(Protocol):
    name: str

    def padded_intermediate(self, intermediate: int) -> int: ...

    def pack(self, expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w: ExpertRows,
                 topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None: ...


class _PlainLayout:
    """Slots hold the checkpoint's layout unchanged."""

    def __init__(self, fmt: ExpertFormat = ExpertFormat()) -> None:
        self.fmt = fmt

    def padded_intermediate(self, intermediate: int) -> int:
        return intermediate

    def pack(self, expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.contiguous() for name, t in expert.items()}

    def _expert(self, x: torch.Tensor, w: ExpertRows, slot: int) -> torch.Tensor:
        """One expert's output for rows ``x`` (bias, then activation, as the fused kernels);
        quantized weights are dequantized into ``x``'s dtype first."""
        w13, w2 = w.dequantized(self.fmt, slot, x.dtype)
        b13, b2 = w.get("w13_bias"), w.get("w2_bias")
        h = x @ w13.t()
        if b13 is not None:
            h = h + b13[slot]
        y = self.fmt.activate(h) @ w2.t()
        return y + b2[slot] if b2 is not None else y


class ReferenceKernel(_PlainLayout):
    name = "reference"

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w: ExpertRows,
                 topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None:
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        for slot in topk_slots.unique().tolist():
            rows, col = (topk_slots == slot).nonzero(as_tuple=True)
            y = self._expert(x[rows], w, slot)
            acc.index_add_(0, rows, y.float() * topk_weights[rows, col].unsqueeze(-1))
        out.copy_(acc)


class GroupedKernel(_PlainLayout):
    """Grouped GEMM in torch: (token, expert) pairs sorted by slot, each used slot's rows in one
    contiguous chunk, weighted outputs summed per token in float32 in top-k order — the same
    sum wherever the experts sit. Each expert's GEMM is the BLAS's, which chooses its algorithm
    by row count: an expert given fewer rows by a wave than by the whole step can round a
    near-tie of bf16 the other way (one ulp; seen with MKL/oneDNN at 1 vs 2+ rows). The
    only host sync is the one list of per-slot counts; zero-weight pairs (gated tokens'
    dropped positions) are skipped. Quantized experts are dequantized per used slot (the
    engine's own path for checkpoints no fused kernel here takes)."""

    name = "grouped"

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w: ExpertRows,
                 topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None:
        k, num_slots = topk_slots.shape[1], w.num_rows
        slots = topk_slots.reshape(-1).long()
        weights = topk_weights.reshape(-1)
        slots = torch.where(weights != 0, slots, num_slots)  # dropped pairs sort last
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=num_slots + 1).tolist()
        tokens = order // k
        xs = x[tokens]
        ys = torch.empty_like(xs)
        start = 0
        for slot, n in enumerate(counts[:-1]):
            if n:
                ys[start:start + n] = self._expert(xs[start:start + n], w, slot)
                start += n
        pairs = torch.zeros((slots.numel(), x.shape[1]), dtype=torch.float32, device=out.device)
        pairs[order[:start]] = ys[:start].float() * weights[order[:start]].unsqueeze(-1)
        out.copy_(pairs.view(-1, k, x.shape[1]).sum(1))


KernelFactory = Callable[[torch.dtype, int, int, ExpertFormat], ExpertKernel]
# device type → the fused kernel of the serving stack on that device (registered by the vLLM side)
_FUSED: dict[str, KernelFactory] = {}


def register_kernel(device_type: str, factory: KernelFactory) -> None:
    """Make ``factory(dtype, hidden, intermediate, fmt)`` the ``"fused"`` kernel on
    ``device_type``; it raises ``AdapMoEConfigError`` when the shape, dtype or expert format
    does not suit it."""
    _FUSED[device_type] = factory


def make_kernel(choice: str, device: torch.device, dtype: torch.dtype, hidden: int,
                intermediate: int, fmt: ExpertFormat = ExpertFormat()) -> ExpertKernel:
    """``"reference"``, ``"grouped"``, ``"fused"`` (the registered kernel; an error if there is
    none or it does not fit) or ``"auto"`` (fused where it fits, else grouped)."""
    if choice == "reference":
        return ReferenceKernel(fmt)
    if choice == "grouped":
        return GroupedKernel(fmt)
    factory = _FUSED.get(device.type)
    if factory is None:
        if choice == "fused":
            raise AdapMoEConfigError(
                f'adapmoe: kernel="fused" needs a fused MoE kernel for {device.type}, and none is '
                f'registered (it comes with vLLM); use "auto", "grouped" or "reference"')
        return GroupedKernel(fmt)
    try:
        return factory(dtype, hidden, intermediate, fmt)
    except AdapMoEConfigError:
        if choice == "fused":
            raise
        return GroupedKernel(fmt)
