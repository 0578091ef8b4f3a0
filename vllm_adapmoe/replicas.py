"""Data-parallel replicas of an ``LLM(..., model_impl="adapmoe")`` as Ray actors.

Ray runs *around* vLLM here: each actor holds its own engine (its own host store and device
slots), and the pool splits an offline batch or a gating sweep across them. This is what works
on CPU, where vLLM 0.32's Ray executor is unavailable; on GPU machines vLLM's own
``distributed_executor_backend="ray"`` is the way to spread *one* engine over devices.
Results equal one process: each prompt or sweep point is computed by one engine with the same
settings, and greedy decoding does not depend on which other requests share the batch.

    from vllm_adapmoe.replicas import ReplicaPool
    with ReplicaPool(2, model=path, enforce_eager=True,
                     additional_config={"adapmoe": {"cache_slots": 2}}) as pool:
        outputs = pool.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
        rows = pool.gating_sweep(windows, thresholds=[0.0, 0.01, 0.03])

Needs the ``ray`` extra (``pip install 'vllm-adapmoe[ray]'``).
"""

from __future__ import annotations

import os
from typing import Any

from vllm_adapmoe.config import MODEL_IMPL


class _Replica:
    """One actor: an engine built from ``llm_kwargs`` under ``env`` (e.g. its CPU core)."""

    def __init__(self, llm_kwargs: dict[str, Any], env: dict[str, str]) -> None:
        os.environ.update(env)
        from vllm import LLM

        self.llm = LLM(**llm_kwargs)

    def generate(self, prompts: list[Any], params: Any) -> list[Any]:
        return self.llm.generate(prompts, params, use_tqdm=False)

    def measure_gating(self, windows: list[list[int]], threshold: float,
                       sensitivity: list[float] | None) -> dict[str, float]:
        from vllm_adapmoe.offline.evaluation import measure_gating

        return measure_gating(self.llm, windows, threshold, sensitivity)

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class ReplicaPool:
    """``num_replicas`` engines as Ray actors; ``llm_kwargs`` go to each ``LLM`` (``model_impl``
    defaults to adapmoe). On CPU each replica gets ``cpus_per_replica`` cores and its engine is
    bound to them; on GPU pass ``gpus_per_replica``."""

    def __init__(self, num_replicas: int, *, cpus_per_replica: int = 1,
                 gpus_per_replica: float = 0, **llm_kwargs: Any) -> None:
        try:
            import ray
        except ImportError as e:
            raise ImportError("ReplicaPool needs Ray: pip install 'vllm-adapmoe[ray]'") from e
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if "model" not in llm_kwargs:
            raise ValueError("give the model: ReplicaPool(n, model=PATH, ...)")
        llm_kwargs.setdefault("model_impl", MODEL_IMPL)
        if not ray.is_initialized():
            ray.init(num_cpus=max(os.cpu_count() or 1, num_replicas * cpus_per_replica),
                     include_dashboard=False, log_to_driver=False)
        actor = ray.remote(num_cpus=cpus_per_replica, num_gpus=gpus_per_replica)(_Replica)
        self._ray = ray
        self.replicas = [actor.remote(llm_kwargs, self._env(i, cpus_per_replica, gpus_per_replica))
                         for i in range(num_replicas)]

    @staticmethod
    def _env(index: int, cpus: int, gpus: float) -> dict[str, str]:
        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        if not gpus:  # vLLM-CPU binds OpenMP threads; give each replica its own cores
            first = (index * cpus) % max(os.cpu_count() or 1, 1)
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"{first}-{first + cpus - 1}" if cpus > 1 else str(first)
        return env

    def generate(self, prompts: list[Any], params: Any) -> list[Any]:
        """Contiguous shares of ``prompts``, one per replica; outputs in the input order."""
        n = len(self.replicas)
        bounds = [len(prompts) * i // n for i in range(n + 1)]
        futures = [r.generate.remote(prompts[lo:hi], params)
                   for r, lo, hi in zip(self.replicas, bounds, bounds[1:]) if hi > lo]
        return [out for part in self._ray.get(futures) for out in part]

    def gating_sweep(self, windows: list[list[int]], thresholds: list[float],
                     sensitivity: list[float] | None = None) -> list[dict[str, float]]:
        """One row per threshold (``measure_gating``), spread round-robin over the replicas."""
        futures = [self.replicas[i % len(self.replicas)].measure_gating.remote(windows, t, sensitivity)
                   for i, t in enumerate(thresholds)]
        return self._ray.get(futures)

    def shutdown(self) -> None:
        self._ray.get([r.shutdown.remote() for r in self.replicas])
        for r in self.replicas:
            self._ray.kill(r)
        self.replicas = []

    def __enter__(self) -> ReplicaPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
