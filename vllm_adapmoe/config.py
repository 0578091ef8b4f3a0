"""Plugin settings: ``additional_config={"adapmoe": {...}}`` validated into one typed object.

Every key and value is checked once, at engine start-up, in the main process (see
``vllm_adapmoe.__init__``) so a typo fails fast with a message that names the fix, instead of
silently serving stock behaviour.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from vllm_adapmoe.engine.cache_plan import uniform_split  # noqa: F401  (re-exported)
from vllm_adapmoe.engine.errors import AdapMoEConfigError
from vllm_adapmoe.engine.settings import EngineSettings

CONFIG_KEY = "adapmoe"
MODEL_IMPL = "adapmoe"
SCHEDULING_MODES = ("stock", "expert-aware")
_PARSED: dict[str, AdapMoEConfig] = {}  # settings JSON → its parsed config (this process)


@dataclass(frozen=True)
class AdapMoEConfig:
    # Budget: at most one of the three (none = every expert resident, no offload).
    cache_slots: int | tuple[int, ...] | None = None
    cache_gib: float | None = None
    cache_total_slots: int | None = None
    plan: str = "uniform"
    eviction: str = "lru"
    profile: str | None = None
    threshold: float = 0.0
    gate_prefill: bool = False
    prefetch: bool = False
    prefetch_lookahead: int = 1  # extension: how many layers ahead the prefetcher guesses
    link_gbps: float | None = None
    # Extension: one expert load costs this many decode layers (the prefetch pay-off rule);
    # None = measured while decoding. Pin it to make prefetch decisions independent of timing.
    link_layers: float | None = None
    # Extension: the compute path for the experts resident in slots:
    # "auto" = the serving stack's fused kernel where it fits, else the torch grouped GEMM;
    # "grouped" / "reference" (per-expert loop) force one of the engine's own kernels.
    kernel: str = "auto"
    # Extension: per-layer sensitivities given directly instead of a profile (e.g. all 1.0 for
    # the naive "fixed w2 threshold" baseline: drop expert 2 when w2 < sqrt(threshold)).
    sensitivity: tuple[float, ...] | None = None
    # Where a cold expert runs: "off" (always loaded into a slot), "auto" (its tokens computed
    # on the host when that costs less than loading it), "host-only" (never loaded).
    hybrid: str = "off"
    # Extension: pin the hybrid cost model {"load_s", "host_fixed_s", "host_token_s"} (seconds)
    # for timing-independent, replayable decisions; None = measured.
    hybrid_costs: tuple[float, float, float] | None = None
    # Extension: emulate a named machine's link, device and host on CPU ("h100-pcie4",
    # "rtx4090-pcie4": engine/emulation.py); results are labelled "emulated <preset>".
    emulate: str | None = None
    # Extension: the emulation's scale (this machine's time for one expert on the device ÷ the
    # preset's), pinned instead of measured at start-up: two servers compared side by side then
    # run on one clock (a measurement of ~0.02 ms varies between starts). Logged as "(x<scale>:".
    emulate_scale: float | None = None
    # Extension (CUDA, hybrid): torch threads computing on the host (None: torch's default).
    host_threads: int | None = None
    # Extension: seconds a step waits for an expert copy beyond the link's queue before it fails
    # (a stuck link); an emulated slow link never trips it (its queue's durations are added).
    copy_timeout_s: float = 60.0
    # Extension: "fp8" quantizes a bf16/fp16/fp32 checkpoint's routed experts at load to FP8
    # with 128×128 block scales (as ``adapmoe quantize`` does): half the host, slot and link
    # bytes; None keeps them as the checkpoint stores them.
    expert_dtype: str | None = None
    # Which vLLM scheduler runs the steps: "stock" (vLLM's own), or "expert-aware" (holds
    # waiting prompts back while requests decode so that prompt steps, which need nearly every
    # expert, come fewer and larger: ``vllm_adapmoe/scheduler.py``).
    scheduling: str = "stock"
    # Extension (expert-aware): the longest a waiting prompt is held back (its TTFT bound).
    max_prompt_hold_ms: float = 1000.0
    # Extension: device rows shared by every loading layer, for steps that need more experts
    # than a layer's slots hold (prompt steps): such a step loads each cold expert once into
    # them instead of once per wave of tokens. Out of a cache_gib / cache_total_slots budget,
    # on top of cache_slots.
    prefill_rows: int = 0

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None) -> AdapMoEConfig:
        """Parsed once per process and settings (the main process checks them twice at start-up,
        each worker once more): the same settings give the same object, with its profile."""
        raw = (additional_config or {}).get(CONFIG_KEY) or {}
        try:
            key = json.dumps(raw, sort_keys=True)
        except (TypeError, ValueError):
            return cls.from_dict(raw)  # not JSON: from_dict names the problem
        if key not in _PARSED:
            _PARSED[key] = cls.from_dict(raw)
        return _PARSED[key]

    @classmethod
    def from_dict(cls, raw: Any) -> AdapMoEConfig:
        if not isinstance(raw, dict):
            raise AdapMoEConfigError(
                f'additional_config["{CONFIG_KEY}"] must be a JSON object, got {type(raw).__name__}: '
                f'{raw!r}. Example: --additional-config \'{{"{CONFIG_KEY}": {{"cache_slots": 4}}}}\''
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise AdapMoEConfigError(
                f"unknown adapmoe setting(s) {unknown}; valid keys are {sorted(known)}"
            )
        cfg = cls(**{k: _normalise(k, v) for k, v in raw.items()})
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.expert_dtype not in (None, "fp8"):
            raise AdapMoEConfigError(
                f'adapmoe: expert_dtype must be "fp8" (or absent), got {self.expert_dtype!r}')
        if self.scheduling not in SCHEDULING_MODES:
            raise AdapMoEConfigError(
                f'adapmoe: scheduling must be "stock" or "expert-aware", got {self.scheduling!r}')
        if not (self.max_prompt_hold_ms >= 0 and math.isfinite(self.max_prompt_hold_ms)):
            raise AdapMoEConfigError(
                f"adapmoe: max_prompt_hold_ms must be a number of milliseconds >= 0, got "
                f"{self.max_prompt_hold_ms}")
        given = [k for k in ("cache_slots", "cache_gib", "cache_total_slots")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise AdapMoEConfigError(
                f"adapmoe: set at most one of cache_slots, cache_gib, cache_total_slots (got {given})"
            )
        if self.prefill_rows < 0:
            raise AdapMoEConfigError(
                f"adapmoe: prefill_rows must be an integer >= 0, got {self.prefill_rows}")
        if self.prefill_rows and not given:
            raise AdapMoEConfigError(
                "adapmoe: prefill_rows serves layers that offload experts; with every expert "
                "resident there is nothing to load: drop it or set a budget (cache_slots, "
                "cache_gib or cache_total_slots)")
        if self.prefill_rows and self.hybrid == "host-only":
            raise AdapMoEConfigError(
                'adapmoe: hybrid="host-only" never loads an expert, so prefill_rows would stay '
                'empty; drop it (or use hybrid="auto")')
        if self.plan not in ("uniform", "dp"):
            raise AdapMoEConfigError(f'adapmoe: plan must be "uniform" or "dp", got {self.plan!r}')
        if self.plan == "dp" and (self.profile is None or self.cache_slots is not None
                                  or (self.cache_total_slots is None and self.cache_gib is None)):
            raise AdapMoEConfigError(
                'adapmoe: plan="dp" splits a total budget using the miss curves of a profile: '
                'set "profile" and one of "cache_total_slots" / "cache_gib" (not "cache_slots")'
            )
        from vllm_adapmoe.engine.slot_table import POLICIES

        if self.eviction not in POLICIES:
            *first, last = (f'"{name}"' for name in POLICIES)
            raise AdapMoEConfigError(
                f'adapmoe: eviction must be {", ".join(first)} or {last}, got {self.eviction!r}'
            )
        if self.kernel not in ("auto", "fused", "grouped", "reference"):
            raise AdapMoEConfigError(
                f'adapmoe: kernel must be "auto", "fused", "grouped" or "reference", got {self.kernel!r}'
            )
        if self.threshold < 0 or not math.isfinite(self.threshold):
            raise AdapMoEConfigError(f"adapmoe: threshold must be a finite number >= 0, got {self.threshold}")
        if self.threshold > 0 and self.profile is None and self.sensitivity is None:
            raise AdapMoEConfigError(
                "adapmoe: threshold > 0 needs per-layer sensitivities: run `adapmoe calibrate "
                "MODEL_DIR --out PROFILE.json` and set \"profile\": \"PROFILE.json\""
            )
        if self.profile is not None and self.sensitivity is not None:
            raise AdapMoEConfigError("adapmoe: set profile or sensitivity, not both")
        if self.sensitivity is not None and any(
                not (math.isfinite(v) and v >= 0) for v in self.sensitivity):
            raise AdapMoEConfigError(
                f"adapmoe: sensitivity must be finite numbers >= 0, got {list(self.sensitivity)}")
        from vllm_adapmoe.engine.plan import HYBRID_MODES

        if self.hybrid not in HYBRID_MODES:
            raise AdapMoEConfigError(
                f'adapmoe: hybrid must be "off", "auto" or "host-only", got {self.hybrid!r}')
        if self.hybrid == "host-only" and self.prefetch:
            raise AdapMoEConfigError(
                'adapmoe: hybrid="host-only" never loads an expert, so there is nothing to '
                'prefetch; drop "prefetch" (or use hybrid="auto")')
        if self.hybrid_costs is not None and self.hybrid == "off":
            raise AdapMoEConfigError('adapmoe: hybrid_costs needs hybrid "auto" or "host-only"')
        from vllm_adapmoe.engine.emulation import PRESETS

        if self.emulate is not None and self.emulate not in PRESETS:
            raise AdapMoEConfigError(
                f"adapmoe: emulate must be one of {sorted(PRESETS)}, got {self.emulate!r}")
        if self.emulate is not None and self.link_gbps is not None:
            raise AdapMoEConfigError(
                f'adapmoe: emulate="{self.emulate}" sets the link from its preset; drop '
                '"link_gbps" (or drop "emulate" to emulate the link alone)')
        if self.emulate_scale is not None and self.emulate is None:
            raise AdapMoEConfigError('adapmoe: emulate_scale pins an emulation\'s clock; set '
                                     '"emulate" too (or drop "emulate_scale")')
        if self.emulate_scale is not None and not (
                self.emulate_scale > 0 and math.isfinite(self.emulate_scale)):
            raise AdapMoEConfigError(
                f"adapmoe: emulate_scale must be a number > 0, got {self.emulate_scale}")
        if not (self.copy_timeout_s > 0 and math.isfinite(self.copy_timeout_s)):
            raise AdapMoEConfigError(
                f"adapmoe: copy_timeout_s must be a number of seconds > 0, got {self.copy_timeout_s}")
        if self.host_threads is not None and self.host_threads < 1:
            raise AdapMoEConfigError(f"adapmoe: host_threads must be >= 1, got {self.host_threads}")
        if self.host_threads is not None and self.hybrid == "off":
            raise AdapMoEConfigError('adapmoe: host_threads needs hybrid "auto" or "host-only"')
        if self.prefetch_lookahead < 1:
            raise AdapMoEConfigError(
                f"adapmoe: prefetch_lookahead must be >= 1, got {self.prefetch_lookahead}")
        if self.link_gbps is not None and not (self.link_gbps > 0 and math.isfinite(self.link_gbps)):
            raise AdapMoEConfigError(f"adapmoe: link_gbps must be a number > 0, got {self.link_gbps}")
        if self.link_layers is not None and not (self.link_layers >= 0 and math.isfinite(self.link_layers)):
            raise AdapMoEConfigError(
                f"adapmoe: link_layers (decode layers one expert load costs) must be a number >= 0, "
                f"got {self.link_layers}; leave it out to have it measured")
        if self.cache_gib is not None and not (self.cache_gib > 0 and math.isfinite(self.cache_gib)):
            raise AdapMoEConfigError(f"adapmoe: cache_gib must be a number > 0, got {self.cache_gib}")
        if self.cache_total_slots is not None and self.cache_total_slots < 1:
            raise AdapMoEConfigError(
                f"adapmoe: cache_total_slots must be >= 1, got {self.cache_total_slots}"
            )
        slots = self.cache_slots
        if isinstance(slots, int) and slots < 1:
            raise AdapMoEConfigError(
                f"adapmoe: cache_slots must be >= 1 (one device slot per MoE layer at least), got {slots}"
            )
        # with hybrid execution a layer may keep no expert on the device (llama.cpp's
        # --n-cpu-moe: whole layers on the host): 0 is allowed in a per-layer list then
        least = 0 if self.hybrid != "off" else 1
        if isinstance(slots, tuple) and (not slots or any(s < least for s in slots)):
            raise AdapMoEConfigError(
                f"adapmoe: cache_slots as a list needs one integer >= {least} per MoE layer, got "
                f"{list(slots)}" + ("" if least == 0 else
                                    ' (0, a layer wholly on the host, needs "hybrid")'))

    def stored_shape(self, shape: Any) -> Any:
        """``shape`` (a ``MoEShape``) with its experts as the engine holds them: as the
        checkpoint stores them, or quantized at load (``expert_dtype``)."""
        fmt = shape.expert_format
        if self.expert_dtype is None:
            return shape
        if fmt.quant is not None:
            raise AdapMoEConfigError(
                f'adapmoe: expert_dtype "fp8" quantizes unquantized experts; this checkpoint\'s '
                f"are {fmt.quant} already: drop expert_dtype")
        if fmt.interleaved:
            raise AdapMoEConfigError(
                'adapmoe: expert_dtype "fp8" is not supported for gpt-oss (its 128-row blocks '
                "would mix interleaved gate and up rows); serve its MXFP4 checkpoint instead")
        return replace(shape, expert_format=replace(fmt, quant="fp8-block", block=(128, 128)))

    def engine_settings(self) -> EngineSettings:
        """What the engine itself reads (budgets and profiles are resolved here, before it)."""
        return EngineSettings(kernel=self.kernel, eviction=self.eviction, threshold=self.threshold,
                              gate_prefill=self.gate_prefill, prefetch=self.prefetch,
                              prefetch_lookahead=self.prefetch_lookahead,
                              link_gbps=self.link_gbps, link_layers=self.link_layers,
                              hybrid=self.hybrid, hybrid_costs=self.hybrid_costs,
                              emulate=self.emulate, emulate_scale=self.emulate_scale,
                              host_threads=self.host_threads,
                              copy_timeout_s=self.copy_timeout_s,
                              quantize_at_load=self.expert_dtype is not None,
                              prefill_rows=self.prefill_rows)

    def check_platform(self, device_type: str) -> None:
        """Settings that only make sense on one kind of machine (checked in the main process)."""
        if self.emulate is not None and device_type != "cpu":
            raise AdapMoEConfigError(
                f'adapmoe: emulate="{self.emulate}" is for CPU experiments; on {device_type} the '
                "link and the host are real: drop it")
        if self.host_threads is not None and device_type == "cpu":
            raise AdapMoEConfigError(
                "adapmoe: host_threads applies on a GPU; on CPU the host computation runs on "
                "vLLM's own OpenMP threads (set them with VLLM_CPU_OMP_THREADS_BIND): drop it")

    def sensitivities(self, num_layers: int, hf_config: Any) -> list[float]:
        """Per-layer S_l from ``sensitivity`` or the profile (checked against the model)."""
        if self.sensitivity is not None:
            values = list(self.sensitivity)
        elif self.profile is not None:
            values = list(self._profile(hf_config).sensitivity)
        else:
            return [0.0] * num_layers
        if len(values) != num_layers:
            raise AdapMoEConfigError(
                f"adapmoe: {len(values)} sensitivities for {num_layers} MoE layers; "
                "give one per layer (or recalibrate the profile for this model)")
        return values

    def placement(self, num_layers: int, hf_config: Any) -> list[list[int]] | None:
        """Host-only placement (llama.cpp's static split): per MoE layer the experts by the
        profile's routing frequency, most used first, so the fixed device slots hold those.
        None (slots filled by expert id) without host-only or without a profile."""
        if self.hybrid != "host-only" or self.profile is None:
            return None
        routing = self._profile(hf_config).routing
        if len(routing) != num_layers or not all("topk_freq" in r for r in routing):
            raise AdapMoEConfigError(
                f"adapmoe: {self.profile} has no expert frequencies for {num_layers} MoE layers "
                "(host-only placement reads them); recreate it with `adapmoe calibrate`")
        return [frequency_order(r["topk_freq"]) for r in routing]

    def predictor_maps(self, hf_config: Any) -> dict[tuple[int, int], Any]:
        """The profile's fitted look-ahead maps, {(target layer, distance): [H + 1, E] tensor}
        (none without prefetch, a profile, or where calibrate found the plain router better)."""
        if not self.prefetch or self.profile is None:
            return {}
        from vllm_adapmoe.offline.predictor import fitted_maps

        return fitted_maps(self._profile(hf_config).predictor)

    def curves_threshold(self, hf_config: Any) -> float | None:
        """The gating T the profile's curves were replayed with, where ``plan: "dp"`` splits the
        budget by them and that T is not this configuration's (else None): the split is then
        planned for other routing than is served (``adapmoe profile --threshold``)."""
        if self.plan != "dp" or not self.profile:
            return None
        recorded = (self._profile(hf_config).trace_settings or {}).get("threshold")
        if recorded is None or float(recorded) == self.threshold:
            return None
        return float(recorded)

    def _profile(self, hf_config: Any) -> Any:
        """The profile, read and checked against ``hf_config`` once per process (again if the
        file changes); budgets, sensitivities and fitted maps all come from it."""
        from vllm_adapmoe.offline.profile import load_profile

        try:
            stat = os.stat(self.profile)
            key = (self.profile, id(hf_config), stat.st_mtime_ns, stat.st_size)
        except OSError:
            return load_profile(self.profile, hf_config)  # missing: its error names the fix
        cache = self.__dict__.setdefault("_profiles", {})  # not a field: frozen stays frozen
        if key not in cache:
            # holding hf_config keeps its id from being reused by another model's config
            cache[key] = (hf_config, load_profile(self.profile, hf_config))
        return cache[key][1]

    def slots_per_layer(self, num_layers: int, num_experts: int, expert_bytes: int,
                        hf_config: Any = None, top_k: int = 1,
                        device_type: str | None = None) -> list[int]:
        """Device slots for each MoE layer under this budget (model shape known only here;
        ``device_type``: where the slots live, which decides the hybrid plan's kind)."""
        if self.cache_slots is None and self.cache_gib is None and self.cache_total_slots is None:
            return [num_experts] * num_layers
        if isinstance(self.cache_slots, tuple):
            if len(self.cache_slots) != num_layers:
                raise AdapMoEConfigError(
                    f"adapmoe: cache_slots lists {len(self.cache_slots)} values but the model has "
                    f"{num_layers} MoE layers; give one per layer or a single integer"
                )
            return [_check_le_experts(s, num_experts) for s in self.cache_slots]
        if isinstance(self.cache_slots, int):
            return [_check_le_experts(self.cache_slots, num_experts)] * num_layers
        if self.cache_gib is not None:
            total = int(self.cache_gib * 2**30 // expert_bytes)
            model_gib = num_layers * num_experts * expert_bytes / 2**30
            if total > num_layers * num_experts:
                raise AdapMoEConfigError(
                    f"adapmoe: cache_gib={self.cache_gib} is more than all experts need "
                    f"({model_gib:.4f} GiB); omit the budget to keep every expert resident"
                )
            budget_name = f"cache_gib={self.cache_gib} ({total} slots of {expert_bytes} bytes)"
        else:
            total = int(self.cache_total_slots)
            if total > num_layers * num_experts:
                raise AdapMoEConfigError(
                    f"adapmoe: cache_total_slots={total} is more than the model's "
                    f"{num_layers} x {num_experts} experts; omit the budget to keep all resident"
                )
            budget_name = f"cache_total_slots={total}"
        if self.prefill_rows:  # the shared prefill rows come out of the budget first
            if self.prefill_rows >= total:
                raise AdapMoEConfigError(
                    f"adapmoe: prefill_rows={self.prefill_rows} takes all of {budget_name}; "
                    "lower prefill_rows or raise the budget")
            total -= self.prefill_rows
            budget_name += f" less prefill_rows={self.prefill_rows}"
        from vllm_adapmoe.engine.plan import never_loads

        if never_loads(self.hybrid) and self.plan != "dp":
            # nothing is ever loaded: no staging rows to pay for, a layer may keep no expert
            return uniform_split(total, num_layers)  # total <= layers x experts: checked above
        if self.hybrid != "off" and self.plan == "dp":
            # layers with no own slot live on the host and need no staging row: any budget fits
            return self._hybrid_split(self._profile(hf_config), total, num_layers,
                                      min(top_k, num_experts), self.same_memory(device_type))
        # The budget pays for the shared staging rows too (a layer below top_k own slots loads
        # the rest of a token's experts there): one own slot per layer plus top_k - 1 rows.
        top_k = min(top_k, num_experts)
        if total < num_layers + top_k - 1:
            raise AdapMoEConfigError(
                f"adapmoe: {budget_name} gives fewer than one slot per MoE layer ({num_layers} "
                f"layers) plus the {top_k - 1} shared staging row(s) a top-{top_k} token needs "
                f"({num_layers + top_k - 1} in all); raise the budget"
            )
        from vllm_adapmoe.engine.cache_plan import plan_uniform, plan_with_staging

        if self.plan == "dp":
            return self._dp_split(total, num_layers, hf_config, top_k)
        return plan_with_staging(total, top_k, num_layers,
                                 lambda budget, lo: plan_uniform(num_layers, num_experts, budget, lo))

    def _dp_split(self, total: int, num_layers: int, hf_config: Any, top_k: int) -> list[int]:
        """DP over the profile's miss curves, staging rows included in ``total``: it gives a
        layer fewer than top_k own slots where that costs fewer misses than the rows it takes."""
        from vllm_adapmoe.engine.cache_plan import plan_cost, plan_dp, plan_with_staging

        profile = self._profile(hf_config)
        curves = getattr(profile, "miss_curves", None)
        if not curves or len(curves) != num_layers:
            raise AdapMoEConfigError(
                f'adapmoe: plan="dp" needs miss curves in {self.profile}; record a trace with '
                "`adapmoe trace` and add them with `adapmoe profile PROFILE.json --trace T.npz`")
        return plan_with_staging(total, top_k, num_layers,
                                 lambda budget, lo: plan_dp(curves, budget, lo=lo),
                                 lambda slots: plan_cost(slots, curves))

    def same_memory(self, device_type: str | None) -> bool:
        """Slots and host store in the same memory, copied between at memory speed: a CPU run
        without ``emulate`` or ``link_gbps``. There an expert computes as fast from the host as
        from a slot."""
        return device_type == "cpu" and self.emulate is None and self.link_gbps is None

    def _hybrid_split(self, profile: Any, total: int, num_layers: int, top_k: int,
                      whole_layers: bool = False) -> list[int]:
        """With hybrid on, a miss costs host work rather than a load: DP over the profile's host
        curves (0 own slots allowed: a layer may live on the host whole). ``whole_layers`` (the
        host is the device's own memory): only whole layers resident, as llama.cpp's
        ``--n-cpu-moe``, since a slot saves no work there and a partial layer costs a per-step
        decision."""
        from vllm_adapmoe.engine.cache_plan import plan_hybrid

        curves = getattr(profile, "host_curves", None)
        if not curves or len(curves) != num_layers:
            raise AdapMoEConfigError(
                f'adapmoe: plan="dp" with hybrid "{self.hybrid}" needs host curves in '
                f"{self.profile}; add them with `adapmoe profile {self.profile} --trace T.npz`")
        try:
            return plan_hybrid(curves, total, top_k, whole_layers)
        except ValueError as exc:
            raise AdapMoEConfigError(f"adapmoe: {exc}") from None


def frequency_order(freq: list[float]) -> list[int]:
    """Expert ids by frequency, most used first (ties: lower id)."""
    return sorted(range(len(freq)), key=lambda e: (-freq[e], e))


def _check_le_experts(slots: int, num_experts: int) -> int:
    if slots > num_experts:
        raise AdapMoEConfigError(
            f"adapmoe: cache_slots={slots} is more than the {num_experts} experts per layer; "
            f"use at most {num_experts}"
        )
    return slots


def _normalise(key: str, value: Any) -> Any:
    """Type-check one raw JSON value; the error names the key and the expected type."""
    def bad(expected: str) -> AdapMoEConfigError:
        return AdapMoEConfigError(f"adapmoe: {key} must be {expected}, got {value!r}")

    if key == "cache_slots":
        if isinstance(value, bool):
            raise bad("an integer or a list of integers (one per MoE layer)")
        if isinstance(value, int):
            return value
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return tuple(value)
        raise bad("an integer or a list of integers (one per MoE layer)")
    if key in ("cache_total_slots", "prefetch_lookahead", "host_threads", "prefill_rows"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if key in ("cache_gib", "threshold", "link_gbps", "link_layers", "copy_timeout_s",
               "max_prompt_hold_ms", "emulate_scale"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if key in ("gate_prefill", "prefetch"):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key == "sensitivity":
        if isinstance(value, (list, tuple)) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(float(v) for v in value)
        raise bad("a non-empty list of numbers, one per MoE layer")
    if key == "hybrid_costs":
        names = ("load_s", "host_fixed_s", "host_token_s")
        if (not isinstance(value, dict) or set(value) != set(names) or not all(
                isinstance(value[n], (int, float)) and not isinstance(value[n], bool)
                and math.isfinite(value[n]) and value[n] >= 0 for n in names)):
            raise bad('an object {"load_s": s, "host_fixed_s": s, "host_token_s": s} of seconds >= 0')
        return tuple(float(value[n]) for n in names)
    if key in ("plan", "eviction", "profile", "kernel", "hybrid", "emulate", "scheduling"):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    return value
