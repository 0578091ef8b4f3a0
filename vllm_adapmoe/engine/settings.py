"""What the engine needs to know of the user's settings: the engine's own small, typed record.

The plugin parses and validates ``additional_config["adapmoe"]`` (``vllm_adapmoe.config``) and
hands the engine an ``EngineSettings`` (``AdapMoEConfig.engine_settings()``); benchmarks and
tests build one directly. Budgets, profiles and plans are resolved before the engine is built
(into slots per layer, sensitivities and fitted maps), so they are not here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSettings:
    kernel: str = "auto"              # "auto" | "fused" | "grouped" | "reference" (kernels.py)
    eviction: str = "lru"             # a policy of slot_table.POLICIES
    threshold: float = 0.0            # gating budget T (0: stock top-k)
    gate_prefill: bool = False        # gate prefill tokens too
    prefetch: bool = False            # cross-layer prefetch
    prefetch_lookahead: int = 1       # how many layers ahead the prefetcher guesses
    link_gbps: float | None = None    # emulated host→device bandwidth, GB/s (CPU experiments)
    emulate: str | None = None        # a hardware preset of emulation.PRESETS (CPU experiments)
    emulate_scale: float | None = None  # the emulation's scale, pinned (None: measured)
    link_layers: float | None = None  # one load in decode layers, pinned (None: measured)
    hybrid: str = "off"               # where a cold expert runs: "off" (loaded), "auto", "host-only"
    # pinned (load_s, host_fixed_s, host_token_s) for hybrid decisions (None: measured)
    hybrid_costs: tuple[float, float, float] | None = None
    host_threads: int | None = None   # CUDA: torch threads of the host computation (None: torch's)
    copy_timeout_s: float = 60.0      # a copy this late beyond the link's queue fails the step
    quantize_at_load: bool = False    # unquantized checkpoint weights → the store's quantized format
    prefill_rows: int = 0             # shared device rows for steps needing more than a layer's slots
