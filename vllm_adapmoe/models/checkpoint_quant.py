"""Which of its checkpoint's quantization formats the plugin serves the routed experts in.

A checkpoint's ``quantization_config`` decides how its experts are stored:
  * ``quant_method: "fp8"`` with ``weight_block_size`` (DeepSeek-V3, Qwen3-FP8): float8 e4m3
    weights with one float32 ``weight_scale_inv`` per block → ``"fp8-block"``;
  * ``quant_method: "compressed-tensors"``, ``format: "pack-quantized"`` with one weight scheme
    of symmetric 4-bit integers in groups along the input dimension (what llm-compressor's
    W4A16 recipes write, e.g. the ``*-quantized.w4a16`` checkpoints; vLLM serves it through its
    WNA16 MoE kernels) → ``"int4-group"``. Chosen over GPTQ and AWQ because it is the format
    vLLM itself produces and reads natively, with no act-order permutation or zero points;
  * gpt-oss's ``quant_method: "mxfp4"`` (its released checkpoints): FP4 e2m1 in blocks of 32
    with one e8m0 scale each → ``"mxfp4"``.
Anything else gets one start-up error naming what is supported.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NoReturn

from vllm_adapmoe.engine.errors import AdapMoEConfigError
from vllm_adapmoe.engine.expert_tensors import MX_BLOCK, ExpertFormat

SUPPORTED_QUANT = ("FP8 with block scales (quant_method \"fp8\" with weight_block_size), "
                   "INT4 compressed-tensors pack-quantized (symmetric, group strategy, no "
                   "activation quantization) and, for gpt-oss, MXFP4")


def checkpoint_format(c: Any, base: ExpertFormat = ExpertFormat()) -> ExpertFormat:
    """``base`` (the family's expert) as the checkpoint of config ``c`` stores it."""
    quant = getattr(c, "quantization_config", None)
    if not quant:
        return base
    q = quant if isinstance(quant, dict) else quant.to_dict()
    method = q.get("quant_method")
    if base.interleaved:  # gpt-oss: bf16, or its released MXFP4 form
        if method in ("mxfp4", "gpt_oss_mxfp4"):  # (vLLM renames it in the worker's config)
            return replace(base, quant="mxfp4", block=(1, MX_BLOCK))
        return _refuse(f"{method!r} (gpt-oss's experts are served in bf16 and MXFP4)")
    if method == "fp8":
        return _fp8(q, base)
    if method == "compressed-tensors":
        return _compressed_tensors(q, base)
    return _refuse(repr(method))


def _fp8(q: dict, base: ExpertFormat) -> ExpertFormat:
    block = q.get("weight_block_size")
    ignored = q.get("ignored_layers") or q.get("modules_to_not_convert") or []
    if not block or q.get("fmt", "e4m3") != "e4m3":
        return _refuse(f"'fp8' without block scales (weight_block_size {block})")
    if any(".experts" in name for name in ignored):
        return _refuse("'fp8' with some routed experts left unquantized")
    return replace(base, quant="fp8-block", block=(int(block[0]), int(block[1])))


def _compressed_tensors(q: dict, base: ExpertFormat) -> ExpertFormat:
    groups = list((q.get("config_groups") or {}).values())
    what = "'compressed-tensors'"
    if len(groups) != 1:
        return _refuse(f"{what} with {len(groups)} quantization schemes (one is served)")
    group = groups[0]
    fmt = group.get("format") or q.get("format")
    w = group.get("weights") or {}
    if fmt != "pack-quantized":
        return _refuse(f"{what} format {fmt!r}")
    if group.get("input_activations") or group.get("output_activations"):
        return _refuse(f"{what} with quantized activations")
    if (w.get("num_bits"), w.get("type"), w.get("strategy")) != (4, "int", "group") \
            or not w.get("symmetric", True) or w.get("actorder") or w.get("dynamic"):
        return _refuse(f"{what} weights {w.get('num_bits')}-bit {w.get('type')} "
                       f"{w.get('strategy')} (symmetric {w.get('symmetric')}, actorder "
                       f"{w.get('actorder')})")
    if any(".experts" in name for name in q.get("ignore") or []):
        return _refuse(f"{what} with some routed experts left unquantized")
    return replace(base, quant="int4-group", block=(1, int(w["group_size"])))


def _refuse(what: str) -> NoReturn:
    raise AdapMoEConfigError(
        f"adapmoe: the routed experts of this checkpoint are quantized as {what}; "
        f"--model-impl adapmoe serves bf16/fp16/fp32 experts, {SUPPORTED_QUANT}: use such a "
        "checkpoint, or stock vLLM for this one")
