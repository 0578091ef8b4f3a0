"""One MoE layer, stock vLLM vs the AdapMoE block, on the same input, broken down by phase.

Stock = vLLM's own ``MixtralMoE`` (router GEMM + its fused-MoE runner, prepacked experts).
Ours = ``AdapMoEBlock`` with every expert resident (no copies: this measures the per-step host
work the block adds around the same kernel), in three settings:
  * ``adapmoe``            — stock top-2, no prefetch;
  * ``adapmoe+prefetch``   — also predicts the next layer's experts (a second block as target);
  * ``adapmoe+gating T=…`` — adaptive gating (+ prefetch), the full AdapMoE step.

Routing is replayed from a recorded trace of the bundled model (decode rows, layers in turn,
with each layer's calibrated sensitivity S_l), so gating sees realistic weights at any shape:
the router logits given to both layers put log(w) on the trace's top-k experts.
Random bf16 weights; shapes ``bundled`` (128/256, 8 experts, top-2) and ``mixtral-8x7b``
(4096/14336, 8 experts, top-2). Configurations alternate every round; medians of per-call times.

    python benchmarks/bench_layer.py [--shape mixtral-8x7b] [--batches 1 4 16] [--threshold 0.013]
        [--iters 30] [--rounds 5] [--out benchmarks/results/layer_<shape>.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"bundled": (128, 256, 8, 2), "mixtral-8x7b": (4096, 14336, 8, 2)}
PHASES = ["router GEMM", "prepare", "router", "gating", "residency", "prefetch", "compute", "stall"]
# "prepare": routing, gating, counts and next-layer guesses as tensor ops (compiled with --compile);
# "router" (in the step): the host copy of the summary; the rest: the step's Python decisions
HOST = ["prepare", "router", "gating", "residency", "prefetch"]


def init_vllm():
    """A single-process vLLM context (config, distributed groups) to build layers in."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    config = VllmConfig()
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method="tcp://127.0.0.1:29531")
        initialize_model_parallel(1, 1)
    return config


def make_weights(hidden: int, inter: int, experts: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = hidden ** -0.5

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    return {"w1": rnd(experts, inter, hidden), "w3": rnd(experts, inter, hidden),
            "w2": rnd(experts, hidden, inter), "gate": rnd(experts, hidden)}


def stock_layer(config, w: dict[str, torch.Tensor], top_k: int):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.models.mixtral import MixtralMoE

    E, inter, hidden = w["w1"].shape
    with set_current_vllm_config(config):
        moe = MixtralMoE(E, top_k, hidden, inter, params_dtype=torch.bfloat16,
                         prefix="stock.layers.0.block_sparse_moe")
    experts = moe.experts.routed_experts
    experts.w13_weight.data.copy_(torch.cat([w["w1"], w["w3"]], 1))
    experts.w2_weight.data.copy_(w["w2"])
    moe.gate.weight.data.copy_(w["gate"])
    return finish_loading(moe)


def finish_loading(layer: torch.nn.Module) -> torch.nn.Module:
    """What vLLM's loader does after loading weights (CPU: prepack, pick the GEMM)."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    for module in layer.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, QuantizeMethodBase):
            method.process_weights_after_loading(module)
    return layer


def our_block(config, w: dict[str, torch.Tensor], top_k: int, idx: int, step, **settings):
    from vllm.config import set_current_vllm_config

    from vllm_adapmoe.engine.settings import EngineSettings
    from vllm.model_executor.layers.fused_moe import GateLinear

    from vllm_adapmoe.engine.block import AdapMoEBlock
    from vllm_adapmoe.models import kernels  # noqa: F401  (vLLM's fused kernels)

    E, inter, hidden = w["w1"].shape
    settings = EngineSettings(**settings)
    with set_current_vllm_config(config):
        block = AdapMoEBlock(layer_idx=idx, num_experts=E, top_k=top_k, hidden_size=hidden,
                             intermediate_size=inter, num_slots=E, settings=settings, step=step,
                             gate=GateLinear(hidden, E, params_dtype=torch.bfloat16,
                                             prefix=f"ours.layers.{idx}.gate"),
                             device=torch.device("cpu"), params_dtype=torch.bfloat16,
                             prefix=f"ours.layers.{idx}")
    names = [("gate.weight", w["gate"])]
    for e in range(E):
        names += [(f"experts.{e}.{n}.weight", w[n][e]) for n in ("w1", "w2", "w3")]
    block.load_weights(names)
    return finish_loading(block)


def replayed_routing(trace_path: Path, batch: int, count: int, experts: int):
    """``count`` batches of ``batch`` decode rows from the trace, one layer per batch in turn:
    (layer, router logits [batch, E]) whose softmax top-k reproduces the traced weights."""
    from bench_engine import routing_logits

    from vllm_adapmoe.offline.trace import Trace

    trace = Trace.load(trace_path)
    by_layer = {}
    for block in trace:
        rows = block.decode.nonzero()[0]
        if len(rows):
            by_layer.setdefault(block.layer, []).append((block.ids[rows], block.weights[rows]))
    out = []
    for i in range(count):
        layer = i % len(by_layer)
        ids = np.concatenate([a for a, _ in by_layer[layer]])
        weights = np.concatenate([b for _, b in by_layer[layer]])
        start = (i // len(by_layer) * batch) % max(len(ids) - batch, 1)
        logits = routing_logits(ids[start:start + batch], weights[start:start + batch], experts)
        out.append((layer, logits.to(torch.bfloat16)))
    return out


def run(args) -> dict:
    from vllm.forward_context import set_forward_context

    from vllm_adapmoe.engine.step import PhaseClock, StepInfo

    torch.manual_seed(0)
    hidden, inter, E, k = SHAPES[args.shape]
    profile = json.loads(Path(args.profile).read_text())
    sens = profile["sensitivity"]
    config = init_vllm()
    w = make_weights(hidden, inter, E, 0)
    stock = stock_layer(config, w, k)
    print(f"[bench_layer] {args.shape}: hidden {hidden}, intermediate {inter}, {E} experts, top-{k}; "
          f"built stock + ours", flush=True)
    step = StepInfo(counted=True, all_decode=True)
    block = our_block(config, w, k, 0, step, threshold=args.threshold, sensitivity=tuple(sens))
    del w
    gated = f"adapmoe+gating T={args.threshold}"
    # One block, three settings (the experts are big): (prefetch, gating threshold). The
    # prefetch target is the block itself: the same router work and bookkeeping as a next layer
    # whose experts are all resident, without a second copy of the experts.
    modes = {"adapmoe": (False, 0.0), "adapmoe+prefetch": (True, 0.0), gated: (True, args.threshold)}
    configs = dict.fromkeys(modes, block)
    # ``prepare`` is the block's tensor math (routing, gating, counts, next-layer guesses);
    # vLLM compiles it into its graph by default, as here with --compile (one compiled
    # function per setting: prefetch on/off changes what it computes).
    prepare = {name: (torch.compile(block.prepare, dynamic=True, fullgraph=True) if args.compile
                      else block.prepare) for name in modes}
    results = []
    for batch in args.batches:
        x_all = [torch.randn(batch, hidden).to(torch.bfloat16) for _ in range(args.iters)]
        routing = replayed_routing(Path(args.trace), batch, args.iters, E)
        step.decode_tokens = batch
        step.decode_mask = torch.ones(batch, dtype=torch.bool)
        times = {name: [] for name in ["stock", *configs]}
        phases = {name: {} for name in configs}
        activated = {}
        with set_forward_context(None, config):
            block.lookahead.prefetch, block.gating.threshold = modes["adapmoe"]
            same = all(torch.equal(stock.experts(x, logits), block.forward_impl(x, logits))
                       for x, (_, logits) in zip(x_all[:3], routing[:3]))
            block.stats.reset()
            for r in range(args.rounds + 1):  # round 0 warms up
                for name in times:
                    for x, (layer, logits) in zip(x_all, routing):
                        if name == "stock":
                            t0 = time.perf_counter()
                            stock.gate(x)
                            stock.experts(x, logits)
                            dt = time.perf_counter() - t0
                        else:
                            block.lookahead.prefetch, block.gating.threshold = modes[name]
                            block.lookahead.targets = [block] if block.lookahead.prefetch else []
                            block.gating.sensitivity = sens[layer]
                            block.clock = clock = PhaseClock(x.device)
                            block.gate(x)
                            clock.mark("router GEMM")
                            prepared = prepare[name](x, logits)
                            clock.mark("prepare")
                            block.run_step(x, *prepared)
                            dt = sum(clock.seconds.values())
                            if r:
                                for p, s in clock.seconds.items():
                                    phases[name].setdefault(p, []).append(s)
                        if r:
                            times[name].append(dt)
                    if name in modes:
                        st = block.stats
                        if r:
                            a, t = activated.get(name, (0, 0))
                            activated[name] = (a + st.activated_experts, t + st.tokens)
                        st.reset()
        row = {"batch": batch, "identical_to_stock": same, "configs": {}}
        stock_med = statistics.median(times["stock"])
        stock_mean = statistics.fmean(times["stock"])
        for name, ts in times.items():
            med, mean = statistics.median(ts), statistics.fmean(ts)
            # medians resist noise; means weigh every step (at batch 1 a gated layer mixes top-1
            # and top-2 steps, which only the mean shows)
            entry = {"median_us": med * 1e6, "vs_stock": med / stock_med,
                     "mean_us": mean * 1e6, "vs_stock_mean": mean / stock_mean}
            if name in phases:
                ph = {p: statistics.median(v) * 1e6 for p, v in phases[name].items()}
                entry["phases_us"] = ph
                entry["host_us"] = sum(ph.get(p, 0.0) for p in HOST)
                entry["host_share"] = entry["host_us"] / sum(ph.values())
                a, t = activated[name]
                entry["experts_per_token"] = a / max(t, 1)
            row["configs"][name] = entry
        ungated = row["configs"]["adapmoe+prefetch"]
        g = row["configs"][gated]
        g["time_vs_ungated"] = g["mean_us"] / ungated["mean_us"]
        g["median_time_vs_ungated"] = g["median_us"] / ungated["median_us"]
        g["activated_ratio"] = g["experts_per_token"] / k
        results.append(row)
        print_row(row)
    return {"shape": args.shape, "hidden": hidden, "intermediate": inter, "experts": E, "top_k": k,
            "threshold": args.threshold, "trace": Path(args.trace).name, "iters": args.iters,
            "rounds": args.rounds, "compiled": args.compile, "torch_threads": torch.get_num_threads(), "results": results}


def print_row(row: dict) -> None:
    print(f"\nbatch {row['batch']} (adapmoe output identical to stock: {row['identical_to_stock']})")
    print(f"{'config':34s} {'µs':>9s} {'vs stock':>8s} {'mean µs':>9s} {'host %':>7s} {'experts/tok':>11s}  phases (µs)")
    for name, e in row["configs"].items():
        ph = " ".join(f"{p}={e['phases_us'][p]:.0f}" for p in PHASES if p in e.get("phases_us", {}))
        host = f"{100 * e['host_share']:.1f}" if "host_share" in e else "–"
        ept = f"{e['experts_per_token']:.3f}" if "experts_per_token" in e else "–"
        print(f"{name:34s} {e['median_us']:9.0f} {e['vs_stock']:8.2f} {e['mean_us']:9.0f} {host:>7s} "
              f"{ept:>11s}  {ph}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bundled")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threshold", type=float, default=0.013,
                    help="gating T (0.013: +0.74%% held-out perplexity on the bundled model)")
    ap.add_argument("--trace", default=str(ROOT / "benchmarks/results/trace_bundled_b1.npz"))
    ap.add_argument("--profile", default=str(ROOT / "vllm_adapmoe/bundled/shakespeare_moe.profile.json"))
    ap.add_argument("--iters", type=int, default=None, help="calls per config per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the block's tensor math (``prepare``), as vLLM does by default")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.iters = args.iters or (200 if args.shape == "bundled" else 24)
    result = run(args)
    out = Path(args.out or ROOT / f"benchmarks/results/layer_{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
