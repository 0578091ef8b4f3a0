"""The expert-aware scheduler (``"scheduling": "expert-aware"``): the hold-or-release rule by hand,
and inside vLLM with requests arriving while others decode (the engine stepped by hand, so the
arrivals are the same every run)."""

from __future__ import annotations

import pytest

import vllm_adapmoe
from vllm_adapmoe.config import AdapMoEConfig, AdapMoEConfigError
from vllm_adapmoe.engine.admission import PromptAdmission, PromptStepCost, Waiting

# an emulated slow link: a prompt step's loads (6 layers x 6 cold experts, some more than once:
# waves of 2 slots) cost ~0.14-0.6 s against a few loads per decode step, so holding pays; the
# bound keeps holds short
SETTINGS = dict(cache_slots=2, link_gbps=0.05, scheduling="expert-aware", max_prompt_hold_ms=400)
PROMPTS = ["the quick brown fox jumps over", "ROMEO: what light through yonder",
           "a mixture of experts", "to be or not to be, that is", "JULIET: wherefore art thou"]


def _admission(cost_s: float, max_hold_s: float = 1.0, gap_s: float = 0.05) -> PromptAdmission:
    a = PromptAdmission(PromptStepCost(cost_s), max_hold_s)
    for i in range(int(2.0 / gap_s)):  # requests arriving every gap_s over the 2 s window
        a.arrivals.arrived(-i * gap_s)
    return a


def test_prompts_are_held_until_their_waits_add_up_to_what_releasing_costs():
    a = _admission(0.1)  # a prompt step costs 4 slots (2 decoding + 2 waiting) 0.1 s: 0.4
    waiting = [Waiting("a", 0.0), Waiting("b", 0.05)]
    assert a.hold(0.08, waiting, decoding=2, prompt_in_progress=False)      # 0.08 + 0.03
    assert a.hold(0.2, waiting, decoding=2, prompt_in_progress=False)       # 0.2 + 0.15
    assert not a.hold(0.25, waiting, decoding=2, prompt_in_progress=False)  # 0.25 + 0.2
    a.scheduled(["a", "b"], [], prompt_tokens=12, now=0.25)
    assert a.stats.requests_held == 2 and a.stats.held_steps == 2
    assert a.stats.held_max_s == pytest.approx(0.17) and a.stats.held_s == pytest.approx(0.34)
    assert a.stats.prompt_steps == 1 and a.stats.prompt_tokens == 12 and not a.held


def test_holding_needs_arrivals_frequent_enough_to_share_the_prompt_step():
    one = [Waiting("a", 0.0)]  # itself the arrival at 0.0, which λ leaves out
    # λ·c·(n + k) against k: 19.5/s x 0.1 s x 2 slots = 3.9 > 1 holds; at 1.5/s it is 0.3
    assert _admission(0.1, gap_s=0.05).hold(0.01, one, decoding=1, prompt_in_progress=False)
    assert not _admission(0.1, gap_s=0.5).hold(0.01, one, decoding=1, prompt_in_progress=False)
    fresh = PromptAdmission(PromptStepCost(0.1), 1.0)  # no arrival rate yet: nothing held
    assert not fresh.hold(0.01, one, decoding=9, prompt_in_progress=False)
    quiet = _admission(0.1)  # the same arrivals, after a quiet spell of 3 s
    assert not quiet.hold(3.0, one, decoding=1, prompt_in_progress=False)
    many = [Waiting(str(i), 0.0) for i in range(6)]  # 19.5/s x 0.1 x 8 > 6; at 4.5/s 3.6 < 6
    assert _admission(0.1).hold(0.01, many, decoding=2, prompt_in_progress=False)
    assert not _admission(0.1, gap_s=0.2).hold(0.01, many, decoding=2, prompt_in_progress=False)


def test_a_prompt_arriving_alone_is_not_held_however_costly_its_step():
    """The arrival that raised the question is no sign of others: counting it, any lone prompt
    would read as 1 / 2 s = 0.5 requests per second and be held (0.5 x 10 s x 4 slots = 20 > 1)."""
    a = PromptAdmission(PromptStepCost(10.0), max_hold_s=5.0)
    a.arrivals.arrived(-30.0)  # the decoding ones came long ago
    a.arrivals.arrived(0.0)
    assert not a.hold(0.01, [Waiting("a", 0.0)], decoding=3, prompt_in_progress=False)
    a.arrivals.arrived(0.2)  # a second prompt close behind: evidence of a rate (0.5/s)
    assert a.hold(0.21, [Waiting("a", 0.0), Waiting("b", 0.2)], decoding=3,
                  prompt_in_progress=False)


def test_nothing_is_held_with_nothing_to_delay_a_prompt_started_or_the_bound_reached():
    a = _admission(0.1, max_hold_s=0.5)
    one = [Waiting("a", 0.0)]
    assert not a.hold(0.01, one, decoding=0, prompt_in_progress=False)   # nobody decodes
    assert not a.hold(0.01, one, decoding=3, prompt_in_progress=True)    # its chunks go on
    assert not a.hold(0.01, [], decoding=3, prompt_in_progress=False)
    assert a.hold(0.2, one, decoding=9, prompt_in_progress=False)
    assert not a.hold(0.5, one, decoding=9, prompt_in_progress=False)    # TTFT bound
    assert not _admission(0.0).hold(0.0, one, decoding=9, prompt_in_progress=False)  # resident


def test_the_bound_counts_the_decode_step_a_held_prompt_would_wait_through():
    """A prompt held at a step waits until the next one: with decode steps of 0.15 s measured, a
    prompt 0.4 s into a 0.5 s bound goes now rather than leaving the held step at 0.55 s."""
    a = _admission(0.1, max_hold_s=0.5)
    one = [Waiting("a", 0.0)]
    assert a.hold(0.4, one, decoding=9, prompt_in_progress=False)  # nothing measured yet
    for seconds in (0.15, 0.15):
        a.decode_step.observe(seconds)
    assert a.hold(0.3, one, decoding=9, prompt_in_progress=False)      # 0.3 + 0.15 < 0.5
    assert not a.hold(0.4, one, decoding=9, prompt_in_progress=False)  # 0.4 + 0.15 past it


def test_the_prompt_step_cost_is_measured_above_decode_traffic():
    cost = PromptStepCost(prior_s=5.0)
    cost.observe(0.30, prompt_tokens=128)
    assert cost.seconds == 5.0 and cost.shared_s == 5.0  # the prior until both kinds were seen
    cost.observe(0.02, prompt_tokens=0)
    cost.observe(-1.0, prompt_tokens=0)  # counters reset mid-step: ignored
    # prompt steps of one size: the split cannot be seen, all of it is shared (loads)
    assert cost.measured and cost.seconds == pytest.approx(0.28)
    assert cost.shared_s == pytest.approx(0.28) and cost.per_token_s == 0.0
    cost.observe(0.01, prompt_tokens=128)  # prompts that found their experts resident
    assert cost.seconds < 0.28


def test_only_the_fixed_part_of_a_prompt_step_counts_as_shared():
    """Hybrid: host work is paid per token as well, and a step carrying five prompts pays five
    prompts' worth of it. Hand-worked: traffic = 0.1 s + 1 ms per prompt token, decode 0.02 s."""
    cost = PromptStepCost(prior_s=5.0)
    cost.observe(0.02, prompt_tokens=0)
    for tokens in (100, 300, 200, 500, 100, 400):
        cost.observe(0.1 + 0.001 * tokens, prompt_tokens=tokens)
    assert cost.per_token_s == pytest.approx(0.001)
    assert cost.shared_s == pytest.approx(0.08)
    assert cost.seconds > 0.25  # at the mean size (~240 tokens): 0.1 + 0.24 - 0.02
    # the decision weighs what sharing saves: the same arrivals hold with the loads' cost only
    waiting, now = [Waiting("a", 0.0)], 0.05
    per_token = PromptAdmission(cost, 1.0)
    loads_only = PromptAdmission(PromptStepCost(prior_s=cost.seconds), 1.0)
    for a in (per_token, loads_only):
        for i in range(4):  # 1.5 arrivals per second besides the waiting prompt's own
            a.arrivals.arrived(-i * 0.5)
    assert loads_only.hold(now, waiting, decoding=3, prompt_in_progress=False)
    assert not per_token.hold(now, waiting, decoding=3, prompt_in_progress=False)


def test_workers_traffic_reaches_the_scheduler_after_each_step():
    from vllm_adapmoe.engine.stats import LayerStats
    from vllm_adapmoe.traffic import TrafficReader, TrafficWriter

    stats = [LayerStats(), LayerStats()]
    writer = TrafficWriter(stats, "unit")
    reader = TrafficReader()  # this process: a uni-process executor's case
    try:
        assert reader.seconds() == 0.0
        stats[0].stall_s, stats[1].host_s = 0.25, 0.5
        assert reader.seconds() == 0.0  # nothing until the step's end writes it
        writer.write()
        assert reader.seconds() == pytest.approx(0.75)
        assert TrafficReader(pid=2**22 + 7).seconds() is None  # no such process
    finally:
        writer.path.unlink()


def test_a_wrong_scheduling_setting_is_one_clear_error():
    with pytest.raises(AdapMoEConfigError, match='"stock" or "expert-aware"'):
        AdapMoEConfig.from_dict({"scheduling": "expert"})
    with pytest.raises(AdapMoEConfigError, match="max_prompt_hold_ms"):
        AdapMoEConfig.from_dict({"max_prompt_hold_ms": -1})


def _staggered(llm, prompts, every: int, max_tokens: int = 16, abort: str | None = None,
               abort_at: int = -1) -> dict[str, list[int]]:
    """Greedy outputs with prompt i added after i * ``every`` engine steps."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    pending = list(enumerate(prompts))
    done: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] * every <= step:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params)
        if step == abort_at and abort is not None:
            engine.abort_request([abort])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
        assert step < 2000, "the engine stopped making progress"
    return done


@pytest.fixture(scope="module")
def expert_aware(engines, bundled_model):
    return engines.get(bundled_model, impl="adapmoe", **SETTINGS)


def test_arrivals_while_decoding_are_held_and_outputs_equal_serial(expert_aware):
    from tests.conftest import greedy

    # a steady stream, one arrival per engine step: enough arrivals for holding to pay
    stream = PROMPTS * 2
    before = vllm_adapmoe.scheduler_stats(expert_aware)
    served = _staggered(expert_aware, stream, every=1)
    after = vllm_adapmoe.scheduler_stats(expert_aware)
    serial = [greedy(expert_aware, [p], max_tokens=16)[0][0] for p in PROMPTS]
    assert [served[f"r{i}"] for i in range(len(stream))] == serial * 2
    # the class decided differently from stock: arrivals were held, prompt steps consolidated
    assert after["requests_held"] > before["requests_held"]
    assert after["held_steps"] > before["held_steps"]
    assert after["prompt_step_cost_s"] > 0
    steps = after["prompt_steps"] - before["prompt_steps"]
    assert 1 <= steps < len(stream)
    # the TTFT bound: no request held past it (plus the step that released it)
    assert after["held_max_s"] <= SETTINGS["max_prompt_hold_ms"] / 1000 + 1.0


def test_a_held_request_can_be_aborted(expert_aware):
    before = vllm_adapmoe.scheduler_stats(expert_aware)
    served = _staggered(expert_aware, PROMPTS * 2, every=1, abort="r9", abort_at=9)
    assert set(served) == {f"r{i}" for i in range(9)} and all(len(t) == 16 for t in served.values())
    after = vllm_adapmoe.scheduler_stats(expert_aware)
    assert after["requests_held"] > before["requests_held"]
    assert not expert_aware.collective_rpc("adapmoe_idle_problems")[0]


def test_the_class_is_installed_only_with_the_plugin_and_the_setting(engines, bundled_model):
    from vllm.engine.arg_utils import EngineArgs

    def scheduler_cls(**kwargs):
        args = EngineArgs(model=str(bundled_model), max_model_len=256, **kwargs)
        return args.create_engine_config().scheduler_config.scheduler_cls

    assert scheduler_cls(model_impl="adapmoe",
                         additional_config={"adapmoe": {"cache_slots": 2}}) is None
    assert scheduler_cls() is None
    assert scheduler_cls(model_impl="adapmoe", additional_config={"adapmoe": SETTINGS}) == \
        "vllm_adapmoe.scheduler.ExpertAwareScheduler"
    with pytest.raises(AdapMoEConfigError, match="model_impl"):
        scheduler_cls(additional_config={"adapmoe": {"scheduling": "expert-aware"}})
    with pytest.raises(AdapMoEConfigError, match="scheduler-cls"):
        scheduler_cls(model_impl="adapmoe", additional_config={"adapmoe": SETTINGS},
                      scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler")


LONG = [" ".join(["the quick brown fox jumps over the lazy dog"] * 12) + f" {i}" for i in range(4)]


def _drift(llm, prompts) -> int:
    """Tokens of staggered long prompts (chunked prefill) that differ from each served alone."""
    from tests.conftest import greedy

    served = _staggered(llm, prompts, every=2, max_tokens=12)
    serial = [greedy(llm, [p], max_tokens=12)[0][0] for p in prompts]
    return sum(a != b for i, s in enumerate(serial) for a, b in zip(served[f"r{i}"], s))


def test_long_chunked_prompts_drift_no_more_than_under_stock_scheduling(engines, bundled_model):
    """Chunks of 32 prompt tokens, streamed through 4 prefill rows beside the 2 own slots
    (both servers): the scheduler and the rows together."""
    rows = dict(SETTINGS, prefill_rows=4)
    stock = _drift(engines.get(bundled_model, impl="adapmoe", chunk=32,
                               **dict(rows, scheduling="stock")), LONG)
    ours = engines.get(bundled_model, impl="adapmoe", chunk=32, **rows)
    before = vllm_adapmoe.scheduler_stats(ours)
    vllm_adapmoe.reset_stats(ours)
    assert _drift(ours, LONG) <= stock
    after = vllm_adapmoe.scheduler_stats(ours)
    # the first long prompt alone (~70 tokens) took 3 chunks of 32
    assert after["prompt_steps"] - before["prompt_steps"] >= 3
    layers = vllm_adapmoe.stats(ours)["layers"]
    assert layers[0]["staging_bytes"] == 2 * layers[0]["slot_bytes"]  # 4 rows, 2 own slots
    assert sum(layer["prefill_step_loads"] for layer in layers) > 0


def test_with_every_expert_resident_nothing_is_held(engines, bundled_model):
    llm = engines.get(bundled_model, impl="adapmoe", scheduling="expert-aware")
    _staggered(llm, PROMPTS, every=3, max_tokens=8)
    counters = vllm_adapmoe.scheduler_stats(llm)
    assert counters["steps"] > 0 and counters["prompt_steps"] > 0  # it ran, and saw the prompts
    assert counters["requests_held"] == 0 and counters["prompt_step_cost_s"] == 0


def test_with_hybrid_decode_misses_on_the_host_prompts_still_held_and_exact(engines, bundled_model):
    """Hybrid as a user of offloading hardware runs it: a decode token's cold expert is cheaper
    on the host (pinned costs: 5 ms against a 20 ms load), a prompt's experts, wanted by several
    tokens, load. Prompt steps still cost more traffic than decode steps, so arrivals are held,
    and the staggered outputs are the serial ones."""
    from tests.conftest import greedy

    llm = engines.get(bundled_model, impl="adapmoe", hybrid="auto",
                      hybrid_costs={"load_s": 0.02, "host_fixed_s": 0.001, "host_token_s": 0.004},
                      **SETTINGS)
    before = vllm_adapmoe.scheduler_stats(llm)
    served = _staggered(llm, PROMPTS * 2, every=1)
    after = vllm_adapmoe.scheduler_stats(llm)
    serial = [greedy(llm, [p], max_tokens=16)[0][0] for p in PROMPTS]
    assert [served[f"r{i}"] for i in range(2 * len(PROMPTS))] == serial * 2
    layers = vllm_adapmoe.stats(llm)["layers"]
    assert sum(layer["host_tokens"] for layer in layers) > 0   # decode misses went to the host
    assert sum(layer["loads"] for layer in layers) > 0         # and prompt steps loaded
    assert after["requests_held"] > before["requests_held"]
    assert after["prompt_step_cost_s"] > 0
