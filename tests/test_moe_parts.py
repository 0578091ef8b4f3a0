"""Unit tests of the block's parts: routing, waves, eviction policies, fused vs reference kernel."""

import pytest
import torch

from vllm_adapmoe.engine.cache import ExpertCache
from vllm_adapmoe.engine.expert_tensors import ExpertFormat
from vllm_adapmoe.engine.link import Link
from vllm_adapmoe.engine.slot_table import LFUPolicy, LRUPolicy
from vllm_adapmoe.engine.kernels import GroupedKernel, ReferenceKernel
from vllm_adapmoe.models.kernels import FusedCpuKernel
from vllm_adapmoe.engine.store import HostExpertStore
from vllm_adapmoe.engine.stats import LayerStats
from vllm_adapmoe.engine.plan import plan_waves
from vllm_adapmoe.engine.routing import route


def test_route_is_renormalised_top_k():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    w, ids = route(logits, 2)
    assert sorted(ids[0].tolist()) == [1, 2]
    assert torch.allclose(w.sum(-1), torch.ones(1))
    assert w.dtype == torch.float32 and ids.dtype == torch.int32


def test_lru_evicts_least_recent_unprotected():
    p = LRUPolicy()
    for e in (1, 2, 3):
        p.touch(e)
    p.touch(1)
    assert p.victim([1, 2, 3], protected=set()) == 2
    assert p.victim([1, 2, 3], protected={2}) == 3


def test_lfu_evicts_least_frequent_then_least_recent():
    p = LFUPolicy()
    for e in (1, 1, 1, 2, 2, 3, 4):
        p.touch(e)
    assert p.victim([1, 2, 3, 4], protected=set()) == 3  # 3 and 4 used once; 3 longer ago
    assert p.victim([1, 2, 3, 4], protected={3, 4}) == 2


def test_no_wave_split_when_everything_fits():
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    waves = plan_waves(ids, [0, 1, 2], capacity=3, resident={2: 0})
    assert [(w.rows, w.experts, w.resident, w.loads) for w in waves] == [(None, [2, 0, 1], [2], [0, 1])]


@pytest.mark.parametrize("seed", range(5))
def test_waves_cover_every_token_once_within_capacity(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(50)]).int()
    needed = ids.unique().tolist()
    waves = plan_waves(ids, needed, capacity=3, resident={})
    seen = torch.cat([w.rows for w in waves])
    assert sorted(seen.tolist()) == list(range(50))
    for wave in waves:
        assert len(wave.experts) <= 3
        assert set(ids[wave.rows].flatten().tolist()) <= set(wave.experts)


def _random_experts(E=4, H=64, I=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(2 * I, H, generator=g) * 0.05 for _ in range(E)],
            [torch.randn(H, I, generator=g) * 0.05 for _ in range(E)])


def _store(kernel, E=4, H=64, I=80, pin=False):
    w13s, w2s = _random_experts(E, H, I)
    store = HostExpertStore(E, H, I, kernel.padded_intermediate(I), torch.float32, kernel.pack, pin=pin)
    for e in range(E):
        store.put(e, "w1", w13s[e][:I])
        store.put(e, "w3", w13s[e][I:])
        store.put(e, "w2", w2s[e])
    assert store.complete
    return store


def test_fused_kernel_on_slots_matches_reference_loop():
    x = torch.randn(9, 64)
    w, ids = route(torch.randn(9, 4), 2)
    outs = {}
    for kernel in (FusedCpuKernel(torch.float32, 64, 80), GroupedKernel(), ReferenceKernel()):
        store = _store(kernel)
        cache = ExpertCache(store, 4, torch.device("cpu"), "lru", LayerStats())
        cache.warm(range(4))
        out = torch.empty(9, 64)
        kernel(out, x, cache.slots, w, cache.slot_map[ids])
        outs[kernel.name] = out
    torch.testing.assert_close(outs["fused-cpu"], outs["reference"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs["grouped"], outs["reference"], atol=1e-5, rtol=1e-4)


GPT_OSS = ExpertFormat("swigluoai", bias=True)


def test_biased_swigluoai_kernels_match_transformers_gpt_oss_experts():
    """gpt-oss experts (interleaved gate/up, clamped SwiGLU, biases) loaded from its stacked
    x·W checkpoint tensors: the fused CPU kernel, the grouped and the reference kernel on the
    slots equal transformers' own ``GptOssExperts`` on the same weights and routing."""
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from vllm_adapmoe.engine.weights import load_moe_weights

    E, H, I, T = 4, 64, 32, 9
    config = transformers.GptOssConfig(num_local_experts=E, hidden_size=H, intermediate_size=I)
    reference = GptOssExperts(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():  # large enough that the ±7 clamps bite
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    x = torch.randn(T, H, generator=g)
    w, ids = route(torch.randn(T, E, generator=g), 2)
    with torch.no_grad():
        expected = reference(x, ids.long(), w)
    checkpoint = [(f"experts.{n}", p.detach()) for n, p in reference.named_parameters()]
    for kernel in (FusedCpuKernel(torch.float32, H, I, GPT_OSS), GroupedKernel(GPT_OSS),
                   ReferenceKernel(GPT_OSS)):
        store = HostExpertStore(E, H, I, kernel.padded_intermediate(I), torch.float32,
                                kernel.pack, pin=False, fmt=GPT_OSS)
        load_moe_weights(checkpoint, torch.nn.Identity(), store, (0, 1))
        assert store.complete and store.expert_bytes == (3 * H * I + 2 * I + H) * 4
        cache = ExpertCache(store, 3, torch.device("cpu"), "lru", LayerStats())
        cache.wait(cache.start_loads(sorted(set(ids.flatten().tolist()))[:3]))  # loads move biases
        cache.wait(cache.start_loads(sorted(set(ids.flatten().tolist()))[3:]))
        resident = torch.tensor(sorted(cache.slot_of))
        rows = torch.isin(ids, resident).all(1)  # tokens whose experts are both resident
        out = torch.empty(int(rows.sum()), H)
        kernel(out, x[rows], cache.slots, w[rows], cache.slot_map[ids[rows]])
        torch.testing.assert_close(out, expected[rows], atol=1e-4, rtol=1e-4, msg=kernel.name)
        assert rows.any()


def test_cache_loads_count_bytes_and_never_evict_protected():
    kernel = ReferenceKernel()
    stats = LayerStats()
    cache = ExpertCache(_store(kernel), 2, torch.device("cpu"), "lru", stats)
    cache.wait(cache.start_loads([0, 1]))
    cache.wait(cache.start_loads([1, 2]))  # evicts 0 (1 is protected)
    assert sorted(cache.slot_of) == [1, 2]
    assert stats.loads == 3 and stats.evictions == 1
    assert stats.bytes_loaded == 3 * cache.store.expert_bytes
    assert torch.equal(cache.slots.w13[cache.slot_of[2]], cache.store.rows.w13[2])


def test_emulated_link_makes_loads_take_bytes_over_bandwidth():
    kernel = ReferenceKernel()
    stats = LayerStats()
    store = _store(kernel)
    gbps = store.expert_bytes * 20 / 1e9  # one expert = 50 ms
    cache = ExpertCache(store, 2, torch.device("cpu"), "lru", stats, Link(torch.device("cpu"), gbps))
    cache.wait(cache.start_loads([0, 1]))  # two loads queue on one link
    assert stats.stall_s >= 0.095


def test_shared_staging_row_holds_only_what_a_full_wave_needs():
    """A one-slot layer (own=1) of a top-2 model: the second expert of a wave goes to the
    shared staging row and is gone after the step; prefetches never use staging."""
    from vllm_adapmoe.engine.slot_table import SlotTable

    stats = LayerStats()
    table = SlotTable(2, LRUPolicy(), stats, own=1)
    assert table.admit([3]) == [(3, 0)]  # the own slot first
    assert table.admit([3, 5]) == [(5, 1)]  # 3 needed too: 5 is staged
    table.release_staging()
    assert table.slot_of == {3: 0} and table.expert_in_slot == [3, -1]
    assert table.admit([5]) == [(5, 0)]  # an unneeded own resident is evicted, not staged
    assert table.prefetch([7], keep=[5]) == []  # would evict a predicted expert; no staging
    assert table.prefetch([7]) == [(7, 0)]
    assert stats.loads == 3 + 1 and stats.prefetch_issued == 1
