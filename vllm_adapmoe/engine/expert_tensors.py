"""What one expert is made of, and rows of experts stored as one stacked tensor per part.

An expert is a gated MLP. Its parts, one expert each, in the kernels' convention:
  * ``w13`` ``[2I, H]``: gate and up projections stacked as the activation reads them —
    halves ``[gate | up]`` for SiLU (Mixtral, Qwen, OLMoE, DeepSeek, GLM), rows interleaved
    ``gate, up, gate, up, ...`` for gpt-oss's clamped SwiGLU (``"swigluoai"``, vLLM's name);
  * ``w2`` ``[H, I]``: the down projection;
  * with biases (gpt-oss): ``w13_bias`` ``[2I]`` and ``w2_bias`` ``[H]``.

The host store, the device slots and the staging arena each keep one stacked tensor per part,
one row per expert (store) or slot (device): a load is one copy per part, and any kernel reads
the rows it is given. Quantized formats would add their scales as further parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

ACTIVATIONS = ("silu", "swigluoai")


@dataclass(frozen=True)
class ExpertFormat:
    """A family's expert: its activation (``"silu"`` or ``"swigluoai"``, whose clamp ``limit``
    and sigmoid slope ``alpha`` are gpt-oss's config values) and whether it has biases."""

    activation: str = "silu"
    bias: bool = False
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"adapmoe: unsupported expert activation {self.activation!r} "
                             f"(supported: {', '.join(ACTIVATIONS)})")

    @property
    def interleaved(self) -> bool:
        """``w13`` rows alternate gate and up (else: gate half, then up half)."""
        return self.activation == "swigluoai"

    def part_shapes(self, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
        """One expert's part shapes (``intermediate``: as the kernel stores it, padded)."""
        shapes = {"w13": (2 * intermediate, hidden), "w2": (hidden, intermediate)}
        if self.bias:
            shapes.update(w13_bias=(2 * intermediate,), w2_bias=(hidden,))
        return shapes

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` = x·w13ᵀ (+ bias), ``[T, 2I]`` → the activation's ``[T, I]`` (torch reference)."""
        if not self.interleaved:
            gate, up = h.chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up
        gate = h[..., ::2].clamp(max=self.limit)
        up = h[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(self.alpha * gate))


class ExpertRows:
    """Named parts, each a tensor ``[rows, *one expert's shape]``: the store's experts, a
    layer's slots or a view of the staging arena."""

    def __init__(self, parts: dict[str, torch.Tensor]) -> None:
        if "w13" not in parts or "w2" not in parts:
            raise ValueError("adapmoe: an expert needs at least w13 and w2")
        self.parts = parts

    @classmethod
    def zeros(cls, rows: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
              device: torch.device | str, pin: bool = False) -> ExpertRows:
        return cls({name: torch.zeros((rows, *shape), dtype=dtype, device=device, pin_memory=pin)
                    for name, shape in shapes.items()})

    @classmethod
    def like(cls, other: ExpertRows, rows: int, device: torch.device | str) -> ExpertRows:
        """Zeroed rows with ``other``'s parts and shapes."""
        return cls({name: torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=device)
                    for name, t in other.items()})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.parts[name]

    def get(self, name: str) -> torch.Tensor | None:
        return self.parts.get(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.parts.items())

    @property
    def w13(self) -> torch.Tensor:
        return self.parts["w13"]

    @property
    def w2(self) -> torch.Tensor:
        return self.parts["w2"]

    @property
    def num_rows(self) -> int:
        return self.w13.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.w13.dtype

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one expert, every part): what a load copies."""
        return sum(t[0].numel() * t.element_size() for t in self.parts.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape[1:]) for name, t in self.parts.items()}

    def tail(self, start: int) -> ExpertRows:
        """Rows ``start ..`` (views)."""
        return ExpertRows({name: t[start:] for name, t in self.parts.items()})

    def copy_row(self, row: int, src: ExpertRows, src_row: int) -> None:
        """Row ``row`` ← ``src``'s row ``src_row``, part by part (asynchronous from pinned
        host memory on CUDA)."""
        for name, t in self.parts.items():
            t[row].copy_(src.parts[name][src_row], non_blocking=True)

    def set_row(self, row: int, expert: dict[str, torch.Tensor]) -> None:
        """Row ``row`` ← one expert's parts (already in this layout)."""
        if expert.keys() != self.parts.keys():
            raise ValueError(f"adapmoe: expert parts {sorted(expert)} do not match the store's "
                             f"{sorted(self.parts)}")
        for name, t in self.parts.items():
            t[row].copy_(expert[name])
