"""Ray around vLLM (``vllm_adapmoe.replicas``): two engine replicas as Ray actors give the same
greedy tokens and the same gating-sweep rows as one process with the same settings."""

import pytest

from conftest import PROMPTS, greedy

ray = pytest.importorskip("ray", reason="the ray extra: pip install 'vllm-adapmoe[ray]'")

SETTINGS = {"cache_slots": 2, "prefetch": True, "link_layers": 1, "sensitivity": [1.0, 1.0, 1.0], "gate_prefill": True}
# what tests/conftest.py's Engines passes, so the replicas run the same engine as the reference
ENGINE = dict(model_impl="adapmoe", enforce_eager=True, max_model_len=512, seed=0,
              max_num_seqs=32, kv_cache_memory_bytes=64 * 2**20)


@pytest.fixture(scope="module")
def pool(tiny_model):
    from vllm_adapmoe.replicas import ReplicaPool

    with ReplicaPool(2, model=str(tiny_model), additional_config={"adapmoe": SETTINGS},
                     **ENGINE) as p:
        yield p
    ray.shutdown()


def test_replicas_generate_what_one_process_does(engines, tiny_model, pool):
    from vllm import SamplingParams

    reference, _ = greedy(engines.get(tiny_model, "adapmoe", **SETTINGS))
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = pool.generate(PROMPTS, params)
    assert [o.prompt for o in outs] == PROMPTS  # input order kept across the two shares
    assert [list(o.outputs[0].token_ids) for o in outs] == reference


def test_replicas_gating_sweep_equals_one_process(engines, tiny_model, pool):
    from vllm_adapmoe.offline.evaluation import heldout_text, measure_gating, token_windows

    llm = engines.get(tiny_model, "adapmoe", **SETTINGS)
    windows = token_windows(llm.get_tokenizer(), heldout_text(), 64, 512)
    thresholds = [0.0, 0.05, 0.5]
    rows = pool.gating_sweep(windows, thresholds)
    assert rows == [measure_gating(llm, windows, t) for t in thresholds]
    assert rows[0]["activated_per_token_layer"] == 2.0 > rows[2]["activated_per_token_layer"]


def test_pool_needs_a_model():
    from vllm_adapmoe.replicas import ReplicaPool

    with pytest.raises(ValueError, match="give the model"):
        ReplicaPool(2)


def test_sweep_without_sensitivities_is_a_clear_error(tiny_model, capsys):
    from vllm_adapmoe.cli import main

    assert main(["sweep", str(tiny_model), "--thresholds", "0.01"]) == 2
    assert "gating needs S_l: give --profile" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_cli_over_ray_equals_one_process(tiny_model, tmp_path):
    import json

    from vllm_adapmoe.cli import main

    args = ["sweep", str(tiny_model), "--settings", json.dumps({"sensitivity": [1.0] * 3}),
            "--thresholds", "0", "0.5", "--tokens", "1024"]
    assert main(args + ["--out", str(tmp_path / "one.json")]) == 0
    assert main(args + ["--ray", "2", "--out", str(tmp_path / "ray.json")]) == 0
    rows = [json.loads((tmp_path / f).read_text())["rows"] for f in ("one.json", "ray.json")]
    assert rows[0] == rows[1] and rows[0][1]["activated_per_token_layer"] == 1.0
