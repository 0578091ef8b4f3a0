"""Prompt steps through the vLLM-free engine: what a step carrying prompt tokens loads and how
long it takes at a small budget, with and without ``prefill_rows`` (and with hybrid "auto").

A prompt step needs nearly every expert of every layer. With fewer slots than that it runs in
waves of whole tokens, each loading what it lacks, so an expert is loaded again in many waves;
``prefill_rows`` (rows shared by the layers for such steps) makes the waves wider. Each setting
decodes a few tokens, then runs ``--steps`` prompt steps of ``--tokens`` tokens (seeded
synthetic routing with skewed expert popularity, the same for every setting), alternating the
settings round by round; reported: loads per layer and per prompt token, waves per layer,
milliseconds per prompt step and the ratio to the same budget without rows. On CPU the link is
a memcpy unless ``--emulate PRESET`` (link, device and host of a named machine on this CPU's
measured scale: rows say "emulated").

    python benchmarks/bench_prefill.py [--emulate h100-pcie4] [--tokens 32 128 512] [--rounds 3]

Rows are device memory: every row count is also compared with a setting without rows that
holds as many expert rows in own slots ("same memory").

``--serve``: the same question through the OpenAI server instead: three `vllm serve` servers
(compiled, a bundled model, emulated h100-pcie4): 25% own slots per layer without rows (2 of 8
on the Mixtral-shaped model; 16 of 64 on the fine-grained one, ``--model qwen3moe``), the same
device memory as the third spent on own slots without rows, and 25% plus ``--rows`` prefill
rows, driven in turn by `vllm bench serve` (random 128 in / 64 out, each 0.5x-1.5x) at each
concurrency, alternating round by round: output tok/s and p50 / p99 TTFT and TPOT, JSON to
``benchmarks/results/prefill_serve.json`` (``prefill_serve_qwen3moe.json``).

    python benchmarks/bench_prefill.py --serve [--model qwen3moe] [--concurrency 1 4 16]
        [--rows 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_engine import SHAPES, synthetic_routing  # noqa: E402

from vllm_adapmoe.cpu_features import cpu_model  # noqa: E402
from vllm_adapmoe.engine.cache_plan import uniform_split  # noqa: E402
from vllm_adapmoe.engine.emulation import PRESETS, make_emulation  # noqa: E402
from vllm_adapmoe.engine.settings import EngineSettings  # noqa: E402
from vllm_adapmoe.engine.stack import ExpertStack  # noqa: E402


def settings(experts: int, slots: int, layers: int,
             emulate: str | None) -> dict[str, tuple[list[int], EngineSettings]]:
    """name → (own slots per layer, engine settings). Rows cost device memory, so each row
    count has a baseline without rows holding the same number of expert rows in own slots."""
    wide = experts - slots  # rows enough for every expert of a layer at once
    base = dict(emulate=emulate)
    even = [slots] * layers
    out = {"no rows": (even, EngineSettings(**base))}
    for rows in (wide // 2, wide):
        out[f"no rows, same memory as {rows} rows"] = (
            uniform_split(layers * slots + rows, layers), EngineSettings(**base))
        out[f"prefill_rows {rows}"] = (even, EngineSettings(**base, prefill_rows=rows))
    if emulate:  # hybrid's host rate only means something on an emulated machine
        out["hybrid auto"] = (even, EngineSettings(**base, hybrid="auto"))
        out[f"hybrid auto + prefill_rows {wide}"] = (
            even, EngineSettings(**base, hybrid="auto", prefill_rows=wide))
    return out


def run(stack: ExpertStack, decode, prompts) -> dict:
    """Decode ``decode`` steps (a warm cache), then time the prompt steps one by one."""
    g = torch.Generator().manual_seed(1)
    for actual, _ in decode:
        stack.decode_step(torch.randn(actual[0].shape[0], stack.shape.hidden, generator=g)
                          .to(stack.dtype) * 0.1, [a.to(stack.dtype) for a in actual])
    stack.reset_stats()
    times = []
    for actual, _ in prompts:
        x = torch.randn(actual[0].shape[0], stack.shape.hidden, generator=g).to(stack.dtype) * 0.1
        start = time.perf_counter()
        stack.prompt_step(x, [a.to(stack.dtype) for a in actual])
        times.append(time.perf_counter() - start)
    total = stack.stats()["total"]
    layers = len(stack.blocks)
    steps = len(prompts)
    return {"step_ms": 1e3 * statistics.median(times),
            "loads_per_layer": total["prefill_step_loads"] / steps / layers,
            "loads_per_prompt_token": total["prefill_step_loads"] / total["prefill_tokens"],
            "waves_per_layer": total["waves"] / steps / layers,
            "host_token_share": total["host_tokens"] / max(total["tokens"], 1)}


SERVE_KEYS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
              "p99_tpot_ms")


# --serve models: name → (bundled directory, description, own slots per layer: 25%)
SERVE_MODELS = {
    "mixtral": ("shakespeare_moe", "bundled Mixtral-shaped (8 experts, top-2)", 2),
    "qwen3moe": ("shakespeare_qwen3moe", "bundled fine-grained (64 experts, top-8)", 16),
}


def serve(concurrency: list[int], rows: int, rounds: int, out: Path,
          model_name: str = "mixtral") -> None:
    """Served prompt steps with and without ``prefill_rows`` (see the module's docstring)."""
    import tempfile

    from bench_parity import alternate
    from bench_serve import emulation_scale, start_on_one_clock

    directory, description, slots = SERVE_MODELS[model_name]
    model = str(HERE.parent / "vllm_adapmoe" / "bundled" / directory)
    config = json.loads((Path(model) / "config.json").read_text())
    layers, experts = config["num_hidden_layers"], config["num_local_experts"]
    total = slots * layers + rows  # the rows' device memory, as own slots in the baseline
    configs = {"no rows": {"cache_slots": slots, "emulate": "h100-pcie4"},
               "no rows, same memory": {"cache_total_slots": total, "emulate": "h100-pcie4"},
               f"prefill_rows {rows}": {"cache_total_slots": total, "prefill_rows": rows,
                                        "emulate": "h100-pcie4"}}
    work = Path(tempfile.mkdtemp(prefix="adapmoe-prefill-"))
    load = ("--random-range-ratio", "0.5")
    logs = {name: work / f"{i}.log" for i, name in enumerate(configs)}
    result = {"model": description, "model_arg": model_name, "slots": slots, "experts": experts,
              "configs": configs,
              "rounds": rounds, "compiled": True, "emulated": "emulated h100-pcie4",
              "load": "vllm bench serve, random 128 in / 64 out (each 0.5x-1.5x), ignore_eos, "
                      "max-concurrency C, 4C prompts (>= 8)", "rows": []}
    servers: dict[str, tuple] = {}
    try:
        servers = start_on_one_clock(model, configs, logs, eager=False)
        result["emulation_scales"] = {name: emulation_scale(log) for name, log in logs.items()}
        result["cpu"] = cpu_model()
        for c in concurrency:
            n = max(8, 4 * c)
            samples = alternate(servers, model, c, n, rounds, work, load)
            med = {name: {key: statistics.median(s[key] for s in ss) for key in SERVE_KEYS}
                   for name, ss in samples.items()}
            wide = med[f"prefill_rows {rows}"]
            ratios = {name: {key: wide[key] / m[key] if m[key] else None for key in SERVE_KEYS}
                      for name, m in med.items() if name.startswith("no rows")}
            result["rows"].append({"concurrency": c, "prompts": n, "medians": med,
                                   "rows_vs": ratios,
                                   "samples": {name: [{key: s[key] for key in SERVE_KEYS}
                                                      for s in ss]
                                               for name, ss in samples.items()}})
            for name, ratio in ratios.items():
                print(f"c={c:<3} vs {name:<21} tok/s {med[name]['output_throughput']:7.1f} -> "
                      f"{wide['output_throughput']:7.1f} (x{ratio['output_throughput']:.2f})  "
                      f"p50 TTFT x{ratio['median_ttft_ms']:.2f}  p99 TTFT "
                      f"x{ratio['p99_ttft_ms']:.2f}  p50 TPOT x{ratio['median_tpot_ms']:.2f}",
                      flush=True)
            out.write_text(json.dumps(result, indent=1))  # a run cut short keeps what it has
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=60)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bundled")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--slots", type=int, default=2, help="own slots per layer (2 of 8: 25%%)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--steps", type=int, default=3, help="prompt steps per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--emulate", choices=sorted(PRESETS), default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--serve", action="store_true", help="through the OpenAI server instead")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rows", type=int, default=6, help="--serve: prefill_rows of the wide server")
    ap.add_argument("--model", choices=sorted(SERVE_MODELS), default="mixtral",
                    help="--serve: the bundled model (own slots: 2 of 8, or 16 of 64)")
    args = ap.parse_args()
    if args.serve:
        name = "prefill_serve.json" if args.model == "mixtral" else f"prefill_serve_{args.model}.json"
        serve(args.concurrency, args.rows, args.rounds, args.out or HERE / "results" / name,
              args.model)
        return

    shape, device = SHAPES[args.shape], torch.device("cpu")
    emulation = make_emulation(args.emulate, shape.expert_bytes(2), shape.hidden,
                               shape.intermediate)
    base = ExpertStack(shape, [shape.top_k] * args.layers, EngineSettings(emulate=args.emulate),
                       device, emulation=emulation)
    base.load_random(seed=0, progress=True)
    stores = [b.store for b in base.blocks]
    del base
    label = f"emulated {args.emulate}" if args.emulate else "free link (CPU memcpy)"
    result = {"shape": args.shape, "layers": args.layers, "slots": args.slots,
              "experts": shape.experts, "top_k": shape.top_k, "rounds": args.rounds,
              "steps": args.steps, "link": label, "torch": torch.__version__, "rows": []}
    named = settings(shape.experts, args.slots, args.layers, args.emulate)
    for tokens in args.tokens:
        decode = synthetic_routing(args.layers, 4, 4, shape.experts, seed=tokens)
        prompts = synthetic_routing(args.layers, tokens, args.steps, shape.experts,
                                    seed=tokens + 1)
        runs: dict[str, list[dict]] = {name: [] for name in named}
        for _ in range(args.rounds):  # alternating: every setting once per round
            for name, (slots, engine) in named.items():
                stack = ExpertStack(shape, slots, engine, device, stores=stores,
                                    emulation=emulation)
                runs[name].append(run(stack, decode, prompts))
                del stack
        plain = statistics.median(r["step_ms"] for r in runs["no rows"])
        print(f"\n{tokens} prompt tokens per step, {args.slots} of {shape.experts} slots per "
              f"layer, {args.layers} layers, {label}:")
        print("| setting | ms / prompt step | × no rows | loads / layer | loads / prompt token "
              "| waves / layer |")
        print("|---|---|---|---|---|---|")
        for name, rs in runs.items():
            row = {key: statistics.median(r[key] for r in rs) for key in rs[0]}
            row.update(setting=name, tokens=tokens, speedup=plain / row["step_ms"],
                       slots=named[name][0], step_ms_rounds=[r["step_ms"] for r in rs])
            result["rows"].append(row)
            print(f"| {name} | {row['step_ms']:.1f} | {row['speedup']:.2f} | "
                  f"{row['loads_per_layer']:.1f} | {row['loads_per_prompt_token']:.3f} | "
                  f"{row['waves_per_layer']:.1f} |")
    suffix = f"_{args.emulate}" if args.emulate else ""
    out = args.out or HERE / "results" / f"prefill_cpu_{args.shape}{suffix}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
