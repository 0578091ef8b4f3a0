"""Default flags (no enforce_eager): vLLM compiles the model and the AdapMoE block runs as the
opaque op ``vllm::adapmoe_block``. Greedy tokens must equal stock vLLM compiled, strictly.

Eager mode against eager stock is covered by test_exactness.py / test_prefetch.py.
"""

import pytest
import torch

from conftest import greedy
from test_exactness import assert_same

import vllm_adapmoe
from vllm_adapmoe.models import BLOCK_OP


@pytest.fixture(scope="module")
def tiny_resident_compiled(engines, tiny_model):
    return greedy(engines.get(tiny_model, "adapmoe", eager=False))


@pytest.fixture(scope="module")
def tiny_stock_compiled(engines, tiny_model):
    return greedy(engines.get(tiny_model, eager=False))


# CI time (a compiled engine starts in ~70 s): one engine serves 1 slot + prefetch + prefill rows
# and the gating test. Built with gating, the graph reads T from a tensor, so T = 0 runs it
# ungated.
ONE_SLOT_GATED = {"cache_slots": 1, "prefetch": True, "link_layers": 1, "threshold": 0.01,
                  "sensitivity": [1.0] * 3,  # the tiny model's 3 MoE layers
                  "prefill_rows": 2}


# 2 slots (no prefetch) runs with -m slow; 1 slot + prefetch covers waves and prefetch
@pytest.mark.parametrize("settings", [pytest.param({"cache_slots": 2}, marks=pytest.mark.slow),
                                      ONE_SLOT_GATED], ids=["2-slots", "1-slot-prefetch"])
def test_tiny_compiled_offloaded_matches_compiled_all_resident(engines, tiny_model,
                                                               tiny_resident_compiled, settings):
    """Inside the compiled graph, the budget never changes a token (waves, copies, prefetch)."""
    llm = engines.get(tiny_model, "adapmoe", eager=False, **settings)
    if "threshold" in settings:
        vllm_adapmoe.set_gating(llm, 0.0)
    try:
        vllm_adapmoe.reset_stats(llm)
        assert_same(tiny_resident_compiled, greedy(llm))
    finally:
        if "threshold" in settings:
            vllm_adapmoe.set_gating(llm, settings["threshold"])
    stats = vllm_adapmoe.stats(llm)
    total = stats["total"]  # the op ran the block every step, counting it
    assert total["decode_tokens"] > 0 and total["loads"] > 0 and total["misses"] > 0
    assert total["top1_tokens"] == 0
    if "prefill_rows" in settings:  # 1 row for the one-slot layers (top-2) + the prefill rows
        first = stats["layers"][0]
        assert first["staging_bytes"] == (1 + settings["prefill_rows"]) * first["slot_bytes"]
        assert total["prefill_tokens"] > 0 and total["prefill_step_loads"] > 0


def test_tiny_compiled_matches_stock_compiled(tiny_stock_compiled, tiny_resident_compiled):
    """Needs the top-k softmax traced in the graph as stock's CPU router is (inductor keeps its
    weights in float32; eager softmax would round them to bf16 and flip near-tie tokens)."""
    assert_same(tiny_stock_compiled, tiny_resident_compiled)


def test_host_only_compiled_matches_stock(engines, tiny_model, tiny_stock_compiled):
    """Hybrid execution compiled: every expert computed on the host, inside the opaque op."""
    llm = engines.get(tiny_model, "adapmoe", eager=False, cache_slots=1, hybrid="host-only")
    vllm_adapmoe.reset_stats(llm)
    assert_same(tiny_stock_compiled, greedy(llm))
    total = vllm_adapmoe.stats(llm)["total"]
    assert total["loads"] == 0 and total["host_experts"] > 0


@pytest.mark.slow  # ~2 min; the tiny model covers 1 slot + prefetch compiled in the default run
def test_bundled_compiled_matches_stock_compiled_at_one_slot_with_prefetch(engines, bundled_model):
    """The 16-prompt batch on the trained model, compiled: stock = all resident = 1 slot + prefetch."""
    stock = greedy(engines.get(bundled_model, eager=False))
    assert_same(stock, greedy(engines.get(bundled_model, "adapmoe", eager=False)))
    assert_same(stock, greedy(engines.get(bundled_model, "adapmoe", eager=False, cache_slots=1,
                                          prefetch=True, link_layers=1)))


def test_block_op_fake_impl_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import vllm_adapmoe.models.moe_op  # noqa: F401  (registers the op)

    for dtype in (torch.float32, torch.bfloat16):
        with FakeTensorMode():
            x = torch.empty(7, 64, dtype=dtype)
            weights, ids = torch.empty(7, 2), torch.empty(7, 2, dtype=torch.int32)
            keep, summary = torch.empty(7, dtype=torch.int64), torch.empty(17, dtype=torch.int64)
            predicted = torch.empty(7, 2, dtype=torch.int32)
            y = torch.ops.vllm.adapmoe_block(x, weights, ids, weights, ids, keep, summary,
                                             predicted, "model.layers.0.block_sparse_moe")
        assert y.shape == (7, 64) and y.dtype == dtype


class _RecordingBlock:
    """Stands in for an AdapMoEBlock in the forward context: y = 2x, and counts its calls."""

    calls = 0

    def run_step(self, x: torch.Tensor, *prepared: torch.Tensor | None) -> torch.Tensor:
        self.calls += 1
        return 2 * x


def test_block_op_stays_one_opaque_node_under_torch_compile():
    """fullgraph compile (no graph break) keeps the op as a node and runs the real block."""
    from vllm.config import VllmConfig
    from vllm.forward_context import set_forward_context

    import vllm_adapmoe.models.moe_op  # noqa: F401

    config = VllmConfig()
    block = _RecordingBlock()
    config.compilation_config.static_forward_context["blk"] = block
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    w = torch.randn(16, 8)

    @torch.compile(fullgraph=True, backend=backend, dynamic=True)
    def layer(x):
        logits = x @ w
        weights, ids = torch.topk(logits, 2)
        ids = ids.to(torch.int32)
        summary = torch.zeros(9, dtype=torch.int64)
        return torch.ops.vllm.adapmoe_block(x, weights, ids, weights, ids, None, summary,
                                            ids[:, :0], "blk") + 1

    x = torch.randn(5, 16)
    with set_forward_context(None, config):
        y = layer(x)
        y3 = layer(torch.randn(3, 16))
    assert torch.equal(y, 2 * x + 1) and y3.shape == (3, 16)
    assert block.calls == 2 and len(graphs) == 1  # one graph for both sizes; the op ran twice
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.vllm.adapmoe_block.default in ops or torch.ops.vllm.adapmoe_block in ops


def test_engine_config_splits_the_graph_at_the_block_only_for_adapmoe(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    def splitting(impl):
        args = EngineArgs(model=str(tiny_model), model_impl=impl, max_model_len=512)
        return args.create_engine_config().compilation_config.splitting_ops or []

    assert BLOCK_OP in splitting("adapmoe")
    assert BLOCK_OP not in splitting("auto")


def test_full_cuda_graph_mode_is_a_clear_error():
    from vllm.config import CompilationConfig

    from vllm_adapmoe import AdapMoEConfigError, compile_around_block

    cc = compile_around_block(CompilationConfig())
    assert cc.cudagraph_mode.name == "PIECEWISE"
    assert cc.splitting_ops[-1] == BLOCK_OP and len(cc.splitting_ops) > 1  # after attention
    kept = compile_around_block({"splitting_ops": ["vllm::unified_attention_with_output"]})
    assert kept.splitting_ops == ["vllm::unified_attention_with_output", BLOCK_OP]
    with pytest.raises(AdapMoEConfigError, match="PIECEWISE"):
        compile_around_block({"cudagraph_mode": "FULL_AND_PIECEWISE"})


def test_gating_threshold_changes_inside_the_compiled_graph(engines, tiny_model,
                                                            tiny_resident_compiled):
    """Built with gating, the compiled graph reads T and S_l from a tensor: set_gating at run time
    takes effect without recompiling (T = 0 gives back stock's tokens; a high T gates)."""
    llm = engines.get(tiny_model, "adapmoe", eager=False, **ONE_SLOT_GATED)
    assert len(vllm_adapmoe.stats(llm)["layers"]) == len(ONE_SLOT_GATED["sensitivity"])
    try:
        vllm_adapmoe.set_gating(llm, 0.0)
        vllm_adapmoe.reset_stats(llm)
        assert_same(tiny_resident_compiled, greedy(llm))
        off = vllm_adapmoe.stats(llm)["total"]
        assert off["top1_tokens"] == 0 and off["activated_experts"] == 2 * off["tokens"]
        vllm_adapmoe.set_gating(llm, 1.0)  # w2^2 < 1 always: every token keeps one expert
        vllm_adapmoe.reset_stats(llm)
        greedy(llm)
        on = vllm_adapmoe.stats(llm)["total"]
        assert on["top1_tokens"] == on["decode_tokens"] > 0
    finally:
        vllm_adapmoe.set_gating(llm, ONE_SLOT_GATED["threshold"])
