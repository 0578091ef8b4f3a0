"""Quantized experts (FP8, 128 × 128 block scales) served as they are stored.

The checkpoint is a tiny Mixtral quantized by the project's ``adapmoe quantize`` with distinct
scales per expert. Stock vLLM-CPU cannot serve it on a CPU without AMX (no FP8 MoE kernel), so
exactness is offloaded = all resident with the plugin's own dequantizing kernel, and the FP8
model is compared with the bf16 model it dequantizes to, served by stock.
"""

from __future__ import annotations

import pytest
import torch
from tiny_model import build_tiny_fp8_mixtral

import vllm_adapmoe
from conftest import greedy
from vllm_adapmoe.engine.cache import ExpertCache
from vllm_adapmoe.engine.expert_tensors import ExpertFormat
from vllm_adapmoe.engine.kernels import GroupedKernel, ReferenceKernel
from vllm_adapmoe.engine.routing import route
from vllm_adapmoe.engine.stats import LayerStats
from vllm_adapmoe.engine.store import HostExpertStore
from vllm_adapmoe.offline.quantize import quantize_block

FP8 = ExpertFormat(quant="fp8-block")
H, I = 256, 192  # 2 × 2 blocks per weight, the last ones partial


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    return build_tiny_fp8_mixtral(tmp_path_factory.mktemp("fp8_mixtral"))


def _fp8_store(experts: int = 4) -> tuple[HostExpertStore, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    store = HostExpertStore(experts, H, I, I, torch.bfloat16, GroupedKernel(FP8).pack,
                            pin=False, fmt=FP8)
    dense = []
    for e in range(experts):
        weights = {w: torch.randn(shape, generator=g) * (0.05 + 0.05 * e)
                   for w, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I)))}
        for w, t in weights.items():
            q, scale = quantize_block(t, FP8.block)
            store.put(e, w, q)
            store.put(e, f"{w}_scale", scale)
        dense.append(weights)
    assert store.complete
    return store, dense


def test_fp8_store_and_slots_keep_weights_quantized_and_move_scales_with_them():
    store, _ = _fp8_store()
    assert store.w13.dtype == torch.float8_e4m3fn and store.rows["w13_scale"].shape[1:] == (4, 2)
    assert store.expert_bytes == 3 * H * I + 4 * (4 * 2 + 2 * 2)  # weights + float32 scales
    assert store.expert_bytes <= 0.52 * 3 * H * I * 2  # vs bf16
    stats = LayerStats()
    cache = ExpertCache(store, 2, torch.device("cpu"), "lru", stats)
    for wanted in ([0, 1], [2, 3], [1, 2], [0, 3]):  # evict and reload
        cache.wait(cache.start_loads(wanted))
        for e in wanted:
            for name, t in cache.slots.items():
                assert torch.equal(t[cache.slot_of[e]].view(torch.uint8) if t.dtype == torch.float8_e4m3fn
                                   else t[cache.slot_of[e]],
                                   store.rows[name][e].view(torch.uint8) if t.dtype == torch.float8_e4m3fn
                                   else store.rows[name][e]), (e, name)
    assert stats.bytes_loaded == stats.loads * store.expert_bytes


@pytest.mark.parametrize("shape", [(256, 128), (192, 256), (100, 60)])
def test_block_dequantization_is_scale_times_code_per_tile(shape):
    """Whole tiles (broadcast path) and partial ones alike: element (i, j) = q_ij · s_(i/b, j/b)."""
    q, scale = quantize_block(torch.randn(shape), FP8.block)
    i, j = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    expected = (q.float() * scale[i // 128, j // 128]).to(torch.bfloat16)
    assert torch.equal(FP8.dequantize(q, scale, torch.bfloat16), expected)


def test_dequantizing_kernels_compute_the_dequantized_experts():
    """Grouped and reference kernels on FP8 slots = the bf16 experts ``s · q``, by hand."""
    store, _ = _fp8_store()
    cache = ExpertCache(store, 4, torch.device("cpu"), "lru", LayerStats())
    cache.warm(range(4))
    x = torch.randn(11, H).to(torch.bfloat16)
    w, ids = route(torch.randn(11, 4), 2)
    expected = torch.zeros(11, H)
    for t in range(11):
        for j in range(2):
            e = int(ids[t, j])
            w13, w2 = store.rows.dequantized(FP8, e, torch.bfloat16)
            gate, up = (x[t] @ w13.t()).chunk(2)
            expected[t] += w[t, j] * ((torch.nn.functional.silu(gate) * up) @ w2.t()).float()
    for kernel in (GroupedKernel(FP8), ReferenceKernel(FP8)):
        out = torch.empty(11, H, dtype=torch.bfloat16)
        kernel(out, x, cache.slots, w, cache.slot_map[ids])
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2, msg=kernel.name)
    # another expert's scales in a slot change its output
    slots = cache.slots
    slots["w2_scale"][0], slots["w2_scale"][1] = slots["w2_scale"][1].clone(), slots["w2_scale"][0].clone()
    swapped = torch.empty(11, H, dtype=torch.bfloat16)
    GroupedKernel(FP8)(swapped, x, slots, w, cache.slot_map[ids])
    assert not torch.allclose(swapped.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def fp8_resident(engines, fp8_models):
    return greedy(engines.get(fp8_models[0], "adapmoe", dtype="bfloat16"))


@pytest.mark.parametrize("settings", [{"cache_slots": 2, "prefetch": True, "link_layers": 1},
                                      {"cache_slots": 1, "prefetch": True, "link_layers": 1}],
                         ids=["2-slots-prefetch", "1-slot-prefetch"])
def test_fp8_offloaded_matches_all_resident(engines, fp8_models, fp8_resident, settings):
    llm = engines.get(fp8_models[0], "adapmoe", dtype="bfloat16", **settings)
    vllm_adapmoe.reset_stats(llm)
    tokens, logprobs = greedy(llm)
    assert (tokens, logprobs) == fp8_resident  # identical, logprobs too
    s = vllm_adapmoe.stats(llm)
    total, layer = s["total"], s["layers"][0]
    assert layer["expert_bytes"] == 3 * H * I + 4 * (4 * 2 + 2 * 2)
    assert total["misses"] > 0 and total["bytes_loaded"] == total["loads"] * layer["expert_bytes"]


def test_fp8_model_is_close_to_the_bf16_model_it_dequantizes_to(engines, fp8_models, fp8_resident):
    """Stock serves the dequantized bf16 weights with its fused kernel, the plugin the FP8
    ones with its own: same weights, different kernels. Over each prompt's common prefix the
    chosen tokens' logprobs differ by < 0.2 (mean < 0.03); most continuations are identical
    (near-ties of a random model may flip)."""
    stock_tokens, stock_logprobs = greedy(engines.get(fp8_models[1], dtype="bfloat16"))
    tokens, logprobs = fp8_resident
    diffs = []
    for ta, la, tb, lb in zip(stock_tokens, stock_logprobs, tokens, logprobs):
        n = next((i for i, (a, b) in enumerate(zip(ta, tb)) if a != b), len(ta))
        diffs += [abs(a - b) for a, b in zip(la[:n], lb[:n])]
    same = sum(a == b for a, b in zip(stock_tokens, tokens))
    assert same >= 10 and max(diffs) < 0.2 and sum(diffs) / len(diffs) < 0.03, (same, max(diffs))


def test_fp8_under_tensor_parallelism_is_one_clear_error(engines, fp8_models):
    with pytest.raises(Exception, match="quantized experts under tensor parallelism"):
        engines.get(fp8_models[0], "adapmoe", dtype="bfloat16", tp=2, cache_slots=2)


def test_calibrate_reads_an_fp8_checkpoint_through_its_dequantized_weights(fp8_models, tmp_path):
    """``adapmoe calibrate`` on the FP8 checkpoint (dequantized into a bf16 copy for the Hugging
    Face model) gives the S_l of the dequantized model, and a profile for the FP8 one."""
    from vllm_adapmoe.offline.calibrate import calibrate
    from vllm_adapmoe.offline.profile import load_profile, save_profile

    fp8, dequantized = fp8_models
    got = calibrate(fp8, window=16, max_tokens=64, progress=False)
    ref = calibrate(dequantized, window=16, max_tokens=64, progress=False)
    assert got.sensitivity == pytest.approx(ref.sensitivity, rel=0.05)
    assert load_profile(save_profile(got, tmp_path / "p.json"), fp8).sensitivity == got.sensitivity
