"""Shared engines: each distinct (model, impl, settings) starts one ``LLM`` per session.

An engine runs inside the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: vLLM's in-process
client and single-process executor) unless a test asks for ``processes=True`` or it needs them
(TP/PP ranks, speculative decoding). A start then takes ~1-2 s instead of ~15-50 s: vLLM's
multiprocess path spawns an EngineCore and a worker, each importing torch and vLLM (~7 s apiece
here), one after the other. Stock and plugin engines in a test run the same way, so "tokens equal
stock" compares like with like; the multiprocess path users get by default is covered by the
servers (``vllm serve``), TP/PP and the tests that ask for processes, and
``ADAPMOE_TEST_PROCESSES=1`` runs every engine that way.

Tests ask ``engines.get(...)`` and share the result. At most ``MAX_ALIVE`` stay up, fewer when
memory runs short: the least recently used one is shut down first (a multiprocess one in the
background: its processes take ~5 s to exit). Test files that share the tiny model's basic
engines run next to each other (``pytest_collection_modifyitems``) so those engines start once.
All are shut down at the end of the session (else vLLM logs errors after pytest exits).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tiny_model import build_tiny_mixtral  # noqa: E402

import vllm_adapmoe  # noqa: E402
from vllm_adapmoe.cpu_features import cpu_model  # noqa: E402

# The tests' own in-process work (tiny engine stacks, calibration) on one torch thread, whether
# the whole suite runs or one file: with two on 2 cores, OpenMP's hand-offs make these tiny
# layers several times slower, and timing-based decisions (a load in layers) shift with it.
# In-process engines run on this thread count too; engines in processes set their own.
torch.set_num_threads(1)

BUNDLED = Path(vllm_adapmoe.bundled_model_path())

# 16 prompts of clearly different lengths (1 to ~40 tokens).
PROMPTS = [
    "the",
    "experts route tokens",
    "the quick brown fox jumps over the lazy dog",
    "caches keep the hot ones resident while",
    "a mixture of",
    "layers of a mixture and caches keep the hot ones resident the quick brown fox jumps "
    "over the lazy dog while experts route tokens through layers",
    "fox",
    "the lazy dog while experts route",
    "ROMEO: what light through yonder",
    "O",
    "Enter the KING and his train",
    "to be or not to be, that is the question: whether",
    "my",
    "the hot ones",
    "JULIET: wherefore art thou, and why do the experts of the layers keep their caches",
    "now is the winter of our discontent made glorious summer",
]


MAX_ALIVE = 9  # idle engines cost memory, not CPU: their workers park
MIN_AVAILABLE_GIB = 6.0  # ...and one engine takes ~1.3 GB (a TP=2 one ~2.5), so keep this much free
# Files in this order first (the rest after, alphabetically): these share the tiny model's stock,
# default, 1-slot and 2-slot engines, which LRU would otherwise evict in between and start twice.
FIRST_FILES = ("test_exactness.py", "test_selection.py", "test_stats.py", "test_trace_sim.py",
               "test_gating.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.path.name
        return FIRST_FILES.index(name) if name in FIRST_FILES else len(FIRST_FILES)
    items.sort(key=rank)  # stable: within a file, and among the other files, order is kept


def _machine_counters() -> dict[str, float]:
    """Seconds some task stalled on CPU / memory / I/O (Linux PSI) and major page faults: a
    slow run shows here whether it waited for cores, for memory or for the disk."""
    counters: dict[str, float] = {}
    for kind in ("cpu", "memory", "io"):
        with contextlib.suppress(OSError):
            first = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
            counters[f"{kind} stall s"] = int(first.rsplit("total=", 1)[1]) / 1e6
    with contextlib.suppress(OSError), open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("pgmajfault "):
                counters["major faults"] = int(line.split()[1])
    return counters


SESSION = {"started": time.perf_counter(), "counters": _machine_counters(),
           "starts": [], "lowest_gib": float("inf")}  # starts: (seconds, key)


def pytest_terminal_summary(terminalreporter) -> None:
    """One block on where a session's time went (engine starts, machine stalls), so a slow CI
    run can be read from its log."""
    starts, now = SESSION["starts"], _machine_counters()
    deltas = ", ".join(f"{k} {v - SESSION['counters'].get(k, 0):,.0f}" for k, v in now.items())
    longest = max(starts, default=(0.0, ""))
    lowest = f"{SESSION['lowest_gib']:.1f} GiB" if starts else "n/a"
    terminalreporter.write_line(
        f"[engines] {len(starts)} starts, {sum(t for t, _ in starts):.0f} s of "
        f"{time.perf_counter() - SESSION['started']:.0f} s (longest {longest[0]:.0f} s); lowest "
        f"MemAvailable after a start {lowest}; {os.cpu_count()} x {cpu_model()}; "
        f"during the session: {deltas}")


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


class Engines:
    def __init__(self) -> None:
        self._engines: dict[str, object] = {}  # insertion order = least recently used first
        self._stopping: list[threading.Thread] = []

    def get(self, model: str | Path, impl: str = "auto", eager: bool = True, dtype: str = "auto",
            tp: int = 1, pp: int = 1, speculative: dict | None = None,
            chunk: int | None = None, processes: bool = False, **adapmoe) -> object:
        from vllm import LLM

        # ranks are processes; n-gram speculation in-process trips vLLM's kernel-override scan
        # of sys.modules on an object of pytest's ("'_lib_fn_wrapper' object has no attribute")
        processes = (processes or tp * pp > 1 or speculative is not None
                     or os.environ.get("ADAPMOE_TEST_PROCESSES") == "1")
        key = json.dumps([str(model), impl, eager, dtype, tp, pp, speculative, chunk, processes,
                          adapmoe], sort_keys=True)
        if key in self._engines:
            self._engines[key] = self._engines.pop(key)
        else:
            # never the two most recent: the calling test may hold them (stock, then ours)
            while len(self._engines) >= MAX_ALIVE:
                self._shutdown(self._engines.pop(next(iter(self._engines))))
            while len(self._engines) > 2 and _available_gib() < MIN_AVAILABLE_GIB:
                # wait for the memory to come back before measuring again
                self._shutdown(self._engines.pop(next(iter(self._engines)))).join(timeout=60)
            kwargs = {"additional_config": {"adapmoe": adapmoe}} if adapmoe else {}
            if speculative:
                kwargs["speculative_config"] = speculative
            if chunk:  # chunked prefill at this many tokens per step
                kwargs["max_num_batched_tokens"] = chunk
            # TP on this CPU: one OpenMP thread per rank (vLLM's default binding refuses one
            # NUMA node); set only while the workers start, TP=1 engines keep every core.
            ranks = tp * pp
            bind = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, range(ranks)))} if ranks > 1 else {}
            started = time.perf_counter()
            # the tests' 64 MiB of KV cache, not VLLM_CPU_KVCACHE_SPACE's GiB (vLLM-CPU lets the
            # variable override kv_cache_memory_bytes; the test command sets it for servers)
            inproc = {} if processes else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            with _env({**bind, **inproc, "VLLM_CPU_KVCACHE_SPACE": None}):
                self._engines[key] = LLM(model=str(model), model_impl=impl, enforce_eager=eager,
                                         max_model_len=512, seed=0, max_num_seqs=32, dtype=dtype,
                                         kv_cache_memory_bytes=64 * 2**20,
                                         tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                         **kwargs)
            # an in-process EngineCore freezes vllm.envs for the process; later engines set theirs
            import vllm.envs
            vllm.envs.disable_envs_cache()
            seconds, free = time.perf_counter() - started, _available_gib()
            SESSION["starts"].append((seconds, key))
            SESSION["lowest_gib"] = min(SESSION["lowest_gib"], free)
            if os.environ.get("ADAPMOE_TEST_ENGINE_LOG"):  # which engines start, and how often
                with open(os.environ["ADAPMOE_TEST_ENGINE_LOG"], "a") as log:
                    log.write(f"{seconds:.1f}s {key} {free:.1f} GiB free\n")
        return self._engines[key]

    def forget(self, llm: object) -> None:
        """Stop sharing ``llm`` (a test that kills its engine shuts it down itself)."""
        self._engines = {k: v for k, v in self._engines.items() if v is not llm}

    def _shutdown(self, llm: object) -> threading.Thread:
        """Stop ``llm``; a multiprocess one in a thread (shutting down mostly waits for its
        processes to exit), an in-process one here (it shares the process's vLLM state)."""
        from vllm.v1.engine.core_client import InprocClient

        client = llm.llm_engine.engine_core
        inproc = isinstance(client, InprocClient)
        if inproc:
            client.shutdown()
        thread = threading.Thread(target=None if inproc else client.shutdown, daemon=True)
        thread.start()
        self._stopping = [t for t in self._stopping if t.is_alive()] + [thread]
        return thread

    def close(self) -> None:
        for llm in self._engines.values():
            self._shutdown(llm)
        self._engines.clear()
        for thread in self._stopping:
            thread.join(timeout=60)


@contextlib.contextmanager
def _env(values: dict[str, str | None]):
    """Set (or, for None, unset) environment variables for the block."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def engines():
    e = Engines()
    yield e
    e.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny_mixtral"), seed=0)


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    if not (BUNDLED / "model.safetensors").exists():
        pytest.fail(f"bundled model missing at {BUNDLED}")
    return BUNDLED


def greedy(llm, prompts=PROMPTS, max_tokens: int = 32):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                for o in outs]
    return tokens, logprobs
