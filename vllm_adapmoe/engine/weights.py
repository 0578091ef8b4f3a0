"""Checkpoint weights of one MoE layer → its router and its host store, this rank's shard only.

Names are relative to the block: ``gate.*`` (the router, its bias, and DeepSeek-V3's correction
bias) and either
  * one tensor per expert, ``experts.E.<w>.weight`` with ``<w>`` one of w1/w2/w3 (Mixtral) or
    gate_proj/down_proj/up_proj (Qwen, OLMoE, DeepSeek, GLM) — for quantized checkpoints the
    names of ``CHECKPOINT_SUFFIXES`` (``weight_packed`` + ``weight_scale`` for INT4,
    ``weight`` + ``weight_scale_inv`` for FP8); or
  * one tensor per layer with every expert stacked (gpt-oss): ``experts.gate_up_proj``
    ``[E, H, 2I]`` (gate and up interleaved), ``experts.down_proj`` ``[E, I, H]`` (both in
    x·W orientation) and their biases ``experts.gate_up_proj_bias`` ``[E, 2I]``,
    ``experts.down_proj_bias`` ``[E, H]`` (vLLM's names for them, ``w13_weight`` etc., too);
    in MXFP4 checkpoints ``experts.gate_up_proj_blocks`` ``[E, 2I, H/32, 16]`` and
    ``..._scales`` ``[E, 2I, H/32]`` (uint8, rows = outputs), the down projection alike.
Under tensor parallelism a rank keeps gate/up rows and down columns of its slice (vLLM's split
of ``w13`` / ``w2``; interleaved rows split the same way, a pair never straddles two ranks), so
its output is a partial sum; the down bias is added once, by rank 0, as stock does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm_adapmoe.engine.store import HostExpertStore

EXPERT_WEIGHTS = {"w1": "w1", "w2": "w2", "w3": "w3",
                  "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
# a per-expert weight's checkpoint suffixes by ``ExpertFormat.quant``: (weights, their block
# scales — what a block is multiplied by); compressed-tensors' ``weight_shape`` is not needed
CHECKPOINT_SUFFIXES = {None: ("weight", None), "fp8-block": ("weight", "weight_scale_inv"),
                       "int4-group": ("weight_packed", "weight_scale")}
PER_EXPERT_SUFFIX = {"weight": "", "weight_packed": "", "weight_scale_inv": "_scale",
                     "weight_scale": "_scale"}
SKIPPED_SUFFIX = {"weight_shape"}
# per-layer stacked tensors → (part, transposed from x·W orientation); MXFP4 blocks and scales
# (uint8) are [out, in/32, 16] / [out, in/32] under the same names or their own
STACKED_WEIGHTS = {"gate_up_proj": ("w13", True), "w13_weight": ("w13", True),
                   "down_proj": ("w2", True), "w2_weight": ("w2", True),
                   "gate_up_proj_bias": ("w13_bias", False), "w13_bias": ("w13_bias", False),
                   "down_proj_bias": ("w2_bias", False), "w2_bias": ("w2_bias", False),
                   "gate_up_proj_blocks": ("w13", False), "down_proj_blocks": ("w2", False),
                   "gate_up_proj_scales": ("w13_scale", False),
                   "w13_weight_scale": ("w13_scale", False),
                   "down_proj_scales": ("w2_scale", False), "w2_weight_scale": ("w2_scale", False)}


def load_moe_weights(weights: Iterable[tuple[str, torch.Tensor]], gate: nn.Module,
                     store: HostExpertStore, shard: tuple[int, int]) -> set[str]:
    """Router weights into ``gate`` (returned: the loader checks them), experts into ``store``."""
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.startswith("gate."):
            param = getattr(gate, name.split(".", 1)[1], None)
            if not isinstance(param, torch.Tensor):
                raise ValueError(f"adapmoe: unexpected router weight {name!r} in the checkpoint")
            loader = getattr(param, "weight_loader", None)  # vLLM's linear layers
            loader(param, tensor) if loader else param.data.copy_(tensor)
            loaded.add(name)
            continue
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == "experts" and parts[1] in STACKED_WEIGHTS:
            which, transposed = STACKED_WEIGHTS[parts[1]]
            for expert, weight in enumerate(tensor):
                if weight.dtype == torch.uint8:  # MXFP4: rows are outputs already
                    weight = weight.reshape(weight.shape[0], -1)
                elif transposed:
                    weight = weight.t()
                store.put(expert, which, own_shard(which, weight, shard))
            continue
        if len(parts) == 4 and parts[3] in SKIPPED_SUFFIX:
            continue
        if (len(parts) != 4 or parts[0] != "experts" or parts[2] not in EXPERT_WEIGHTS
                or parts[3] not in PER_EXPERT_SUFFIX):
            raise ValueError(f"adapmoe: unexpected MoE weight {name!r} in the checkpoint")
        which = EXPERT_WEIGHTS[parts[2]] + PER_EXPERT_SUFFIX[parts[3]]
        store.put(int(parts[1]), which, own_shard(which, tensor, shard))
    return loaded


def own_shard(which: str, weight: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    """This rank's slice: rows of gate/up (column parallel), columns of down (row parallel);
    the down bias whole on rank 0, zero elsewhere (the ranks' outputs are summed)."""
    rank, size = shard
    if size == 1:
        return weight
    if which == "w2_bias":
        return weight if rank == 0 else torch.zeros_like(weight)
    dim = 1 if which in ("w2", "w2_scale") else 0
    n = weight.shape[dim] // size
    return weight.narrow(dim, rank * n, n)


def check_shardable(intermediate_size: int, shard: tuple[int, int]) -> int:
    """This rank's share of the expert intermediate size."""
    rank, size = shard
    if not 0 <= rank < size or intermediate_size % size:
        raise ValueError(f"cannot split intermediate size {intermediate_size} into {size} "
                         f"tensor-parallel shards (rank {rank})")
    return intermediate_size // size
