"""The whole AdapMoE workflow from the command line, then serving with its result:
calibrate → trace → profile (miss curves) → plan → LLM(plan="dp", prefetch; with hybrid) —
still exact."""

import json

import pytest

import vllm_adapmoe
from conftest import greedy
from test_architectures import family_models  # noqa: F401  (fixture)
from test_exactness import assert_same
from vllm_adapmoe.cli import main
from vllm_adapmoe.offline.profile import load_profile


def test_cli_workflow_and_dp_prefetch_engine_is_exact(engines, tiny_model, tmp_path, capsys):
    prof, trace, plan = tmp_path / "p.json", tmp_path / "t.npz", tmp_path / "plan.json"
    assert main(["calibrate", str(tiny_model), "--out", str(prof), "--window", "64",
                 "--max-tokens", "512", "--quiet"]) == 0
    assert main(["trace", str(tiny_model), "--out", str(trace), "--prompts", "6",
                 "--prompt-tokens", "16", "--max-tokens", "24", "--batch", "1"]) == 0
    capsys.readouterr()
    assert main(["profile", str(prof), "--trace", str(trace)]) == 0
    # 6 requests of 24 tokens: the curves are that trace's noise, and the user is told
    assert "decoded tokens per layer; curves from under 512" in capsys.readouterr().err
    profile = load_profile(prof, tiny_model)
    assert len(profile.miss_curves) == 3 and all(len(c) == 8 for c in profile.miss_curves)
    assert all(c[-1] <= c[0] for c in profile.miss_curves)  # all 8 resident: fewest misses
    assert profile.prediction[0]["top1"] is None and profile.prediction[1]["top1"] is not None
    # --threshold gates the host curves as it gates the miss curves: every decode token top-1
    gated = tmp_path / "gated.json"
    assert main(["profile", str(prof), "--trace", str(trace), "--threshold", "1e9",
                 "--out", str(gated)]) == 0
    gated_curves = load_profile(gated, tiny_model).host_curves
    assert all(g[0] < u[0] for g, u in zip(gated_curves, profile.host_curves))

    assert main(["plan", str(prof), "--total-slots", "9", "--out", str(plan)]) == 0
    planned = json.loads(plan.read_text())
    slots, staging = planned["slots"], planned["staging_rows"]
    # the 9 slots are own slots plus the rows layers below top_k = 2 share
    assert sum(slots) + staging == planned["device_slots"] == 9 and staging == max(0, 2 - min(slots))

    llm = engines.get(tiny_model, "adapmoe", cache_total_slots=9, plan="dp", profile=str(prof),
                      prefetch=True, link_layers=1)
    assert [layer["slots"] for layer in vllm_adapmoe.stats(llm)["layers"]] == slots
    stock = greedy(engines.get(tiny_model))
    assert_same(stock, greedy(llm))

    # hybrid on this CPU (no emulated link): the host-curve plan keeps whole layers only
    hybrid = engines.get(tiny_model, "adapmoe", cache_total_slots=9, plan="dp",
                         profile=str(prof), hybrid="auto")
    vllm_adapmoe.reset_stats(hybrid)
    assert_same(stock, greedy(hybrid))
    slots = [layer["slots"] for layer in vllm_adapmoe.stats(hybrid)["layers"]]
    assert sorted(slots) == [0, 0, 8], slots  # one whole layer; the last slot stays unused
    assert vllm_adapmoe.stats(hybrid)["total"]["host_experts"] > 0


def test_plan_without_miss_curves_is_a_clear_error(tiny_model, tmp_path, capsys):
    prof = tmp_path / "p.json"
    assert main(["calibrate", str(tiny_model), "--out", str(prof), "--window", "64",
                 "--max-tokens", "256", "--quiet"]) == 0
    assert main(["plan", str(prof), "--total-slots", "9"]) == 2
    assert "adapmoe profile" in capsys.readouterr().err


# CI time: DeepSeek-V2 by default (dense first layer, its own config names, like GLM-4.5)
@pytest.mark.parametrize("family", [
    "deepseek_v2",
    *(pytest.param(f, marks=pytest.mark.slow) for f in ("glm4_moe", "qwen2_moe", "qwen3_moe", "olmoe"))])
def test_family_workflow_calibrate_trace_profile_serve(engines, family_models, family, tmp_path):
    """The documented workflow on families with dense layers and their own config names:
    the profile numbers MoE layers as serving does, and serving with it gates and plans."""
    from vllm_adapmoe.config import AdapMoEConfig
    from vllm_adapmoe.offline.profile import moe_shape_of

    model = family_models(family)
    shape = moe_shape_of(model)
    prof, trace = tmp_path / "p.json", tmp_path / "t.npz"
    assert main(["calibrate", str(model), "--out", str(prof), "--window", "64",
                 "--max-tokens", "256", "--quiet"]) == 0
    assert main(["trace", str(model), "--out", str(trace), "--prompts", "4",
                 "--prompt-tokens", "16", "--max-tokens", "16", "--batch", "1"]) == 0
    assert main(["profile", str(prof), "--trace", str(trace)]) == 0
    profile = load_profile(prof, model)
    assert len(profile.sensitivity) == len(profile.miss_curves) == shape.num_layers
    assert all(len(c) == shape.num_experts + 1 for c in profile.host_curves)
    total = shape.num_layers * 6 + shape.top_k - 1  # the hybrid plan may also use 0-slot layers
    hybrid = AdapMoEConfig.from_dict({"profile": str(prof), "cache_total_slots": total,
                                      "plan": "dp", "hybrid": "auto"})
    assert sum(hybrid.slots_per_layer(shape.num_layers, shape.num_experts, 1, str(model),
                                      shape.top_k)) <= total
    # below one slot per layer: layers with no own slot live on the host, no error
    small = AdapMoEConfig.from_dict({"profile": str(prof), "cache_total_slots": 2,
                                     "plan": "dp", "hybrid": "auto"})
    assert sum(small.slots_per_layer(shape.num_layers, shape.num_experts, 1, str(model),
                                     shape.top_k)) <= 2

    llm = engines.get(model, "adapmoe", profile=str(prof), threshold=0.05, plan="dp",
                      cache_total_slots=total)
    vllm_adapmoe.reset_stats(llm)
    tokens, _ = greedy(llm, max_tokens=8)
    assert all(len(t) == 8 for t in tokens)
    stats = vllm_adapmoe.stats(llm)["total"]
    assert stats["activated_experts"] < shape.top_k * stats["tokens"] and stats["misses"] > 0


def test_a_trace_long_enough_for_its_curves_is_not_warned_about(capsys):
    """The bundled trace (1,520 decoded tokens per layer) profiles without the short-trace
    warning that a few requests' trace gets (the workflow test above)."""
    from pathlib import Path

    from vllm_adapmoe.cli import _warn_if_short
    from vllm_adapmoe.offline.trace import Trace

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "trace_bundled_b1.npz"
    _warn_if_short(Trace.load(path), str(path))
    assert capsys.readouterr().err == ""
