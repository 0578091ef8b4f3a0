"""--model-impl adapmoe selects the plugin; nothing else does; bad input fails at start-up."""

import json
import shutil

import pytest


def resolved_architecture(model, impl):
    from vllm.config import ModelConfig
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what LLM(...) and the CLI do first in every process
    return ModelConfig(model=str(model), model_impl=impl).architecture


def test_flag_selects_adapmoe_class(tiny_model):
    assert resolved_architecture(tiny_model, "adapmoe") == "AdapMoEMixtralForCausalLM"


@pytest.mark.parametrize("impl", ["auto", "vllm"])
def test_without_flag_vllm_is_stock(tiny_model, impl):
    assert resolved_architecture(tiny_model, impl) == "MixtralForCausalLM"


def test_stock_engine_runs_stock_model(engines, tiny_model):
    from vllm_adapmoe import stats

    with pytest.raises(RuntimeError, match="does not run an AdapMoE model"):
        stats(engines.get(tiny_model))


def test_unsupported_architecture_is_a_clear_error(tiny_model, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supports the architectures.*MixtralForCausalLM.*Drop --model-impl adapmoe"):
        resolved_architecture(other, "adapmoe")
    assert resolved_architecture(other, "auto") == "LlamaForCausalLM"


@pytest.mark.parametrize("settings, message", [
    ({"cache_slot": 2}, "unknown adapmoe setting"),
    ({"cache_slots": 0}, "cache_slots must be >= 1"),
    ({"cache_slots": "2"}, "cache_slots must be an integer"),
    ({"cache_slots": 2, "cache_gib": 1.0}, "at most one of"),
    ({"eviction": "fifo"}, 'eviction must be "lru", "lfu" or "mrs"'),
    ({"cache_slots": [1, 2]}, "3 MoE layers"),
    ({"cache_slots": 9}, "more than the 8 experts"),
    ({"cache_gib": 100.0}, "more than all experts need"),
    ({"cache_total_slots": 2}, "fewer than one slot per MoE layer"),
])
def test_bad_settings_fail_at_startup_with_the_key_named(tiny_model, settings, message):
    from vllm import LLM

    with pytest.raises(Exception, match=message):
        LLM(model=str(tiny_model), model_impl="adapmoe", enforce_eager=True, max_model_len=128,
            additional_config={"adapmoe": settings})


def test_adapmoe_settings_without_the_flag_are_an_error(tiny_model):
    from vllm import LLM

    with pytest.raises(ValueError, match="add --model-impl adapmoe"):
        LLM(model=str(tiny_model), additional_config={"adapmoe": {"cache_slots": 2}})
