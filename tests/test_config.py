"""AdapMoEConfig: typed parsing, budgets → slots per layer."""

import pytest

from vllm_adapmoe.config import AdapMoEConfig, AdapMoEConfigError, uniform_split


def test_defaults_keep_every_expert_resident():
    cfg = AdapMoEConfig.from_additional_config(None)
    assert cfg.slots_per_layer(4, 8, 1000) == [8, 8, 8, 8]
    assert cfg.threshold == 0 and cfg.eviction == "lru" and not cfg.prefetch


def test_budget_forms():
    assert AdapMoEConfig.from_dict({"cache_slots": 3}).slots_per_layer(4, 8, 10) == [3] * 4
    assert AdapMoEConfig.from_dict({"cache_slots": [8, 4, 2, 1]}).slots_per_layer(4, 8, 10) == [8, 4, 2, 1]
    assert AdapMoEConfig.from_dict({"cache_total_slots": 10}).slots_per_layer(4, 8, 10) == [3, 3, 2, 2]
    gib = 10 * 1000 / 2**30  # room for exactly 10 experts of 1000 bytes
    assert AdapMoEConfig.from_dict({"cache_gib": gib}).slots_per_layer(4, 8, 1000) == [3, 3, 2, 2]


def test_uniform_split_sums_to_total():
    for total in range(4, 33):
        split = uniform_split(total, 4)
        assert sum(split) == total and max(split) - min(split) <= 1


@pytest.mark.parametrize("raw", [
    [], {"cache_slots": True}, {"cache_slots": [1, 0]}, {"cache_slots": []}, {"link_gbps": 0},
    {"threshold": -1}, {"plan": "greedy"}, {"gate_prefill": "yes"}, {"kernel": "cuda"},
    {"cache_total_slots": 0}, {"cache_gib": -2},
])
def test_bad_values_raise(raw):
    with pytest.raises(AdapMoEConfigError, match="adapmoe"):
        AdapMoEConfig.from_dict(raw)


@pytest.mark.parametrize("raw", [{"plan": "dp"}, {"plan": "dp", "cache_total_slots": 8},
                                 {"plan": "dp", "profile": "p.json", "cache_slots": 2}])
def test_dp_plan_needs_a_profile_and_a_total_budget(raw):
    with pytest.raises(AdapMoEConfigError, match="miss curves of a profile"):
        AdapMoEConfig.from_dict(raw)


def test_threshold_needs_sensitivities():
    with pytest.raises(AdapMoEConfigError, match="adapmoe calibrate"):
        AdapMoEConfig.from_dict({"threshold": 0.01})
    cfg = AdapMoEConfig.from_dict({"threshold": 0.01, "sensitivity": [1, 2, 3]})
    assert cfg.sensitivities(3, None) == [1.0, 2.0, 3.0]
    with pytest.raises(AdapMoEConfigError, match="one per layer"):
        cfg.sensitivities(4, None)


def test_budget_pays_for_shared_staging_rows():
    """Below top_k slots per layer the budget also pays for the shared staging rows."""
    cfg = AdapMoEConfig.from_dict({"cache_total_slots": 6})
    assert cfg.slots_per_layer(4, 8, 10, top_k=2) == [2, 1, 1, 1]  # + 1 staging row = 6
    assert cfg.slots_per_layer(4, 8, 10, top_k=1) == [2, 2, 1, 1]
    with pytest.raises(AdapMoEConfigError, match="staging row"):
        AdapMoEConfig.from_dict({"cache_total_slots": 4}).slots_per_layer(4, 8, 10, top_k=2)
    # host-only never loads: no staging rows, the whole budget is own slots (0 allowed)
    host_only = AdapMoEConfig.from_dict({"cache_total_slots": 6, "hybrid": "host-only"})
    assert host_only.slots_per_layer(4, 8, 10, top_k=2) == [2, 2, 1, 1]
    assert AdapMoEConfig.from_dict({"cache_total_slots": 2, "hybrid": "host-only"}
                                   ).slots_per_layer(4, 8, 10, top_k=2) == [1, 1, 0, 0]


def test_prefill_rows_come_out_of_a_total_budget_and_are_checked():
    """The shared prefill rows are paid from cache_total_slots / cache_gib before the split,
    come on top of cache_slots, and make no sense without offloading or with host-only."""
    cfg = AdapMoEConfig.from_dict({"cache_total_slots": 12, "prefill_rows": 4})
    assert cfg.slots_per_layer(4, 8, 10, top_k=2) == [2, 2, 2, 2]
    assert AdapMoEConfig.from_dict({"cache_slots": 2, "prefill_rows": 4}
                                   ).slots_per_layer(4, 8, 10, top_k=2) == [2, 2, 2, 2]
    with pytest.raises(AdapMoEConfigError, match="takes all of cache_total_slots=4"):
        AdapMoEConfig.from_dict({"cache_total_slots": 4, "prefill_rows": 4}
                                ).slots_per_layer(4, 8, 10, top_k=2)
    for raw, match in (({"prefill_rows": 2}, "every expert resident"),
                       ({"cache_slots": 2, "prefill_rows": -1}, "integer >= 0"),
                       ({"cache_slots": 2, "prefill_rows": 1.5}, "an integer"),
                       ({"cache_slots": 2, "prefill_rows": 2, "hybrid": "host-only"},
                        "never loads")):
        with pytest.raises(AdapMoEConfigError, match=match):
            AdapMoEConfig.from_dict(raw)


@pytest.mark.parametrize("raw, match", [
    ({"emulate": "a100"}, "emulate must be one of"),
    ({"emulate": "h100-pcie4", "link_gbps": 10}, "drop \"link_gbps\""),
    ({"emulate_scale": 400}, "set \"emulate\" too"),
    ({"emulate": "h100-pcie4", "emulate_scale": 0}, "emulate_scale must be a number > 0"),
    ({"emulate": "h100-pcie4", "emulate_scale": "fast"}, "emulate_scale"),
    ({"host_threads": 4}, "host_threads needs hybrid"),
    ({"hybrid": "auto", "host_threads": 0}, "host_threads must be >= 1"),
    ({"copy_timeout_s": 0}, "copy_timeout_s must be a number of seconds > 0"),
])
def test_emulation_and_host_settings_are_checked(raw, match):
    with pytest.raises(AdapMoEConfigError, match=match):
        AdapMoEConfig.from_dict(raw)


def test_settings_for_one_kind_of_machine():
    emulated = AdapMoEConfig.from_dict({"emulate": "rtx4090-pcie4", "hybrid": "auto"})
    emulated.check_platform("cpu")
    assert emulated.engine_settings().emulate == "rtx4090-pcie4"
    pinned = AdapMoEConfig.from_dict({"emulate": "h100-pcie4", "emulate_scale": 440})
    assert pinned.engine_settings().emulate_scale == 440.0
    with pytest.raises(AdapMoEConfigError, match="for CPU experiments"):
        emulated.check_platform("cuda")
    threads = AdapMoEConfig.from_dict({"hybrid": "auto", "host_threads": 8})
    threads.check_platform("cuda")
    with pytest.raises(AdapMoEConfigError, match="VLLM_CPU_OMP_THREADS_BIND"):
        threads.check_platform("cpu")


def test_a_layer_may_live_on_the_host_only_with_hybrid():
    cfg = AdapMoEConfig.from_dict({"cache_slots": [0, 8, 0, 8], "hybrid": "host-only"})
    assert cfg.slots_per_layer(4, 8, 10) == [0, 8, 0, 8]
    with pytest.raises(AdapMoEConfigError, match="needs \"hybrid\""):
        AdapMoEConfig.from_dict({"cache_slots": [0, 8, 0, 8]})
