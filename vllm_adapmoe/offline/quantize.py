"""``adapmoe quantize``: a bf16/fp16/fp32 checkpoint's routed experts → FP8 with block scales.

Each routed-expert weight ``W`` [R, C] is cut into ``block`` = (b, b) tiles; tile (i, j) is
stored as float8 e4m3 ``W_ij / s_ij`` with ``s_ij = max|W_ij| / 448`` (e4m3's largest finite
value) in ``<name>.weight``, and ``s`` [⌈R/b⌉, ⌈C/b⌉] float32 in ``<name>.weight_scale_inv``
(the name and layout of DeepSeek-V3's and Qwen3's FP8 checkpoints, which vLLM reads as
``quant_method: "fp8"`` with ``weight_block_size``). Everything else is copied unchanged and
listed in ``ignored_layers``, so attention stays in the source dtype: the output serves on CPUs
without AMX, where vLLM has no FP8 linear kernel. Expert bytes drop to about half of bf16's.

``dequantize=True`` writes the same model with the FP8 experts turned back into the source dtype
(``s · q``): the bf16 model that the FP8 one computes, for perplexity and logprob comparisons.
``dequantize_fp8_checkpoint`` does the same for any FP8 block-scaled checkpoint (every weight
with a ``weight_scale_inv``), e.g. so ``adapmoe calibrate`` can read it with transformers.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_adapmoe.engine.expert_tensors import ExpertFormat

E4M3_MAX = 448.0


def quantize_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [R, C] → (float8 e4m3 [R, C], float32 scales [⌈R/b0⌉, ⌈C/b1⌉])."""
    (r, c), (b0, b1) = w.shape, block
    n0, n1 = -(-r // b0), -(-c // b1)
    padded = torch.zeros(n0 * b0, n1 * b1, dtype=torch.float32)
    padded[:r, :c] = w.float()
    tiles = padded.view(n0, b0, n1, b1)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).view(n0 * b0, n1 * b1)
    return q[:r, :c].to(torch.float8_e4m3fn).contiguous(), scale


def quantize_experts_fp8(src: str | Path, dst: str | Path, block: int = 128,
                         dequantize: bool = False, progress: bool = True) -> Path:
    """Write ``dst``: ``src`` with its routed experts in FP8 block format (see the module)."""
    from vllm_adapmoe.models import SUPPORTED
    from vllm_adapmoe.offline.profile import architecture_of

    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    arch = architecture_of(cfg)
    if arch not in SUPPORTED or SUPPORTED[arch].experts.stacked:
        raise ValueError(f"adapmoe quantize: {arch} is not a family with per-expert weights "
                         f"({', '.join(a for a, s in SUPPORTED.items() if not s.experts.stacked)})")
    if cfg.get("quantization_config"):
        raise ValueError(f"adapmoe quantize: {src} is quantized already")
    names = SUPPORTED[arch].experts
    expert = re.compile(rf"model\.layers\.\d+\.{names.block}\.experts\.\d+\."
                        rf"(?:{names.gate}|{names.up}|{names.down})\.weight")
    sizes = (block, block)
    fmt = ExpertFormat(quant="fp8-block", block=sizes)  # its dequantize is the kernels'
    ignored: set[str] = set()

    def shard(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in tensors.items():
            if not expert.fullmatch(name):
                out[name] = tensor
                if name.endswith(".weight") and tensor.dim() == 2:
                    ignored.add(name[:-len(".weight")])
                continue
            q, scale = quantize_block(tensor, sizes)
            if dequantize:
                out[name] = fmt.dequantize(q, scale, tensor.dtype)
            else:
                out[name], out[f"{name}_scale_inv"] = q, scale
        return out

    _rewrite_shards(src, dst, shard, progress)
    if not dequantize:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                      "activation_scheme": "dynamic",
                                      "weight_block_size": [block, block],
                                      "ignored_layers": sorted(ignored)}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def dequantize_fp8_checkpoint(src: str | Path, dst: str | Path,
                              dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``dst``: the FP8 block-scaled checkpoint ``src`` with every quantized weight
    dequantized to ``dtype`` and no ``quantization_config``."""
    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    quant = cfg.pop("quantization_config", None) or {}
    if quant.get("quant_method") != "fp8" or not quant.get("weight_block_size"):
        raise ValueError(f"{src} is not an FP8 checkpoint with block scales")
    fmt = ExpertFormat(quant="fp8-block", block=tuple(quant["weight_block_size"]))

    def shard(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t if f"{name}_scale_inv" not in tensors
                else fmt.dequantize(t, tensors[f"{name}_scale_inv"], dtype)
                for name, t in tensors.items() if not name.endswith("_scale_inv")}

    _rewrite_shards(src, dst, shard, progress=False)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _rewrite_shards(src: Path, dst: Path,
                    shard: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                    progress: bool) -> None:
    """``dst`` ← ``src`` with each safetensors shard passed through ``shard`` (and an index
    over the new names); every other file but ``config.json`` copied as it is."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {src}")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (
                "model.safetensors.index.json", "config.json"):
            shutil.copy(f, dst / f.name)
    weight_map: dict[str, str] = {}
    for path in tqdm(files, desc="adapmoe quantize", disable=not progress):
        out = shard(load_file(path))
        save_file(out, dst / path.name, metadata={"format": "pt"})
        weight_map.update({n: path.name for n in out})
    if len(files) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
