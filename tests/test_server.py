"""`vllm serve ... --model-impl adapmoe` (the console script) answers like LLM(...) does."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROMPTS

SETTINGS = {"adapmoe": {"cache_slots": 4}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model, workdir: Path, extra: tuple[str, ...] = ()):
    """``vllm serve`` (the console script) on a free port; yields (base URL, log path)."""
    import requests

    port = free_port()
    log = workdir / "serve.log"
    vllm_cmd = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_cmd), "serve", str(model), "--model-impl", "adapmoe",
           "--additional-config", json.dumps(SETTINGS), "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "512", "--seed", "0", *extra]
    with open(log, "w") as out:
        # nothing set up for /metrics: the plugin brings the workers' counters there itself
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with serve(tiny_model, tmp_path_factory.mktemp("server")) as running:
        yield running


def test_server_completions_match_offline_llm(server, engines, tiny_model):
    from openai import OpenAI
    from vllm import SamplingParams

    base, log = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    prompts = PROMPTS[:8]
    served = []
    for prompt in prompts:
        r = client.completions.create(model=str(tiny_model), prompt=prompt, max_tokens=32,
                                      temperature=0.0, extra_body={"ignore_eos": True})
        served.append(r.choices[0].text)
    # same engine defaults as `vllm serve` (not enforce_eager: vLLM then uses native custom ops)
    llm = engines.get(tiny_model, "adapmoe", eager=False, **SETTINGS["adapmoe"])
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    # one request at a time on both sides: batch composition changes the rounding of vLLM's
    # dense GEMMs, and this random model's near-tied logits would amplify that.
    offline = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].text for p in prompts]
    assert served == offline
    text = log.read_text()
    assert "Resolved architecture: AdapMoEMixtralForCausalLM" in text
    assert text.count("AdapMoE active") == 1, "the plugin should say once that it is active"


def test_metrics_endpoint_exports_adapmoe_counters(server, tiny_model):
    """A plain ``vllm serve`` (no PROMETHEUS_MULTIPROC_DIR): /metrics has the worker's adapmoe_
    counters, consistent and within a moment of the request, next to vLLM's own metrics."""
    check_metrics(server[0], tiny_model)


@pytest.mark.slow
def test_metrics_with_two_api_servers(tiny_model, tmp_path):
    """``--api-server-count 2``: vLLM switches Prometheus to multiprocess mode itself; the
    workers' counters reach /metrics of either API server."""
    with serve(tiny_model, tmp_path, ("--api-server-count", "2")) as (base, _):
        for _ in range(2):  # requests and scrapes go round-robin over the two servers
            check_metrics(base, tiny_model)


def check_metrics(base: str, tiny_model) -> None:
    import re

    import requests

    from vllm_adapmoe.metrics import FLUSH_S


    def value(text: str, name: str, layer: int) -> float:
        m = re.search(rf'^adapmoe_{name}_total{{layer="{layer}"}} ([0-9.e+]+)$', text, re.M)
        assert m, f"adapmoe_{name}_total for layer {layer} missing from /metrics"
        return float(m.group(1))

    before = value(requests.get(f"{base}/metrics").text, "tokens", 2)
    requests.post(f"{base}/v1/completions", json={"model": str(tiny_model), "prompt": PROMPTS[2],
                                                  "max_tokens": 8, "temperature": 0.0}).raise_for_status()
    deadline = time.time() + 20 * FLUSH_S
    while True:  # the worker writes its snapshot every FLUSH_S
        text = requests.get(f"{base}/metrics").text
        if value(text, "tokens", 2) > before or time.time() > deadline:
            break
        time.sleep(FLUSH_S)
    assert "vllm:num_requests_running" in text and "vllm:prompt_tokens_total" in text, \
        "vLLM's own metrics must stay on /metrics"
    for layer in range(3):
        tokens, decode = value(text, "tokens", layer), value(text, "decode_tokens", layer)
        assert tokens > decode >= 7
        assert value(text, "activated_experts", layer) == 2 * tokens
        assert value(text, "hits", layer) + value(text, "misses", layer) > 0
        assert value(text, "loads", layer) >= value(text, "misses", layer)  # every miss is loaded
    assert 'adapmoe_tokens_total{layer="3"}' not in text  # the tiny model has 3 MoE layers
