"""The vLLM-free offload engine at a named layer shape: link speed, compute, decode tokens/s.

    python benchmarks/bench_engine.py --device cuda --shape mixtral-8x7b --layers 8
    python benchmarks/bench_engine.py --device cpu --shape bundled --layers 24
    python benchmarks/bench_engine.py --device cpu --shape mixtral-8x7b --emulate h100-pcie4 \
        --layers 4 --host-layers 2 --batch 16 --steps 2 --warmup 1 --rounds 3

N MoE layers (``vllm_adapmoe.engine.stack.ExpertStack``: residual stream, no attention) with random
bf16 experts; routing replayed from a trace recorded by ``adapmoe trace`` (layers tiled to N), or
seeded synthetic routing (``--synthetic``). Each step decodes ``--batch`` tokens through all
layers. Settings, one run each, the same experts and routing:

  * ``all resident``   — every expert in device slots (the upper bound);
  * ``uniform LRU``    — 25% / 50% of the experts as slots, split evenly, LRU, no prefetch/gating;
  * ``AdapMoE``        — the same budgets split by the DP plan over the profile's miss curves,
                         cross-layer prefetch (the trace's next-layer predictions) and gating at
                         ``--threshold`` with the profile's sensitivities;
  * ``layer streaming``— top_k slots per layer and nothing kept between steps: every needed expert
                         is copied every step (what offloading without a cache amounts to, e.g.
                         vLLM's ``--cpu-offload-gb``);
  * ``host-only``      — hybrid "host-only": the budget's slots hold each layer's most frequent
                         experts (the profile's), fixed; every other expert's tokens are computed
                         on the host (llama.cpp's static placement);
  * ``layer split``    — llama.cpp's ``--n-cpu-moe N``: the first layers' experts all on the host,
                         the last budget ÷ E layers all resident;
  * ``uniform + hybrid`` / ``hybrid AdapMoE`` — the uniform / AdapMoE rows with hybrid "auto"
                         (a cold expert's tokens computed on the host when that shortens the
                         layer's critical path); hybrid AdapMoE's budget split is the DP over
                         this batch's host curves (``cache_plan.plan_hybrid``), not miss curves,
                         gated as the row gates (``DP + hybrid``'s: ungated)
                         (on CPU without ``--link-gbps`` or ``--emulate``: whole layers only, as
                         the engine plans there);
  * ``DP + hybrid``    — the DP over the ungated host curves and hybrid "auto" without gating
                         and prefetch: what the hybrid setting and its plan do alone (gating
                         trades accuracy for speed);
  * ``hybrid AdapMoE, ungated split`` — hybrid AdapMoE on ``DP + hybrid``'s split: what planning
                         over the gated curves buys, within one run.

Also measured: host→device GB/s of one expert copy through the engine's link (pinned memory on
CUDA), compute time per layer, and the ratio "one expert load ≈ N layers of compute".
On CPU "host" and "device" are the same memory: a free-link run measures the engine's overhead,
``--link-gbps`` emulates a slower link, ``--emulate PRESET`` a whole machine (link, device and
host rates of ``vllm_adapmoe/engine/emulation.py``, on one scale measured here and shared by
every row); results are labelled emulated. ``--rounds`` runs every setting that many times,
alternating, and reports medians.
On CPU with a free link each row is also **replayed** by the simulator with time (``simulate(...,
timing=StepTimes)``): the routing as a trace, the row's settings, the kernel's measured call /
expert / token costs, a call's gather and scatter on part of the tokens and the measured copy
time, plus the replay's own planner time; a layer's remaining overhead is fitted on
all-resident runs with the row's features, a host call's on a run with every expert on the
host, and a load's (booking, queueing, waiting) on a run that loads every expert it needs.
``predicted_vs_measured`` in each row is the check of that model.
JSON to ``benchmarks/results/engine_<device>.json`` (+ a plot), printed as a table.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from vllm_adapmoe.config import AdapMoEConfig, frequency_order  # noqa: E402
from vllm_adapmoe.engine.emulation import PRESETS, make_emulation  # noqa: E402
from vllm_adapmoe.engine.settings import EngineSettings  # noqa: E402
from vllm_adapmoe.engine.cache_plan import plan_dp, plan_hybrid, plan_uniform  # noqa: E402
from vllm_adapmoe.engine.costs import MeasuredCosts, PinnedCosts, StepTimes  # noqa: E402
from vllm_adapmoe.engine.execute import HostExecutor  # noqa: E402
from vllm_adapmoe.engine.routing import Routing  # noqa: E402
from vllm_adapmoe.engine.stats import LayerStats  # noqa: E402
from vllm_adapmoe.offline.simulator import simulate  # noqa: E402
from vllm_adapmoe.offline.trace import FORMAT, Trace  # noqa: E402
from vllm_adapmoe.offline.simulator import host_curves  # noqa: E402
from vllm_adapmoe.engine.stack import ExpertStack, LayerShape, ReplayRouter  # noqa: E402

BUNDLED_PROFILE = HERE.parent / "vllm_adapmoe" / "bundled" / "shakespeare_moe.profile.json"
SHAPES = {
    "mixtral-8x7b": LayerShape(hidden=4096, intermediate=14336, experts=8, top_k=2),
    "bundled": LayerShape(hidden=128, intermediate=256, experts=8, top_k=2),
}


# -- routing ------------------------------------------------------------------------------------
def routing_logits(ids: np.ndarray, weights: np.ndarray, experts: int) -> torch.Tensor:
    """Router logits whose softmax top-k gives exactly these ids and renormalised weights."""
    logits = torch.full((len(ids), experts), -30.0)
    logits.scatter_(1, torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(np.log(weights)))
    return logits


def trace_routing(path: Path, layers: int, batch: int, steps: int, experts: int):
    """Per step: (actual logits per layer, predicted logits per layer) for ``batch`` decode rows.
    Trace layers are tiled to ``layers``; a layer's prediction is the trace's (its router on the
    previous layer's input); where the trace has none (its first layer, reached from the last
    one when tiling) the previous step's routing of that layer stands in."""
    cat = _decode_rows(path)
    available = _rows_per_layer(path)
    need = batch * (steps + 1)
    if available < need:
        raise SystemExit(f"the trace has {available} decode rows per layer; {need} needed "
                         f"(lower --steps or --batch)")
    tl = len(cat)
    out = []
    for s in range(1, steps + 1):
        rows = slice(s * batch, (s + 1) * batch)
        prev = slice((s - 1) * batch, s * batch)
        actual, predicted = [], []
        for n in range(layers):
            ids, w, pids, pw = (a[rows] for a in cat[n % tl])
            actual.append(routing_logits(ids, w, experts))
            if (pids >= 0).all():
                predicted.append(routing_logits(pids, np.maximum(pw, 1e-9), experts))
            else:
                p_ids, p_w = cat[n % tl][0][prev], cat[n % tl][1][prev]
                predicted.append(routing_logits(p_ids, p_w, experts))
        out.append((actual, predicted))
    return out


def synthetic_routing(layers: int, batch: int, steps: int, experts: int, seed: int = 0,
                      accuracy: float = 0.8):
    """Seeded routing with skewed expert popularity per layer and temporal locality; the
    prediction equals the actual logits plus noise sized for ~``accuracy`` top-1 agreement."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(layers, experts, generator=g)
    state = torch.randn(batch, layers, experts, generator=g)
    out = []
    for _ in range(steps):
        state = 0.7 * state + 0.3 * torch.randn(batch, layers, experts, generator=g)
        actual = [(bias[n] + 1.5 * state[:, n]) for n in range(layers)]
        noise = 1.5 * (1 - accuracy)
        predicted = [a + noise * torch.randn(a.shape, generator=g) for a in actual]
        out.append((actual, predicted))
    return out


# -- measurements -------------------------------------------------------------------------------
def link_gbps(stack: ExpertStack, repeats: int = 16) -> tuple[float, float]:
    """Seconds per expert copy through the engine's link and the GB/s that makes."""
    cache = stack.blocks[0].cache
    nbytes = cache.store.expert_bytes
    cache.wait([stack.link.submit(lambda: cache._copy(0, 0), nbytes)])  # warm-up
    start = time.perf_counter()
    cache.wait([stack.link.submit(lambda e=e: cache._copy(e % stack.shape.experts, 0), nbytes)
                for e in range(repeats)])
    per_copy = (time.perf_counter() - start) / repeats
    return per_copy, nbytes / per_copy / 1e9


def run_setting(stack: ExpertStack, routing, batch: int, device: torch.device,
                streaming: bool, warmup: int) -> dict:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, stack.shape.hidden, generator=g).to(device, stack.dtype) * 0.1
          for _ in range(len(routing))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i, (actual, predicted) in enumerate(routing):
        if i == warmup:
            sync()
            stack.reset_stats()
            start = time.perf_counter()
        for block, logits in zip(stack.blocks, predicted):
            block.gate.logits = logits.to(device, stack.dtype)
        stack.decode_step(xs[i], [a.to(device, stack.dtype) for a in actual])
        if streaming:
            stack.forget_residency()
    sync()
    seconds = time.perf_counter() - start
    steps = len(routing) - warmup
    total = stack.stats()["total"]
    tokens = steps * batch
    return {"tok_s": tokens / seconds, "step_ms": 1e3 * seconds / steps,
            "loads_per_token": total["loads"] / tokens, "hit_rate": total["hit_rate"],
            "stall_s": total["stall_s"], "bytes_loaded": total["bytes_loaded"],
            "activated_per_token_layer": total["activated_experts"] / max(total["tokens"], 1),
            "prefetch_issued": total["prefetch_issued"], "prefetch_correct": total["prefetch_correct"],
            "host_token_share": total["host_tokens"] / max(total["tokens"], 1),
            "host_experts_per_layer_step": total["host_experts"] / max(total["steps"], 1),
            "promotions_per_token": total["promotions"] / tokens, "host_s": total["host_s"],
            "device_expert_bytes": stack.device_bytes(), "live_costs": live_costs(stack)}


def live_costs(stack: ExpertStack) -> dict | None:
    """The hybrid cost model as the run left it (its parts refreshed from live host calls and
    waves), averaged over the layers: what the time replay's decisions use for this row."""
    costs = [b.host_costs for b in stack.blocks if isinstance(b.host_costs, MeasuredCosts)
             and b.host_costs.calibrated]
    if not costs:
        return None
    mean = lambda name: sum(getattr(c, name) for c in costs) / len(costs)  # noqa: E731
    return {"load_s": mean("load_s"), "host_fixed_s": mean("host_fixed_s"),
            "host_token_s": mean("host_token_s"), "host_call_s": mean("host_call_s"),
            "device_call_s": mean("device_call_s"), "parallel": costs[0].parallel}


def kernel_costs(stack: ExpertStack, per_copy: float) -> MeasuredCosts:
    """The kernel's call / expert / token costs, timed on a layer's host store (on CPU the
    device slots are the same memory and run the same kernel)."""
    block = stack.blocks[0]
    costs = MeasuredCosts(lambda: per_copy, parallel=False)
    host = HostExecutor(block.store, block.kernel, LayerStats(), costs, stack.device)
    costs.calibrate(host.time_host, repeats=9)
    return costs


def subset_overhead(stack: ExpertStack, batch: int, repeats: int = 21) -> float:
    """What a kernel call on part of a step's tokens adds: the executor's gather and scatter
    around it. The median host call on all but one of ``batch`` tokens given as rows, less the
    median on every token (no gather); 0 at batch 1, where tokens are never split."""
    if batch < 2:
        return 0.0
    block, shape = stack.blocks[0], stack.shape
    host = HostExecutor(block.store, block.kernel, LayerStats(),
                        MeasuredCosts(lambda: 0.0, parallel=False), stack.device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, shape.hidden, generator=g).to(stack.dtype)
    ids = torch.stack([torch.randperm(shape.experts, generator=g)[:shape.top_k]
                       for _ in range(batch)]).to(torch.int32)
    routing = Routing(ids, torch.full(ids.shape, 1.0 / shape.top_k))
    experts = len(ids.unique())

    def timed(rows: torch.Tensor) -> float:
        samples = []
        for _ in range(repeats):
            out = torch.empty_like(x)
            start = time.perf_counter()
            host.finish(host.start(out, x, routing, rows, experts), out, False)
            samples.append(time.perf_counter() - start)
        return sorted(samples)[repeats // 2]

    every = torch.arange(batch)
    timed(every)  # warm-up
    return max(timed(every[1:]) - timed(every), 0.0)


def as_trace(routing, top_k: int, experts: int, expert_bytes: int) -> Trace:
    """The replayed routing as a trace (every token a decode token): each layer's top-k of its
    logits, and of the logits its look-ahead saw."""
    ids, weights, pred_ids, pred_weights, layer, step = [], [], [], [], [], []
    for s, (actual, predicted) in enumerate(routing):
        for n, (a, p) in enumerate(zip(actual, predicted)):
            for logits, i_out, w_out in ((a, ids, weights), (p, pred_ids, pred_weights)):
                w, i = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
                i_out.append(i.numpy().astype(np.int16))
                w_out.append((w / w.sum(-1, keepdim=True)).numpy().astype(np.float32))
            layer.append(np.full(len(a), n, np.int16))
            step.append(np.full(len(a), s, np.int32))
    n_rows = sum(len(x) for x in layer)
    meta = {"format": FORMAT, "num_layers": len(routing[0][0]), "top_k": top_k,
            "num_experts": experts, "expert_bytes": expert_bytes, "steps": len(routing)}
    return Trace(meta, np.concatenate(ids), np.concatenate(weights), np.concatenate(layer),
                 np.concatenate(step), np.ones(n_rows, bool), np.zeros(n_rows, np.int32),
                 np.concatenate(pred_ids), np.concatenate(pred_weights), {})


def features(config: AdapMoEConfig) -> str:
    """The per-layer machinery a row runs besides its kernel calls and copies."""
    parts = [name for name, on in (("prefetch", config.prefetch), ("gating", bool(config.threshold)),
                                   (f"hybrid {config.hybrid}", config.hybrid != "off")) if on]
    return " + ".join(parts) or "none"


HOST_FIT = "fit: every expert on the host"
LOAD_FIT = "fit: every expert loaded when needed"


def overhead_fits(plan: dict, experts: int, top_k: int, layers: int) -> dict[str, tuple]:
    """Per feature set of the rows (beyond none, which the all-resident row is): an all-resident
    run with those features, on which the time replay fits that set's layer overhead; with
    hybrid rows also a run with no slot at all (every token of every layer on the host), on
    which it fits a host call's own overhead (the all-resident runs make no host call); and a
    run at ``top_k`` slots that forgets them after every step (layer streaming's setting, a
    run of its own), on which it fits what a load costs the engine beyond its copy."""
    fits = {LOAD_FIT: ([top_k] * layers, AdapMoEConfig(), True, None)}
    for slots, config, streaming, placement in plan.values():
        key = features(config)
        if key != "none" and f"fit: all resident + {key}" not in fits:
            fits[f"fit: all resident + {key}"] = ([experts] * layers, config, False, None)
        if config.hybrid == "host-only" and HOST_FIT not in fits:
            fits[HOST_FIT] = ([0] * layers, config, False, None)
    return fits


def replay_times(rows: dict, plan: dict, fits: dict, trace: Trace, costs: MeasuredCosts,
                 per_copy: float, subset_s: float, warmup: int, batch: int,
                 layers: int) -> tuple[dict[str, float], float, float]:
    """Each row's simulated tok/s beside its measured one (``predicted_tok_s``,
    ``predicted_vs_measured``). A layer's overhead beyond its kernel calls and copies (routing,
    planning, the look-ahead) is fitted per feature set on an all-resident run with those
    features (``fits``: name → measured row), a host call's own overhead on a run with every
    expert on the host and a load's on a run that loads every expert it needs (returned:
    feature set → seconds per layer step, and the other two). Hybrid rows decide with the cost
    model their live run ended with; every row is priced with the start-up microbenchmark's
    unit costs (``costs``, ``per_copy``, ``subset_s``)."""
    def measured(name: str) -> dict:
        return rows[name] if name in plan else fits[name]

    def replay(name: str, layer_s: float, host_extra_s: float = 0.0,
               load_s: float = per_copy) -> float:
        slots, config, streaming, placement = plan[name] if name in plan else fits[name]["plan"]
        live = measured(name).get("live_costs")  # decide as the live run did
        decide = PinnedCosts(**live) if live else costs
        out = simulate(trace, slots, "lru", threshold=config.threshold,
                       sensitivity=list(config.sensitivity or [0.0] * layers),
                       prefetch=config.prefetch, warm_start=False, hybrid=config.hybrid,
                       host_costs=decide, placement=placement or [[]] * layers,
                       streaming=streaming,
                       timing=StepTimes.measured(costs, load_s, layer_s, host_extra_s,
                                                 subset_s))
        return float(sum(out["time"]["step_s"][warmup:]))

    steps = trace.meta["steps"] - warmup
    fitted = {}
    for key, name in [("none", "all resident"),
                      *((n.removeprefix("fit: all resident + "), n) for n in fits
                        if n not in (HOST_FIT, LOAD_FIT))]:
        seconds = measured(name)["step_ms"] * 1e-3 * steps
        fitted[key] = max(seconds - replay(name, 0.0), 0.0) / (steps * layers)
    host_extra = 0.0
    if HOST_FIT in fits:  # every layer step of that run is one host call
        layer_s = fitted[features(fits[HOST_FIT]["plan"][1])]
        seconds = measured(HOST_FIT)["step_ms"] * 1e-3 * steps
        host_extra = max(seconds - replay(HOST_FIT, layer_s), 0.0) / (steps * layers)
    load_s = per_copy
    if LOAD_FIT in fits:  # the copies of its measured steps: what one more second per copy adds
        base = replay(LOAD_FIT, fitted["none"])
        copies = (replay(LOAD_FIT, fitted["none"], load_s=per_copy + 1.0) - base)
        seconds = measured(LOAD_FIT)["step_ms"] * 1e-3 * steps
        load_s += max(seconds - base, 0.0) / max(copies, 1.0)
    for name, row in rows.items():
        try:
            seconds = replay(name, fitted[features(plan[name][1])], host_extra, load_s)
        except RuntimeError as e:
            raise RuntimeError(f"{name}: {e}") from e
        row["predicted_tok_s"] = steps * batch / seconds
        row["predicted_vs_measured"] = row["predicted_tok_s"] / row["tok_s"]
    return fitted, host_extra, load_s - per_copy


@functools.lru_cache(maxsize=2)
def _decode_rows(path: Path) -> dict[int, list[np.ndarray]]:
    """Per trace layer: its decode rows' (ids, weights, predicted ids, predicted weights);
    read once (the step cap, the measured and the held-out routing all use it), never written."""
    per_layer: dict[int, list] = {}
    for block in Trace.load(path):
        rows = block.decode.nonzero()[0]
        if len(rows):
            per_layer.setdefault(block.layer, []).append(
                (block.ids[rows], block.weights[rows], block.pred_ids[rows], block.pred_weights[rows]))
    return {layer: [np.concatenate([r[i] for r in rows]) for i in range(4)]
            for layer, rows in sorted(per_layer.items())}


def _rows_per_layer(path: Path) -> int:
    """Decode rows every trace layer has (the most any routing drawn from it can use)."""
    return min(len(v[0]) for v in _decode_rows(path).values())


def steps_for(args, batch: int) -> int:
    """``--steps``, or fewer where the trace is too short for them and as many held-out steps
    (the hybrid plan's input) at this batch."""
    if args.synthetic:
        return args.steps
    available = _rows_per_layer(args.trace)
    fit = (available // batch - 1) // 2 - args.warmup
    if fit < 1:
        raise SystemExit(f"the trace has {available} decode rows per layer: too few for batch {batch}")
    return min(args.steps, fit)


def held_out_routing(args, layers: int, batch: int, steps: int, experts: int):
    """Routing of the trace steps after the measured ones (the hybrid plan's "profile"):
    ``--held-out`` of them (default: as many as measured, at least 48, since a DP over a few
    steps fits their noise), fewer where the trace ends; None when it has none left (or the
    routing is synthetic): then the measured steps themselves."""
    if args.synthetic:
        return None
    available = _rows_per_layer(args.trace) // batch - 1
    held = min(args.held_out or max(steps, 48), available - steps)
    if held < 1:
        return None
    return trace_routing(args.trace, layers, batch, steps + held, experts)[steps:]


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tok/s (its counters with it), plus every round's tok/s."""
    ordered = sorted(runs, key=lambda r: r["tok_s"])
    return {**ordered[len(ordered) // 2], "tok_s_rounds": [r["tok_s"] for r in runs]}


def tile(values: list, n: int) -> list:
    return [values[i % len(values)] for i in range(n)]


def settings(shape: LayerShape, layers: int, profile: dict, threshold: float,
             link: float | None, emulate: str | None,
             host: list[list[float]], gated: list[list[float]],
             device_type: str) -> dict[str, tuple]:
    """name → (slots per layer, engine config, streaming, placement per layer or None).
    ``host`` / ``gated``: the host curves of this batch's routing, without / with the AdapMoE
    rows' gating (the hybrid DP plans' input: each plans for the routing it will serve)."""
    E, k = shape.experts, shape.top_k
    curves = tile(profile["miss_curves"], layers)
    sens = tuple(tile(profile["sensitivity"], layers))
    frequent = [frequency_order(r["topk_freq"]) for r in tile(profile["routing"], layers)]
    base = dict(link_gbps=link, emulate=emulate)
    out = {"all resident": ([E] * layers, AdapMoEConfig(**base), False, None)}
    for pct in (50, 25):
        total = max(layers * E * pct // 100, layers * k)
        uniform = plan_uniform(layers, E, total, lo=k)
        dp = plan_dp(curves, total, lo=k)
        full = dict(prefetch=True, threshold=threshold, sensitivity=sens)
        out[f"uniform LRU {pct}%"] = (uniform, AdapMoEConfig(**base), False, None)
        out[f"AdapMoE {pct}%"] = (dp, AdapMoEConfig(**base, **full), False, None)
        out[f"host-only {pct}%"] = (uniform, AdapMoEConfig(**base, hybrid="host-only"), False,
                                    frequent)
        gpu_layers = total // E  # llama.cpp --n-cpu-moe (layers - gpu_layers)
        out[f"layer split {pct}%"] = ([0] * (layers - gpu_layers) + [E] * gpu_layers,
                                      AdapMoEConfig(**base, hybrid="host-only"), False, None)
        out[f"uniform + hybrid {pct}%"] = (uniform, AdapMoEConfig(**base, hybrid="auto"), False, None)
        # the engine's own choice: whole layers where the host is the device's own memory
        whole = AdapMoEConfig(**base).same_memory(device_type)
        split = plan_hybrid(host, total, k, whole_layers=whole)
        out[f"DP + hybrid {pct}%"] = (split, AdapMoEConfig(**base, hybrid="auto"), False, None)
        out[f"hybrid AdapMoE {pct}%"] = (plan_hybrid(gated, total, k, whole_layers=whole),
                                         AdapMoEConfig(**base, **full, hybrid="auto"), False, None)
        # the same row on the ungated curves' split: what planning for the gated routing buys
        out[f"hybrid AdapMoE, ungated split {pct}%"] = (
            split, AdapMoEConfig(**base, **full, hybrid="auto"), False, None)
    out["layer streaming"] = ([k] * layers, AdapMoEConfig(**base), True, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bundled")
    ap.add_argument("--layers", type=int, default=None,
                    help="MoE layers (default: 32 for bundled, 4 for mixtral-8x7b on cpu, 16 on cuda)")
    ap.add_argument("--host-layers", type=int, default=None,
                    help="distinct layers of random host experts, tiled over --layers (default: "
                         "all distinct); fewer let a deep large-shape stack fit host memory")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=40,
                    help="measured decode steps per setting (fewer where the trace is short)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--held-out", type=int, default=None,
                    help="trace steps after the measured ones that the hybrid plans are made "
                         "from (default: as many as measured, at least 48)")
    ap.add_argument("--trace", type=Path, default=HERE / "results" / "trace_bundled_b1.npz")
    ap.add_argument("--synthetic", action="store_true", help="seeded synthetic routing, no trace")
    ap.add_argument("--profile", type=Path, default=BUNDLED_PROFILE,
                    help="sensitivities + miss curves (tiled over the layers)")
    ap.add_argument("--threshold", type=float, default=0.013, help="gating T of the AdapMoE rows")
    ap.add_argument("--link-gbps", type=float, default=None, help="emulate a slower link (CPU)")
    ap.add_argument("--emulate", choices=sorted(PRESETS), default=None,
                    help="emulate a whole machine: link, device and host (CPU)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating runs of every setting")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    layers = args.layers or (32 if args.shape == "bundled" else (16 if args.device == "cuda" else 4))
    profile = json.loads(args.profile.read_text())
    from tqdm.auto import tqdm

    # One set of host experts, shared by every setting (random bf16, pinned on CUDA); with
    # --emulate one measured scale, shared too (each row's durations on the same clock).
    emulation = make_emulation(args.emulate, shape.expert_bytes(2), shape.hidden, shape.intermediate)
    # Layers sharing one store read the same bytes; an expert far larger than the CPU's caches
    # (a Mixtral expert: 352 MB) is read from DRAM each time, so the timing is a deep stack's.
    host_layers = min(args.host_layers or layers, layers)
    base = ExpertStack(shape, [shape.top_k] * host_layers, EngineSettings(emulate=args.emulate),
                       device, emulation=emulation)
    base.load_random(seed=0, progress=True)
    stores = tile([b.store for b in base.blocks], layers)
    per_copy, gbps = link_gbps(base)
    # the time replay's unit costs (CPU, free link: the device kernel is the host's)
    replayed = args.device == "cpu" and not args.emulate and not args.link_gbps
    costs = kernel_costs(base, per_copy) if replayed else None
    subsets = {batch: subset_overhead(base, batch) for batch in args.batch} if replayed else {}
    del base
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "shape": args.shape, "layer_shape": vars(shape), "layers": layers,
              "host_layers": host_layers, "expert_bytes": shape.expert_bytes(2),
              "routing": "synthetic" if args.synthetic
              else str(args.trace.name), "threshold": args.threshold, "rounds": args.rounds,
              "link": {"measured_gbps": gbps, "copy_ms": per_copy * 1e3,
                       "emulated_gbps": args.link_gbps},
              "emulated": emulation.label if emulation else None,
              "emulation": None if emulation is None else {
                  "preset": vars(emulation.preset), "scale": emulation.scale,
                  "device_expert_ms_here": emulation.device_expert_s * 1e3,
                  "load_ms": emulation.copy_s(shape.expert_bytes(2)) * 1e3,
                  "host_ms_1_token": emulation.host_s(1) * 1e3},
              "torch": torch.__version__, "batches": {}}
    for batch in args.batch:
        measured = steps_for(args, batch)
        steps = measured + args.warmup
        routing = (synthetic_routing(layers, batch, steps, shape.experts) if args.synthetic
                   else trace_routing(args.trace, layers, batch, steps, shape.experts))
        held_out = held_out_routing(args, layers, batch, steps, shape.experts)
        steps_ = held_out or routing
        # the simulator's host curves of these steps, ungated and gated as the AdapMoE rows gate
        held = as_trace(steps_, shape.top_k, shape.experts, shape.expert_bytes(2))
        host = host_curves(held, progress=False)
        gated = host_curves(held, progress=False, threshold=args.threshold,
                            sensitivity=tile(profile["sensitivity"], layers))
        plan = settings(shape, layers, profile, args.threshold, args.link_gbps, args.emulate, host,
                        gated, args.device)
        fits = overhead_fits(plan, shape.experts, shape.top_k, layers) if replayed else {}
        runs: dict[str, list[dict]] = {name: [] for name in {**plan, **fits}}
        bar = tqdm(total=len(runs) * args.rounds, desc=f"batch {batch}", unit="run")
        for _ in range(args.rounds):  # alternating: every setting once per round
            for name, (slots, config, streaming, placement) in {**plan, **fits}.items():
                stack = ExpertStack(shape, slots, config.engine_settings(), device,
                                    sensitivity=list(config.sensitivity or [0.0] * layers),
                                    routers=[ReplayRouter() for _ in range(layers)],
                                    stores=stores, emulation=emulation, placement=placement)
                runs[name].append(run_setting(stack, routing, batch, device, streaming,
                                              args.warmup))
                del stack
                gc.collect()
                bar.update()
        bar.close()
        rows = {name: {"slots": plan[name][0], **_median_run(runs[name])} for name in plan}
        replay = None
        if replayed:
            fit_rows = {name: {**_median_run(runs[name]), "plan": fits[name]} for name in fits}
            overhead, host_call, per_load = replay_times(rows, plan, fit_rows,
                                    as_trace(routing, shape.top_k, shape.experts,
                                             shape.expert_bytes(2)),
                                    costs, per_copy, subsets[batch], args.warmup, batch,
                                    layers)
            replay = {"call_ms": costs.host_call_s * 1e3, "expert_ms": costs.host_fixed_s * 1e3,
                      "pair_ms": costs.host_token_s * 1e3, "load_ms": per_copy * 1e3,
                      "subset_ms": subsets[batch] * 1e3, "load_overhead_ms": per_load * 1e3,
                      "layer_overhead_ms": {k: v * 1e3 for k, v in overhead.items()},
                      "host_call_ms": host_call * 1e3}
        resident = rows["all resident"]
        layer_ms = resident["step_ms"] / layers
        load_ms = (emulation.copy_s(shape.expert_bytes(2)) * 1e3 if emulation else
                   shape.expert_bytes(2) / (args.link_gbps * 1e9) * 1e3 if args.link_gbps
                   else per_copy * 1e3)
        for name, row in rows.items():
            row["vs_resident"] = row["tok_s"] / resident["tok_s"]
            pct = 25 if "25%" in name else 50 if "50%" in name else None
            if pct:
                for other in ("uniform LRU", "host-only"):
                    if f"{other} {pct}%" in rows:
                        key = "vs_" + other.replace(" ", "_").replace("-", "_").lower()
                        row[key] = row["tok_s"] / rows[f"{other} {pct}%"]["tok_s"]
        result["batches"][str(batch)] = {"steps": measured, "host_curves": host,
                                         "host_curves_gated": gated, "host_curves_from":
                                         f"{len(held_out)} held-out trace steps" if held_out
                                         else "measured steps",
                                         "layer_compute_ms": layer_ms, "load_ms": load_ms,
                                         "load_in_layers": load_ms / layer_ms,
                                         "time_replay": replay, "settings": rows}
    out = args.out or HERE / "results" / f"engine_{args.device}.json"
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


def table(result: dict) -> str:
    link = result["link"]
    lines = [f"engine on {result['device']}, shape {result['shape']} x {result['layers']} layers, "
             f"routing {result['routing']}; link measured {link['measured_gbps']:.1f} GB/s "
             f"({link['copy_ms']:.2f} ms per expert)"
             + (f", emulated {link['emulated_gbps']} GB/s" if link["emulated_gbps"] else "")
             + (f", {result['emulated']} (scale x{result['emulation']['scale']:.0f})"
                if result.get("emulated") else "")]
    for batch, b in result["batches"].items():
        lines.append(f"\nbatch {batch}: layer compute {b['layer_compute_ms']:.3f} ms, one expert "
                     f"load = {b['load_in_layers']:.1f} layers")
        lines.append("| setting | tok/s | × resident | × uniform LRU | × host-only | loads/token "
                     "| hit rate | tokens on host | replayed ÷ measured |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name, r in b["settings"].items():
            vs = f"{r['vs_uniform_lru']:.2f}" if "vs_uniform_lru" in r else "—"
            vh = f"{r['vs_host_only']:.2f}" if "vs_host_only" in r else "—"
            lines.append(f"| {name} | {r['tok_s']:.1f} | {r['vs_resident']:.2f} | {vs} | {vh} | "
                         f"{r['loads_per_token']:.2f} | {r['hit_rate']:.2f} | "
                         f"{r.get('host_token_share', 0):.2f} | "
                         + (f"{r['predicted_vs_measured']:.2f}" if "predicted_vs_measured" in r
                            else "—") + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    batches = list(result["batches"])
    names = list(result["batches"][batches[0]]["settings"])
    width = 0.8 / len(batches)
    for i, batch in enumerate(batches):
        vals = [result["batches"][batch]["settings"][n]["vs_resident"] for n in names]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=f"batch {batch}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=20, fontsize=7)
    ax.set_ylabel("decode tok/s ÷ all resident")
    ax.set_title(f"engine, {result['shape']} x {result['layers']} layers, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
