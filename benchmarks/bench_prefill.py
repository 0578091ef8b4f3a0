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

from vllm_adapmoe.engine.emulation import PRESETS, make_emulation  # noqa: E402
from vllm_adapmoe.engine.settings import EngineSettings  # noqa: E402
from vllm_adapmoe.engine.stack import ExpertStack  # noqa: E402


def settings(experts: int, slots: int, emulate: str | None) -> dict[str, EngineSettings]:
    """name → engine settings at ``slots`` own slots per layer."""
    wide = experts - slots  # rows enough for every expert of a layer at once
    base = dict(emulate=emulate)
    out = {"no rows": EngineSettings(**base),
           f"prefill_rows {wide // 2}": EngineSettings(**base, prefill_rows=wide // 2),
           f"prefill_rows {wide}": EngineSettings(**base, prefill_rows=wide)}
    if emulate:  # hybrid's host rate only means something on an emulated machine
        out["hybrid auto"] = EngineSettings(**base, hybrid="auto")
        out[f"hybrid auto + prefill_rows {wide}"] = EngineSettings(**base, hybrid="auto",
                                                                   prefill_rows=wide)
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
    args = ap.parse_args()

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
    named = settings(shape.experts, args.slots, args.emulate)
    for tokens in args.tokens:
        decode = synthetic_routing(args.layers, 4, 4, shape.experts, seed=tokens)
        prompts = synthetic_routing(args.layers, tokens, args.steps, shape.experts,
                                    seed=tokens + 1)
        runs: dict[str, list[dict]] = {name: [] for name in named}
        for _ in range(args.rounds):  # alternating: every setting once per round
            for name, engine in named.items():
                stack = ExpertStack(shape, [args.slots] * args.layers, engine, device,
                                    stores=stores, emulation=emulation)
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
                       step_ms_rounds=[r["step_ms"] for r in rs])
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
