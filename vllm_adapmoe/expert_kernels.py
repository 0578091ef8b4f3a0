"""How the experts held in a layer's slots are computed.

Both kernels take the same inputs: token activations, the layer's slot tensors (``w13`` as
``[S, 2I, H]`` = gate|up stacked, ``w2`` as ``[S, H, I]``, each in the kernel's own layout),
float32 routing weights and int32 *slot* ids ``[T, k]``. Every id must name a filled slot:
the CPU kernel corrupts memory on an id of -1.

``FusedCpuKernel`` is vLLM's own CPU grouped-GEMM MoE kernel, the one stock Mixtral runs; on a
stacked subset of experts with remapped ids it is bit-identical to stock (row-independent,
prepacking separable per expert), which is what makes the plugin token-exact.
``ReferenceKernel`` is a plain per-expert loop: slow, obviously right, the yardstick for tests.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from vllm_adapmoe.config import AdapMoEConfigError


class ReferenceKernel:
    name = "reference"

    def padded_intermediate(self, intermediate: int) -> int:
        return intermediate

    def pack(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return w13.contiguous(), w2.contiguous()

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None:
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        for slot in topk_slots.unique().tolist():
            rows, col = (topk_slots == slot).nonzero(as_tuple=True)
            gate, up = (x[rows] @ w13[slot].t()).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ w2[slot].t()
            acc.index_add_(0, rows, y.float() * topk_weights[rows, col].unsqueeze(-1))
        out.copy_(acc)


class FusedCpuKernel:
    """vLLM's ``cpu_fused_moe`` on the slot tensors, with the ISA vLLM itself would pick."""

    name = "fused-cpu"

    def __init__(self, dtype: torch.dtype, hidden: int, intermediate: int) -> None:
        from vllm.platforms import CpuArchEnum, current_platform

        arch = current_platform.get_cpu_architecture()
        if arch == CpuArchEnum.X86 and dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported():
            self.isa, self.align, reduce_align = "amx", 32, 32
        elif arch == CpuArchEnum.ARM and dtype == torch.bfloat16 and sys.platform != "darwin":
            self.isa, self.align, reduce_align = "neon", 32, 4
        else:
            self.isa, self.align, reduce_align = "vec", 32, 1
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
        from vllm._custom_ops import cpu_fused_moe

        cpu_fused_moe(out, x, w13, w2, None, None, topk_weights.contiguous(),
                      topk_slots.contiguous(), "silu", self.isa)


def make_kernel(choice: str, device: torch.device, dtype: torch.dtype, hidden: int,
                intermediate: int) -> FusedCpuKernel | ReferenceKernel:
    if choice == "reference":
        return ReferenceKernel()
    if device.type == "cpu":
        try:
            return FusedCpuKernel(dtype, hidden, intermediate)
        except AdapMoEConfigError:
            if choice == "fused":
                raise
            return ReferenceKernel()
    if choice == "fused":
        raise AdapMoEConfigError(
            f'adapmoe: kernel="fused" is only available on CPU in this version (device is '
            f'{device.type}); use "auto" or "reference"'
        )
    return ReferenceKernel()
