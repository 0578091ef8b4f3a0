"""What one expert is made of, and rows of experts stored as one stacked tensor per part.

An expert is a gated MLP. Its parts, one expert each, in the kernels' convention:
  * ``w13`` ``[2I, H]``: gate and up projections stacked as the activation reads them —
    halves ``[gate | up]`` for SiLU (Mixtral, Qwen, OLMoE, DeepSeek, GLM), rows interleaved
    ``gate, up, gate, up, ...`` for gpt-oss's clamped SwiGLU (``"swigluoai"``, vLLM's name);
  * ``w2`` ``[H, I]``: the down projection;
  * with biases (gpt-oss): ``w13_bias`` ``[2I]`` and ``w2_bias`` ``[H]``;
  * quantized (``ExpertFormat.quant``): ``w13``/``w2`` stay as the checkpoint stores them —
    FP8 e4m3 (DeepSeek-V3's block format), INT4 packed into int32 (compressed-tensors'
    ``pack-quantized``) or MXFP4 bytes (gpt-oss) — with ``w13_scale`` ``[2·⌈I/b0⌉, ⌈H/b1⌉]``
    (the gate half's scale rows, then the up half's; interleaved rows for gpt-oss) and
    ``w2_scale`` ``[⌈H/b0⌉, ⌈I/b1⌉]``: one scale per b0×b1 block (float32, or MXFP4's e8m0
    bytes; the checkpoint's ``weight_scale_inv`` / ``weight_scale`` / ``_scales``).

The host store, the device slots and the staging arena each keep one stacked tensor per part,
one row per expert (store) or slot (device): a load is one copy per part — weights and scales
together, so a slot can never hold one expert's weights with another's scales — and any kernel
reads the rows it is given.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

ACTIVATIONS = ("silu", "swigluoai")
QUANTS = (None, "fp8-block", "int4-group", "mxfp4")
INT4_PER_INT32 = 8
E4M3_MAX = 448.0  # float8 e4m3's largest finite value
MX_BLOCK = 32  # values per MXFP4 scale (the OCP microscaling block)
Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class ExpertFormat:
    """A family's expert: its activation (``"silu"`` or ``"swigluoai"``, whose clamp ``limit``
    and sigmoid slope ``alpha`` are gpt-oss's config values), whether it has biases, and how
    the checkpoint stores its weights (``quant``):
      * None: in the model dtype;
      * ``"fp8-block"``: float8 e4m3, one float32 scale per ``block`` = (rows, cols) tile;
      * ``"int4-group"``: symmetric 4-bit integers packed eight to an int32 along the input
        dimension (value ``v`` stored as ``v + 8`` in bits ``4j..4j+3`` of word ``⌊c/8⌋``,
        ``j = c mod 8``: compressed-tensors' ``pack-quantized``), one scale per ``block`` =
        (1, group) run of a row; weight = scale · v. Scales are kept as float32 (exact for
        any source dtype);
      * ``"mxfp4"`` (gpt-oss's released checkpoints): FP4 e2m1 values two to a byte (column
        2k in the low nibble of byte k, 2k+1 in the high one), one e8m0 scale byte ``s`` per
        (1, 32) block of a row: weight = value · 2^(s − 127). Scales stay bytes.
    """

    activation: str = "silu"
    bias: bool = False
    alpha: float = 1.702
    limit: float = 7.0
    quant: str | None = None
    block: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"adapmoe: unsupported expert activation {self.activation!r} "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        if self.quant not in QUANTS:
            raise ValueError(f"adapmoe: unsupported expert quantization {self.quant!r}")
        if self.quant and self.interleaved and self.block[0] != 1:  # a block would mix gate/up
            raise ValueError("adapmoe: swigluoai experts need scales of (1, n) blocks")
        if self.quant in ("int4-group", "mxfp4") and self.block[0] != 1:
            raise ValueError(f"adapmoe: {self.quant} scales cover (1, n) runs of a row")

    @property
    def interleaved(self) -> bool:
        """``w13`` rows alternate gate and up (else: gate half, then up half)."""
        return self.activation == "swigluoai"

    def weight_shape(self, rows: int, cols: int, dtype: torch.dtype
                     ) -> tuple[tuple[int, ...], torch.dtype]:
        """How a ``[rows, cols]`` weight is stored (``dtype``: the model's)."""
        if self.quant == "int4-group":
            if cols % INT4_PER_INT32:
                raise ValueError(f"adapmoe: int4 experts need input sizes divisible by "
                                 f"{INT4_PER_INT32} (got {cols})")
            return (rows, cols // INT4_PER_INT32), torch.int32
        if self.quant == "mxfp4":
            if cols % MX_BLOCK:
                raise ValueError(f"adapmoe: mxfp4 experts need input sizes divisible by "
                                 f"{MX_BLOCK} (got {cols})")
            return (rows, cols // 2), torch.uint8
        return (rows, cols), torch.float8_e4m3fn if self.quant else dtype

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.uint8 if self.quant == "mxfp4" else torch.float32

    def blocks(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape of a ``[rows, cols]`` weight's scales: one per (partial) block."""
        return -(-rows // self.block[0]), -(-cols // self.block[1])

    def part_shapes(self, hidden: int, intermediate: int, dtype: torch.dtype) -> Shapes:
        """One expert's parts: (shape, dtype) each (``intermediate``: as the kernel stores it,
        padded; ``dtype``: the model's)."""
        shapes = {"w13": self.weight_shape(2 * intermediate, hidden, dtype),
                  "w2": self.weight_shape(hidden, intermediate, dtype)}
        if self.bias:
            shapes.update(w13_bias=((2 * intermediate,), dtype), w2_bias=((hidden,), dtype))
        if self.quant:  # w13_scale: the gate half's scale rows, then the up half's
            (bi, bh), (bh2, bi2) = self.blocks(intermediate, hidden), self.blocks(hidden, intermediate)
            shapes.update(w13_scale=((2 * bi, bh), self.scale_dtype),
                          w2_scale=((bh2, bi2), self.scale_dtype))
        return shapes

    def expert_bytes(self, hidden: int, intermediate: int, itemsize: int) -> int:
        """Bytes of one expert, every part (``itemsize``: the model dtype's)."""
        model_dtype = {2: torch.bfloat16, 4: torch.float32}[itemsize]  # only sizes matter
        return sum(math.prod(shape) * d.itemsize
                   for shape, d in self.part_shapes(hidden, intermediate, model_dtype).values())

    def describe(self, dtype: torch.dtype) -> str:
        """For the start-up log: how the experts are stored and computed."""
        weights = {None: str(dtype).removeprefix("torch."),
                   "fp8-block": f"FP8 e4m3 + {self.block[0]}x{self.block[1]} block scales",
                   "int4-group": f"INT4 (packed int32) + group-{self.block[1]} scales",
                   "mxfp4": "MXFP4 (e2m1 + e8m0 scales per 32)"}[self.quant]
        return (weights + (" + biases" if self.bias else "")
                + (f", {self.activation}" if self.activation != "silu" else ""))

    def dequantize(self, w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One stored weight and its scales → ``[R, C]`` in ``dtype`` (``w13``: FP8 blocks that
        straddle the gate/up boundary are dequantized per half, each with its own scale rows).
        Codes become float32 and are multiplied by float32 scales, then rounded once."""
        v = {"int4-group": _int4_codes, "mxfp4": _fp4_values}.get(self.quant, _fp8_values)(w)
        if self.quant == "mxfp4":  # e8m0: a power of two
            scale = torch.exp2(scale.float() - 127)
        (b0, b1), (r, c) = self.block, v.shape
        if r % b0 == 0 and c % b1 == 0:  # whole tiles: broadcast the scales, no expanded copy
            tiles = v.view(r // b0, b0, c // b1, b1).mul_(scale[:, None, :, None])
            return tiles.view(r, c).to(dtype)
        full = scale.repeat_interleave(b0, 0)[:r].repeat_interleave(b1, 1)[:, :c]
        return v.mul_(full).to(dtype)

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
    def zeros(cls, rows: int, shapes: Shapes, device: torch.device | str,
              pin: bool = False) -> ExpertRows:
        return cls({name: torch.zeros((rows, *shape), dtype=dtype, device=device, pin_memory=pin)
                    for name, (shape, dtype) in shapes.items()})

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

    def dequantized(self, fmt: ExpertFormat, row: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) of ``row`` in ``dtype``: the weights themselves, or dequantized."""
        w13, w2 = self.w13[row], self.w2[row]
        if fmt.quant is None:
            return w13, w2
        inter, s13 = w13.shape[0] // 2, self.parts["w13_scale"][row]
        down = fmt.dequantize(w2, self.parts["w2_scale"][row], dtype)
        if inter % fmt.block[0] == 0:  # no block straddles gate and up: one call
            return fmt.dequantize(w13, s13, dtype), down
        half = s13.shape[0] // 2
        gate = fmt.dequantize(w13[:inter], s13[:half], dtype)
        up = fmt.dequantize(w13[inter:], s13[half:], dtype)
        return torch.cat([gate, up]), down

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one expert, every part): what a load copies."""
        return sum(math.prod(t.shape[1:]) * t.element_size() for t in self.parts.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape[1:]) for name, t in self.parts.items()}

    def tail(self, start: int) -> ExpertRows:
        """Rows ``start ..`` (views)."""
        return ExpertRows({name: t[start:] for name, t in self.parts.items()})

    def copy_row(self, row: int, src: ExpertRows, src_row: int) -> None:
        """Row ``row`` ← ``src``'s row ``src_row``, part by part (asynchronous from pinned
        host memory on CUDA)."""
        for name, t in self.parts.items():
            dst, part = t[row], src.parts[name][src_row]
            if _plain_cpu_pair(dst, part):
                _copy_off_openmp(dst, part)
            else:
                dst.copy_(part, non_blocking=True)

    def set_row(self, row: int, expert: dict[str, torch.Tensor]) -> None:
        """Row ``row`` ← one expert's parts (already in this layout)."""
        if expert.keys() != self.parts.keys():
            raise ValueError(f"adapmoe: expert parts {sorted(expert)} do not match the store's "
                             f"{sorted(self.parts)}")
        for name, t in self.parts.items():
            t[row].copy_(expert[name])


def _copy_off_openmp(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst`` ← ``src`` (contiguous, same shape and dtype, on the CPU) as one plain memcpy.

    The link's loader thread makes CPU loads of big experts (and every load with an emulated
    link). torch's ``copy_`` there would start an OpenMP team of that thread's own beside the
    compute thread's; once it had, compute ran ~3x slower on 2 cores, loads or not (bundled
    shape, batch 16: an all-resident decode step 16 → 5 ms with this copy). numpy's copy uses no
    OpenMP and releases the GIL.
    """
    np.copyto(_bytes(dst), _bytes(src))


def _plain_cpu_pair(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Both on the CPU, contiguous, of one dtype and shape: a byte copy is ``copy_``."""
    return (dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype
            and dst.shape == src.shape and dst.is_contiguous() and src.is_contiguous())


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()


# A lookup table beats torch's elementwise float8 → float32 cast on CPU about twofold.
_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _fp8_values(w: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 ``[R, C]`` → float32 (a new tensor)."""
    return torch.take(_on(w.device, "fp8"), w.view(torch.uint8).long())


def _int4_codes(w: torch.Tensor) -> torch.Tensor:
    """Packed int32 ``[R, C/8]`` → float32 ``[R, C]`` codes ``v`` in [-8, 7]. Value ``j`` of a
    word sits in its bits 4j..4j+3; read byte by byte (little-endian: byte ``k`` of a word holds
    values 2k (low nibble) and 2k+1), which is several times faster than shifting whole words."""
    if sys.byteorder != "little":  # pragma: no cover - every supported CPU is little-endian
        raise RuntimeError("adapmoe: int4 unpacking assumes a little-endian CPU")
    b = w.view(torch.uint8)
    return torch.stack([b & 15, b >> 4], dim=-1).view(w.shape[0], -1).float().sub_(8)


_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_FP4_LOW, _FP4_HIGH = _FP4[torch.arange(256) & 15], _FP4[torch.arange(256) >> 4]


def _fp4_values(w: torch.Tensor) -> torch.Tensor:
    """FP4 e2m1 pairs, uint8 ``[R, C/2]`` → float32 ``[R, C]`` (low nibble first)."""
    b = w.long()
    pairs = torch.stack([torch.take(_on(w.device, "fp4_low"), b),
                         torch.take(_on(w.device, "fp4_high"), b)], dim=-1)
    return pairs.view(w.shape[0], -1)


_TABLES = {"fp8": _FP8_VALUES, "fp4_low": _FP4_LOW, "fp4_high": _FP4_HIGH}
_ON_DEVICE: dict[tuple[torch.device, str], torch.Tensor] = {}


def _on(device: torch.device, table: str) -> torch.Tensor:
    """A lookup table on ``device``, copied there once (not on every dequantization)."""
    key = (device, table)
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = _TABLES[table].to(device)
    return _ON_DEVICE[key]


def quantize_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [R, C] → (float8 e4m3 [R, C], float32 scales [⌈R/b0⌉, ⌈C/b1⌉]): each (b0, b1) tile
    divided by its max |w| / 448 (the FP8 block format's rule)."""
    (r, c), (b0, b1) = w.shape, block
    n0, n1 = -(-r // b0), -(-c // b1)
    padded = torch.zeros(n0 * b0, n1 * b1, dtype=torch.float32)
    padded[:r, :c] = w.float()
    tiles = padded.view(n0, b0, n1, b1)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).view(n0 * b0, n1 * b1)
    return q[:r, :c].to(torch.float8_e4m3fn).contiguous(), scale
