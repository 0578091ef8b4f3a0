"""Start-up pre-flight: damaged copies of a tiny checkpoint and a host too small for the expert
pool each end in one error that names the fault and its fix, in the main process, before any
worker starts (headers only; memory read from fake /proc and cgroup files)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tiny_model import build_tiny_mixtral
from vllm_adapmoe import preflight
from vllm_adapmoe.config import AdapMoEConfigError
from vllm_adapmoe.models import MIXTRAL_NAMES, SUPPORTED
from vllm_adapmoe.offline.profile import moe_shape_of

EXPERT = "model.layers.1.block_sparse_moe.experts.5.w2.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return build_tiny_mixtral(tmp_path_factory.mktemp("pristine"), seed=0)


def _copy(pristine: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(pristine, target)
    return target


def _check(model: Path) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model))
    preflight.check_checkpoint(model, moe_shape_of(cfg), MIXTRAL_NAMES)


def _rewrite(model: Path, change) -> None:
    shard = model / "model.safetensors"
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_a_pristine_checkpoint_passes(pristine):
    _check(pristine)
    assert SUPPORTED["MixtralForCausalLM"].experts == MIXTRAL_NAMES


def test_a_truncated_shard_is_named(pristine, tmp_path):
    model = _copy(pristine, tmp_path)
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    with pytest.raises(AdapMoEConfigError, match=r"model.safetensors is truncated: .*re-download"):
        _check(model)


def test_a_corrupt_header_is_named(pristine, tmp_path):
    model = _copy(pristine, tmp_path)
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(data))
    with pytest.raises(AdapMoEConfigError, match=r"model.safetensors is damaged"):
        _check(model)


def test_a_missing_expert_is_named(pristine, tmp_path):
    model = _copy(pristine, tmp_path)
    _rewrite(model, lambda t: t.pop(EXPERT))
    with pytest.raises(AdapMoEConfigError, match=r"layer 1 \(decoder layer 1\) is missing experts \[5\]"):
        _check(model)


def test_a_wrong_shaped_expert_is_named(pristine, tmp_path):
    model = _copy(pristine, tmp_path)
    _rewrite(model, lambda t: t.__setitem__(EXPERT, t[EXPERT].t().contiguous()))
    with pytest.raises(AdapMoEConfigError, match=rf"{EXPERT} in model.safetensors has shape \[80, 64\], "
                                                 r"the config implies \[64, 80\]"):
        _check(model)


def test_an_index_naming_a_missing_shard_is_named(pristine, tmp_path):
    model = _copy(pristine, tmp_path)
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {EXPERT: "model-00002-of-00002.safetensors"}}))
    with pytest.raises(AdapMoEConfigError, match="lacks the shard"):
        _check(model)


def _compressed(weights: dict, **group) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, **group}}}


W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}


@pytest.mark.parametrize("quant", [
    {"quant_method": "awq", "bits": 4},
    {"quant_method": "fp8"},  # per-tensor FP8: no block scales
    _compressed({**W4, "num_bits": 8}),
    _compressed({**W4, "symmetric": False}),  # zero points
    _compressed({**W4, "actorder": "group"}),
    _compressed(W4, input_activations={"num_bits": 8, "type": "int"}),  # W4A8
], ids=["awq", "fp8-per-tensor", "int8", "int4-asymmetric", "int4-actorder", "w4a8"])
def test_an_unsupported_quantization_is_refused_by_name(pristine, quant):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(pristine))
    cfg.quantization_config = quant
    with pytest.raises(AdapMoEConfigError, match=rf"quantized as '{quant['quant_method']}'.*"
                                                 r"serves bf16/fp16/fp32 experts, FP8 with block"
                                                 r".*INT4 compressed-tensors pack-quantized"):
        moe_shape_of(cfg)


@pytest.mark.parametrize("quant, fmt, expected", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fp8-block",
     r"weight_scale_inv|needs them in one of F8_E4M3"),
    (_compressed(W4), "int4-group", r"weight_packed"),
], ids=["fp8", "int4"])
def test_a_quantized_config_over_bf16_experts_is_named(pristine, quant, fmt, expected):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(pristine))
    cfg.quantization_config = quant
    shape = moe_shape_of(cfg)
    assert shape.expert_format.quant == fmt
    with pytest.raises(AdapMoEConfigError, match=expected):
        preflight.check_checkpoint(pristine, shape, MIXTRAL_NAMES)


def _fake_root(tmp_path: Path, mem_available_kb: int, cgroup: dict[str, str]) -> Path:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(
        f"MemTotal:       25000000 kB\nMemAvailable:   {mem_available_kb} kB\n")
    for name, text in cgroup.items():
        path = tmp_path / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return tmp_path


@pytest.mark.parametrize("cgroup, expected, source", [
    ({}, 20 * 2**30, "MemAvailable"),
    ({"memory.max": "max", "memory.current": "100"}, 20 * 2**30, "MemAvailable"),
    ({"memory.max": str(8 * 2**30), "memory.current": str(2**30)}, 7 * 2**30, "cgroup"),
    ({"memory/memory.limit_in_bytes": str(6 * 2**30), "memory/memory.usage_in_bytes": "0"},
     6 * 2**30, "cgroup"),
    ({"memory/memory.limit_in_bytes": str(2**63 - 4096), "memory/memory.usage_in_bytes": "0"},
     20 * 2**30, "MemAvailable"),  # cgroup v1's "no limit"
])
def test_available_memory_is_the_smaller_of_meminfo_and_the_cgroup(tmp_path, cgroup, expected, source):
    root = _fake_root(tmp_path, 20 * 2**20, cgroup)
    available, where = preflight.available_memory(root)
    assert available == expected and source in where


def test_a_pool_larger_than_the_host_is_one_error_with_both_sizes(tmp_path):
    root = _fake_root(tmp_path, 21 * 2**20, {})
    preflight.check_host_memory(20 * 2**30, "the pool", root)
    with pytest.raises(AdapMoEConfigError, match=r"the pool needs 40.0 GiB of host memory, 21.0 GiB "
                                                 r"are available \(MemAvailable\); what helps"):
        preflight.check_host_memory(40 * 2**30, "the pool", root)


@pytest.mark.parametrize("damage, match", [
    ("truncate", "is truncated"), ("drop_expert", r"is missing experts \[5\]")])
def test_llm_start_up_names_the_fault_within_a_minute(pristine, tmp_path, damage, match):
    """Through ``LLM(...)``: the error comes from the main process, before workers start."""
    from vllm import LLM

    model = _copy(pristine, tmp_path)
    if damage == "truncate":
        shard = model / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[:-4096])
    else:
        _rewrite(model, lambda t: t.pop(EXPERT))
    start = time.perf_counter()
    with pytest.raises(AdapMoEConfigError, match=match):
        LLM(model=str(model), model_impl="adapmoe", enforce_eager=True, max_model_len=128)
    assert time.perf_counter() - start < 60


def test_llm_start_up_refuses_a_pool_the_host_cannot_hold(pristine, monkeypatch):
    from vllm import LLM

    monkeypatch.setattr(preflight, "available_memory", lambda root=None: (2**20, "MemAvailable"))
    with pytest.raises(AdapMoEConfigError, match=r"host expert pool \(3 MoE layers x 8 experts .* "
                                                 r"plus the 24 device slots"):
        LLM(model=str(pristine), model_impl="adapmoe", enforce_eager=True, max_model_len=128)


def test_device_slots_beyond_the_usable_device_memory_are_one_error():
    """CUDA start-up check (pure arithmetic, run here without a GPU): vLLM may use
    gpu_memory_utilization of the device less what others hold; slots + one sequence's KV
    must fit in it."""
    gib = 2**30
    preflight.check_device_memory(60 * gib, 2 * gib, free=80 * gib, total=80 * gib, utilization=0.9)
    with pytest.raises(AdapMoEConfigError, match=r"slots need 60.00 GiB .* at least 2.00 GiB .* "
                                                 r"56.00 GiB are usable .* 16.0 GiB held by other"):
        preflight.check_device_memory(60 * gib, 2 * gib, free=64 * gib, total=80 * gib,
                                      utilization=0.9)


def test_kv_bytes_per_token_follows_the_attention_layout():
    from types import SimpleNamespace

    mixtral = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                              hidden_size=4096, head_dim=None)
    assert preflight.kv_bytes_per_token(mixtral, 2, tp=1) == 2 * 32 * 8 * 128 * 2  # 128 KiB
    assert preflight.kv_bytes_per_token(mixtral, 2, tp=2) == 2 * 32 * 4 * 128 * 2
    mla = SimpleNamespace(num_hidden_layers=61, kv_lora_rank=512, qk_rope_head_dim=64)
    assert preflight.kv_bytes_per_token(mla, 2, tp=8) == 61 * 576 * 2  # latent: not split by TP


def test_the_cuda_check_reads_the_engine_config(pristine, monkeypatch):
    """``validate_budget``'s CUDA branch on a real vLLM config of the tiny model, NVML faked."""
    from types import SimpleNamespace

    import vllm_adapmoe
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(pristine)
    shape = moe_shape_of(hf)
    config = SimpleNamespace(
        model_config=SimpleNamespace(dtype=SimpleNamespace(itemsize=2), hf_text_config=hf,
                                     max_model_len=128),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        cache_config=SimpleNamespace(gpu_memory_utilization=0.9))
    per_expert = shape.expert_bytes(2)
    monkeypatch.setattr(preflight, "device_memory", lambda: (10 * per_expert, 10 * per_expert))
    vllm_adapmoe._check_cuda_memory(config, shape, [2, 2, 2], 0)  # 6 experts in 9 usable
    with pytest.raises(AdapMoEConfigError, match="expert slots need"):
        vllm_adapmoe._check_cuda_memory(config, shape, [4, 4, 4], 0)
