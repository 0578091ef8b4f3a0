"""The kernels stock vLLM runs for its own MoE layers, registered as the engine's "fused" kernel.

Computing the slots with the kernel stock uses (on a stacked subset of experts with expert ids
remapped to slot ids) is what makes the plugin token-exact: both kernels are row-independent
and sum a token's experts inside the kernel, so a subset of experts gives the same rows.
  * CPU: ``cpu_fused_moe`` on prepacked weights, with the ISA vLLM itself would pick;
  * CUDA: vLLM's Triton ``fused_experts`` on the plain ``[S, 2I, H]`` / ``[S, H, I]`` slots.
    (Not run on a GPU yet: the GPU machines this project validates on have no vLLM.)
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from vllm_adapmoe import cpu_features
from vllm_adapmoe.engine.errors import AdapMoEConfigError
from vllm_adapmoe.engine.expert_tensors import ExpertFormat, ExpertRows
from vllm_adapmoe.engine.kernels import register_kernel


class FusedCpuKernel:
    """vLLM's ``cpu_fused_moe`` on the slot tensors, with the ISA vLLM itself would pick."""

    name = "fused-cpu"

    def __init__(self, dtype: torch.dtype, hidden: int, intermediate: int,
                 fmt: ExpertFormat = ExpertFormat()) -> None:
        from vllm.platforms import CpuArchEnum, current_platform

        from vllm._custom_ops import cpu_fused_moe

        if fmt.quant:
            # vLLM's CPU FP8 MoE experts need AMX and are not wired to slots yet
            raise AdapMoEConfigError(
                f"adapmoe: the fused CPU kernel takes unquantized experts only ({fmt.quant} "
                'given); "auto" and "grouped" compute them with the engine\'s dequantizing kernel')
        self.fmt = fmt
        self._fused_moe = cpu_fused_moe  # bound once: the call is on every layer's hot path
        arch = current_platform.get_cpu_architecture()
        if arch == CpuArchEnum.X86 and dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported():
            self.isa, self.align, reduce_align = "amx", 32, 32
        elif arch == CpuArchEnum.ARM and dtype == torch.bfloat16 and sys.platform != "darwin":
            self.isa, self.align, reduce_align = "neon", 32, 4
        else:
            self.isa, self.align, reduce_align = "vec", 32, 1
        if self.isa == "amx" and not (cpu_features.amx_permitted() or cpu_features.request_amx()):
            # the kernel would die with SIGILL on its first tile instruction
            raise AdapMoEConfigError(
                "adapmoe: vLLM's CPU MoE kernel picks AMX on this CPU, but Linux refused this "
                'process AMX tile permission; set "kernel": "grouped" to compute without AMX')
        self.path = f"vLLM cpu_fused_moe (isa {self.isa})"
        self.align = math.lcm(self.align, reduce_align)
        if hidden % self.align:
            raise AdapMoEConfigError(
                f"adapmoe: the fused CPU kernel needs hidden_size divisible by {self.align} "
                f"(got {hidden}); set \"kernel\": \"reference\""
            )
        if fmt.interleaved and intermediate % self.align:
            # stock does not pad interleaved gate/up rows either (its kernel refuses the shape)
            raise AdapMoEConfigError(
                f"adapmoe: the fused CPU kernel needs a swigluoai expert's intermediate size "
                f"divisible by {self.align} (got {intermediate}); set \"kernel\": \"grouped\"")

    def padded_intermediate(self, intermediate: int) -> int:
        if self.fmt.interleaved:
            return intermediate  # checked aligned at construction
        return -(-intermediate // self.align) * self.align

    def pack(self, expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One expert (``w13`` ``[2I, H]``, ``w2`` ``[H, I]``, biases) → zero-padded, prepacked
        kernel layout (biases stay plain, as stock keeps them)."""
        from vllm._custom_ops import cpu_prepack_moe_weight

        packed = {name: t.contiguous() for name, t in expert.items()}
        inter = packed["w2"].shape[1]
        padded = self.padded_intermediate(inter)
        if padded != inter:  # zero rows/cols contribute exactly 0, as in vLLM's own padding
            packed["w13"] = _pad_halves(packed["w13"], padded)
            packed["w2"] = F.pad(packed["w2"], (0, padded - inter))
            if "w13_bias" in packed:
                packed["w13_bias"] = _pad_halves(packed["w13_bias"], padded)
        w13, w2 = packed["w13"], packed["w2"]
        packed["w13"] = cpu_prepack_moe_weight(w13.unsqueeze(0).contiguous(), self.isa)[0]
        packed["w2"] = cpu_prepack_moe_weight(w2.unsqueeze(0).contiguous(), self.isa)[0]
        return packed

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w: ExpertRows,
                 topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None:
        self._fused_moe(out, x, w.w13, w.w2, w.get("w13_bias"), w.get("w2_bias"),
                        topk_weights.contiguous(), topk_slots.contiguous(), self.fmt.activation,
                        self.isa)


def _pad_halves(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Gate | up halves along dim 0, each zero-padded to ``padded`` rows."""
    inter = t.shape[0] // 2
    pad = (0, 0) * (t.dim() - 1) + (0, padded - inter)
    return torch.cat([F.pad(t[:inter], pad), F.pad(t[inter:], pad)])


class FusedTritonKernel:
    """vLLM's Triton fused MoE on the slots (plain layout; ids are slot ids, ``global_num_experts``
    is the slot count)."""

    name = "fused-triton"

    def __init__(self, dtype: torch.dtype, hidden: int, intermediate: int,
                 fmt: ExpertFormat = ExpertFormat()) -> None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise AdapMoEConfigError(f"adapmoe: the fused CUDA kernel does not take {dtype}")
        if fmt != ExpertFormat():
            raise AdapMoEConfigError("adapmoe: the fused CUDA kernel is wired for unquantized "
                                     "SiLU experts without biases only; use \"grouped\"")
        self.path = "vLLM Triton fused_experts"

    def padded_intermediate(self, intermediate: int) -> int:
        return intermediate

    def pack(self, expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.contiguous() for name, t in expert.items()}

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w: ExpertRows,
                 topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None:
        from vllm.model_executor.layers.fused_moe import fused_experts

        out.copy_(fused_experts(x, w.w13, w.w2, topk_weights, topk_slots,
                                global_num_experts=w.num_rows))


register_kernel("cpu", FusedCpuKernel)
register_kernel("cuda", FusedTritonKernel)
