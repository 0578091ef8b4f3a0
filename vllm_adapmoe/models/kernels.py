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

from vllm_adapmoe import cpu_features
from vllm_adapmoe.engine.errors import AdapMoEConfigError
from vllm_adapmoe.engine.kernels import register_kernel


class FusedCpuKernel:
    """vLLM's ``cpu_fused_moe`` on the slot tensors, with the ISA vLLM itself would pick."""

    name = "fused-cpu"

    def __init__(self, dtype: torch.dtype, hidden: int, intermediate: int) -> None:
        from vllm.platforms import CpuArchEnum, current_platform

        from vllm._custom_ops import cpu_fused_moe

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

    def padded_intermediate(self, intermediate: int) -> int:
        return -(-intermediate // self.align) * self.align

    def pack(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert (``[2I, H]``, ``[H, I]``) → zero-padded, prepacked kernel layout."""
        from vllm._custom_ops import cpu_prepack_moe_weight

        inter = w2.shape[1]
        padded = self.padded_intermediate(inter)
        if padded != inter:  # zero rows/cols contribute exactly 0, as in vLLM's own padding
            gate_up = w13.new_zeros(2 * padded, w13.shape[1])
            gate_up[:inter], gate_up[padded:padded + inter] = w13[:inter], w13[inter:]
            down = w2.new_zeros(w2.shape[0], padded)
            down[:, :inter] = w2
            w13, w2 = gate_up, down
        return (cpu_prepack_moe_weight(w13.unsqueeze(0).contiguous(), self.isa)[0],
                cpu_prepack_moe_weight(w2.unsqueeze(0).contiguous(), self.isa)[0])

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None:
        self._fused_moe(out, x, w13, w2, None, None, topk_weights.contiguous(),
                        topk_slots.contiguous(), "silu", self.isa)


class FusedTritonKernel:
    """vLLM's Triton fused MoE on the slots (plain layout; ids are slot ids, ``global_num_experts``
    is the slot count)."""

    name = "fused-triton"

    def __init__(self, dtype: torch.dtype, hidden: int, intermediate: int) -> None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise AdapMoEConfigError(f"adapmoe: the fused CUDA kernel does not take {dtype}")
        self.path = "vLLM Triton fused_experts"

    def padded_intermediate(self, intermediate: int) -> int:
        return intermediate

    def pack(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return w13.contiguous(), w2.contiguous()

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None:
        from vllm.model_executor.layers.fused_moe import fused_experts

        out.copy_(fused_experts(x, w13, w2, topk_weights, topk_slots,
                                global_num_experts=w13.shape[0]))


register_kernel("cpu", FusedCpuKernel)
register_kernel("cuda", FusedTritonKernel)
