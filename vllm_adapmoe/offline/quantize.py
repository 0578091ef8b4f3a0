"""``adapmoe quantize``: a bf16/fp16/fp32 checkpoint's routed experts → FP8 or INT4.

Two formats, each the one vLLM reads for it:
  * ``"fp8"``: each routed-expert weight ``W`` [R, C] is cut into (b, b) tiles; tile (i, j) is
    stored as float8 e4m3 ``W_ij / s_ij`` with ``s_ij = max|W_ij| / 448`` (e4m3's largest
    finite value) in ``<name>.weight`` and ``s`` [⌈R/b⌉, ⌈C/b⌉] float32 in
    ``<name>.weight_scale_inv`` (DeepSeek-V3's and Qwen3's FP8 layout: ``quant_method: "fp8"``
    with ``weight_block_size``). Expert bytes: about half of bf16's.
  * ``"int4"``: symmetric 4-bit integers with one scale per ``group`` columns of a row, written
    by the ``compressed-tensors`` library itself (its min/max scale rule and its
    ``pack-quantized`` compressor: ``weight_packed`` int32, ``weight_scale``, ``weight_shape``),
    the format llm-compressor's W4A16 recipes produce. Expert bytes: about a quarter.
  * ``"mxfp4"`` (gpt-oss only): its released checkpoints' format — per layer
    ``experts.gate_up_proj_blocks`` [E, 2I, H/32, 16] (FP4 e2m1 values two to a byte, rows =
    outputs) and ``..._scales`` [E, 2I, H/32] (e8m0: one power of two per 32 values, the smallest
    that keeps the block within ±6), the down projection alike, biases unchanged.
Everything else is copied unchanged and listed as ignored, so attention stays in the source
dtype: the output serves on CPUs without AMX, where vLLM has no FP8/INT4 linear kernel.

``dequantize=True`` writes the same model with the quantized experts turned back into the source
dtype: the bf16 model that the quantized one computes, for perplexity and logprob comparisons.
``dequantize_checkpoint`` does the same for any checkpoint of either format, e.g. so
``adapmoe calibrate`` can read it with transformers.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm_adapmoe.engine.expert_tensors import MX_BLOCK, ExpertFormat, quantize_block

SCHEMES = ("fp8", "int4", "mxfp4")
_FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
GPT_OSS_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                         "model.embed_tokens", "lm_head"]
Tensors = dict[str, torch.Tensor]


def int4_scheme(group: int) -> Any:
    """compressed-tensors' scheme for symmetric INT4 weights in groups, activations unquantized."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group))


def quantize_int4(w: torch.Tensor, scheme: Any) -> Tensors:
    """``w`` [R, C] → compressed-tensors' ``weight_packed`` / ``weight_scale`` / ``weight_shape``,
    with the library's own scale rule and packer."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    group = scheme.weights.group_size
    if w.shape[1] % group:
        raise ValueError(f"adapmoe quantize: input size {w.shape[1]} is not a multiple of the "
                         f"group size {group}")
    groups = w.float().view(w.shape[0], -1, group)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    state = {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zero}
    return dict(PackedQuantizationCompressor.compress(state, scheme))


def dequantize_int4(parts: Tensors, scheme: Any, dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors' own decompression of one packed weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    return PackedQuantizationCompressor.decompress(parts, scheme)["weight"].to(dtype)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [R, C] (rows = outputs, C a multiple of 32) → (blocks uint8 [R, C/32, 16], e8m0
    scales uint8 [R, C/32]); each value rounded to the nearest FP4 e2m1 value."""
    (r, c), b = w.shape, MX_BLOCK
    groups = w.float().view(r, c // b, b)
    amax = groups.abs().amax(-1).clamp(min=2.0 ** -126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # amax / 2^e ≤ 6
    scaled = groups / torch.exp2(exponent)[..., None]
    code = (scaled.abs()[..., None] - _FP4_MAGNITUDES).abs().argmin(-1)
    code = code | ((scaled < 0) & (code > 0)).long() << 3  # sign bit; no negative zero
    pairs = code.to(torch.uint8).view(r, c // b, b // 2, 2)
    return (pairs[..., 0] | pairs[..., 1] << 4).contiguous(), (exponent + 127).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' own MXFP4 dequantizer: [E, R, C/32, 16] + [E, R, C/32] → [E, C, R] (the
    bf16 checkpoint's x·W orientation)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


def quantize_experts(src: str | Path, dst: str | Path, scheme: str = "fp8", block: int = 128,
                     dequantize: bool = False, progress: bool = True) -> Path:
    """Write ``dst``: ``src`` with its routed experts in ``scheme`` (see the module); ``block``:
    FP8's tile side, INT4's group size."""
    from vllm_adapmoe.models import SUPPORTED
    from vllm_adapmoe.offline.profile import architecture_of

    if scheme not in SCHEMES:
        raise ValueError(f"adapmoe quantize: unknown format {scheme!r} (one of {SCHEMES})")
    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    arch = architecture_of(cfg)
    if arch not in SUPPORTED:
        raise ValueError(f"adapmoe quantize: unsupported architecture {arch}")
    if cfg.get("quantization_config"):
        raise ValueError(f"adapmoe quantize: {src} is quantized already")
    names = SUPPORTED[arch].experts
    if names.stacked != (scheme == "mxfp4"):
        raise ValueError(f"adapmoe quantize: {arch} takes --format "
                         f"{'mxfp4' if names.stacked else 'fp8 or int4'}")
    if scheme == "mxfp4":
        return _quantize_gpt_oss(src, dst, cfg, names, dequantize, progress)
    expert = re.compile(rf"model\.layers\.\d+\.{names.block}\.experts\.\d+\."
                        rf"(?:{names.gate}|{names.up}|{names.down})\.weight")
    ct_scheme = int4_scheme(block) if scheme == "int4" else None
    fp8 = ExpertFormat(quant="fp8-block", block=(block, block))  # its dequantize is the kernels'
    ignored: set[str] = set()

    def quantized(name: str, w: torch.Tensor) -> Tensors:
        stem = name[:-len(".weight")]
        if ct_scheme is not None:
            parts = quantize_int4(w, ct_scheme)
            if dequantize:
                return {name: dequantize_int4(parts, ct_scheme, w.dtype)}
            return {f"{stem}.{k}": v for k, v in parts.items()}
        q, scale = quantize_block(w, fp8.block)
        if dequantize:
            return {name: fp8.dequantize(q, scale, w.dtype)}
        return {name: q, f"{name}_scale_inv": scale}

    def shard(tensors: Tensors) -> Tensors:
        out = {}
        for name, tensor in tensors.items():
            if expert.fullmatch(name):
                out.update(quantized(name, tensor))
                continue
            out[name] = tensor
            if name.endswith(".weight") and tensor.dim() == 2:
                ignored.add(name[:-len(".weight")])
        return out

    _rewrite_shards(src, dst, shard, progress)
    if not dequantize:
        cfg["quantization_config"] = (_int4_config(ct_scheme, ignored) if ct_scheme is not None
                                      else _fp8_config(block, ignored))
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _quantize_gpt_oss(src: Path, dst: Path, cfg: dict, names: Any, dequantize: bool,
                      progress: bool) -> Path:
    """gpt-oss's stacked experts → MXFP4 (or, ``dequantize``, back through transformers)."""
    stacked = re.compile(rf"model\.layers\.\d+\.{names.block}\.experts\."
                         rf"(?:{names.gate}|{names.down})")

    def shard(tensors: Tensors) -> Tensors:
        out = {}
        for name, t in tensors.items():
            if not stacked.fullmatch(name):
                out[name] = t
                continue
            blocks, scales = (torch.stack(x) for x in zip(*(quantize_mxfp4(w.t()) for w in t)))
            if dequantize:
                out[name] = dequantize_mxfp4(blocks, scales, t.dtype)
            else:
                out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
        return out

    _rewrite_shards(src, dst, shard, progress)
    if not dequantize:
        cfg["quantization_config"] = {"quant_method": "mxfp4",
                                      "modules_to_not_convert": GPT_OSS_NOT_CONVERTED}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _fp8_config(block: int, ignored: set[str]) -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [block, block], "ignored_layers": sorted(ignored)}


def _int4_config(scheme: Any, ignored: set[str]) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                quantization_status="compressed", ignore=sorted(ignored))
    return json.loads(config.model_dump_json())


def dequantize_checkpoint(src: str | Path, dst: str | Path,
                          dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``dst``: the FP8 block-scaled, INT4 pack-quantized or MXFP4 checkpoint ``src`` with every
    quantized weight dequantized to ``dtype`` and no ``quantization_config``."""
    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    quant = cfg.pop("quantization_config", None) or {}
    if quant.get("quant_method") == "fp8" and quant.get("weight_block_size"):
        fmt = ExpertFormat(quant="fp8-block", block=tuple(quant["weight_block_size"]))

        def shard(tensors: Tensors) -> Tensors:
            return {name: t if f"{name}_scale_inv" not in tensors
                    else fmt.dequantize(t, tensors[f"{name}_scale_inv"], dtype)
                    for name, t in tensors.items() if not name.endswith("_scale_inv")}
    elif quant.get("quant_method") == "compressed-tensors" and len(quant["config_groups"]) == 1:
        from compressed_tensors.quantization import QuantizationScheme

        scheme = QuantizationScheme(**next(iter(quant["config_groups"].values())))

        def shard(tensors: Tensors) -> Tensors:
            out = {}
            for name, t in tensors.items():
                stem, _, leaf = name.rpartition(".")
                if leaf == "weight_packed":
                    parts = {k: tensors[f"{stem}.{k}"]
                             for k in ("weight_packed", "weight_scale", "weight_shape")}
                    out[f"{stem}.weight"] = dequantize_int4(parts, scheme, dtype)
                elif leaf not in ("weight_scale", "weight_shape"):
                    out[name] = t
            return out
    elif quant.get("quant_method") == "mxfp4":
        def shard(tensors: Tensors) -> Tensors:
            return {name.removesuffix("_blocks"): t if not name.endswith("_blocks")
                    else dequantize_mxfp4(t, tensors[name.replace("_blocks", "_scales")], dtype)
                    for name, t in tensors.items() if not name.endswith("_scales")}
    else:
        raise ValueError(f"{src} is neither an FP8 block-scaled, a compressed-tensors "
                         "pack-quantized nor an MXFP4 checkpoint")
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
