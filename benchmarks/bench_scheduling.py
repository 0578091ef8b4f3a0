"""Serving benchmark of the expert-aware scheduler: stock scheduling vs ``"scheduling":
"expert-aware"``, same model and settings otherwise, two `vllm serve` servers up at once and driven
in turn (alternating round by round) by vLLM's own load generator, `vllm bench serve
--dataset-name random` (prompts of 64-192 tokens, 32-96 out: `--random-range-ratio 0.5`, so
requests end at different steps as real ones do; `--ignore-eos`), at each concurrency.

Grid (defaults): the bundled Mixtral-shaped model (8 experts, top-2) and the bundled fine-grained
one (64 experts, top-8), 25% of the experts in slots, every load and host computation emulated
as an H100 over PCIe Gen4 (``emulate: "h100-pcie4"``), concurrency 1 / 4 / 16; and the
Mixtral-shaped model with every expert resident (where the scheduler must hold nothing); the
Mixtral-shaped model at 25% with vLLM's n-gram speculative decoding (verify steps of up to 4
tokens per request; `--models mixtral+ngram`); both models at 25% with ``prefill_rows`` on both
servers (`--models mixtral+rows qwen3moe+rows`) or with ``hybrid: "auto"`` on both (`--models
mixtral+hybrid qwen3moe+hybrid`). Reports
output tok/s, p50 / p99 TTFT and TPOT, the ratios expert-aware ÷ stock, and what the scheduler
decided (its counters from /metrics).

Each row also gives the **ceiling** for scheduling prompts (``prompt_step_ceiling``, per server):
from the layers' counters over the measured rounds, the expert traffic (stall + host seconds) of
the steps that carried prompt tokens beyond what as many decode steps cost, as a share of the run,
and the output tok/s ratio the run would reach if every prompt step cost only a decode step's
traffic: more than any admission policy can give, since merged prompt steps still pay their
shared part once and their per-token part in full. With ``hybrid`` the host computes beside the
link, so stall + host seconds can add up to more than the wall time they took (more so in prompt
steps, which load and compute on the host at once): there the ceiling is looser still.

By default the load is a closed loop (`--max-concurrency C`: a request starts when one ends).
`--request-rate R` makes it open: requests arrive as a Poisson process at R per second (vLLM's
`--request-rate`), still at most C at once, as a public endpoint sees them; such rows are their
own grid points (`request_rate` in the JSON). `--max-prompt-hold-ms X` sets the expert-aware
server's TTFT bound (its default otherwise), the knob that trades TTFT for TPOT; also its own
grid point (`max_prompt_hold_ms`).

    python benchmarks/bench_scheduling.py [--rounds 3] [--concurrency 1 4 16] [--request-rate R]
        [--max-prompt-hold-ms X]
        [--models mixtral qwen3moe resident mixtral+ngram mixtral+rows qwen3moe+rows
                  mixtral+hybrid qwen3moe+hybrid]
        [--out benchmarks/results/scheduling.json] [--append]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_parity import alternate  # noqa: E402
from bench_serve import emulation_scale, start_on_one_clock  # noqa: E402

from vllm_adapmoe.cpu_features import cpu_model  # noqa: E402

BUNDLED = HERE.parent / "vllm_adapmoe" / "bundled"
EMULATED_25 = {"cache_slots": 2, "emulate": "h100-pcie4"}
NGRAM = ("--speculative-config",
         '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}')
# name: (model, adapmoe settings, more `vllm serve` flags)
MODELS = {
    "mixtral": (BUNDLED / "shakespeare_moe", EMULATED_25, ()),
    "qwen3moe": (BUNDLED / "shakespeare_qwen3moe", {"cache_slots": 16, "emulate": "h100-pcie4"},
                 ()),
    "resident": (BUNDLED / "shakespeare_moe", {}, ()),
    "mixtral+ngram": (BUNDLED / "shakespeare_moe", EMULATED_25, NGRAM),
    # both servers with the prefill rows that make a prompt step one wave (6 layers x 2 slots +
    # 6 rows; 6 x 16 + 48): what holding prompts is still worth once prompt steps load an
    # expert once
    "mixtral+rows": (BUNDLED / "shakespeare_moe", {**EMULATED_25, "prefill_rows": 6}, ()),
    "qwen3moe+rows": (BUNDLED / "shakespeare_qwen3moe",
                      {"cache_slots": 16, "emulate": "h100-pcie4", "prefill_rows": 48}, ()),
    # both servers computing cold experts' decode tokens on the (emulated) host, as a user of
    # this hardware would run: decode steps stop loading, prompt steps still load
    "mixtral+hybrid": (BUNDLED / "shakespeare_moe", {**EMULATED_25, "hybrid": "auto"}, ()),
    "qwen3moe+hybrid": (BUNDLED / "shakespeare_qwen3moe",
                        {"cache_slots": 16, "emulate": "h100-pcie4", "hybrid": "auto"}, ()),
}
# requests of different lengths (prompts and outputs 0.5x-1.5x the mean), so they finish at
# different steps and arrivals meet running decodes, as they do in real traffic
LOAD = ("--random-range-ratio", "0.5")
KEYS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")


def scheduler_counters(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^adapmoe_scheduler_(\w+) ([0-9.eE+-]+)$", text, re.M)}


def layer_counters(base: str) -> dict[str, float]:
    """The MoE layers' counters on /metrics (``adapmoe_<name>_total{layer=...}``), summed over
    the layers (they run one after another, so a step's traffic is their sum)."""
    time.sleep(0.5)  # the workers rewrite their counters every 0.25 s
    totals: dict[str, float] = {}
    layers: set[str] = set()
    for m in re.finditer(r'^adapmoe_(\w+)_total\{layer="(\d+)"[^}]*\} ([0-9.eE+-]+)$',
                         httpx.get(f"{base}/metrics", timeout=10).text, re.M):
        totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(3))
        layers.add(m.group(2))
    totals["layers"] = len(layers)
    return totals


def prompt_step_ceiling(before: dict[str, float], after: dict[str, float],
                        seconds: float) -> dict[str, float]:
    """What prompt steps' expert traffic cost a run of ``seconds`` beyond what as many decode
    steps cost (the layers' stall + host seconds in steps carrying prompt tokens, less those
    steps' count × a decode step's mean traffic), and the output tok/s ratio a scheduler could
    reach at most by changing prompt steps alone: ``seconds / (seconds − extra)``, as if every
    prompt step cost no more traffic than a decode step. Generous: a scheduler only merges prompt
    steps (each merged step still pays its shared part once, its per-token part in full)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0)
         for k in ("steps", "prefill_steps", "stall_s", "host_s", "prefill_step_traffic_s")}
    traffic = d["stall_s"] + d["host_s"]
    decode_steps = d["steps"] - d["prefill_steps"]
    per_decode_step = (traffic - d["prefill_step_traffic_s"]) / decode_steps if decode_steps else 0.0
    extra = max(0.0, d["prefill_step_traffic_s"] - d["prefill_steps"] * per_decode_step)
    layers = after.get("layers") or 1
    return {"run_s": seconds, "steps": d["steps"] / layers,
            "prompt_steps": d["prefill_steps"] / layers, "traffic_s": traffic,
            "prompt_step_traffic_s": d["prefill_step_traffic_s"],
            "prompt_step_extra_s": extra, "extra_share": extra / seconds if seconds else 0.0,
            "tok_s_ceiling": seconds / (seconds - extra) if seconds > extra else float("inf")}


def run_model(name: str, concurrency: list[int], rounds: int, work: Path,
              done: list[dict], save: Callable[[], None], request_rate: float | None,
              hold_ms: float | None) -> None:
    model, settings, flags = MODELS[name]
    configs = {"stock scheduling": settings,
               "expert-aware": {**settings, "scheduling": "expert-aware",
                                **({} if hold_ms is None else {"max_prompt_hold_ms": hold_ms})}}
    logs = {c: work / f"{name}-{i}.log" for i, c in enumerate(configs)}
    servers: dict[str, tuple] = {}
    rows = done
    try:
        # stock first: the expert-aware server runs on its emulation clock
        servers = start_on_one_clock(str(model), configs, logs, eager=False, extra=list(flags))
        scales = {c: emulation_scale(log) for c, log in logs.items()}
        for c in concurrency:
            n = max(8, 4 * c)
            before = scheduler_counters(servers["expert-aware"][1])
            load = LOAD if request_rate is None else (*LOAD, "--request-rate", str(request_rate))
            marks: dict[str, dict[str, float]] = {}

            def mark() -> None:
                marks.update({k: layer_counters(base) for k, (_, base) in servers.items()})

            samples = alternate(servers, str(model), c, n, rounds, work, load, after_warmup=mark)
            after = scheduler_counters(servers["expert-aware"][1])
            # over the measured rounds (after the warm-up): the ceiling for prompt scheduling
            ceilings = {k: prompt_step_ceiling(marks[k], layer_counters(base),
                                               sum(s["duration"] for s in samples[k]))
                        for k, (_, base) in servers.items()}
            decided = {k: after.get(k, 0.0) - before.get(k, 0.0)
                       for k in ("prompt_steps", "prompt_tokens", "held_steps", "requests_held",
                                 "held_s")}
            decided["held_max_s"] = after.get("held_max_s", 0.0)
            for key in ("prompt_step_cost_s", "prompt_step_shared_cost_s"):  # last estimates
                decided[key] = after.get(key, 0.0)
            med = {k: {key: statistics.median(s[key] for s in ss) for key in KEYS}
                   for k, ss in samples.items()}
            stock, ours = med["stock scheduling"], med["expert-aware"]
            rows.append({"model": name, "settings": settings, "flags": list(flags),
                         "concurrency": c, "request_rate": request_rate,
                         "max_prompt_hold_ms": hold_ms, "prompts": n,
                         "rounds": rounds,
                         "stock": stock, "expert_aware": ours,
                         "ratio": {key: ours[key] / stock[key] if stock[key] else None
                                   for key in KEYS},
                         "scheduler": decided, "prompt_step_ceiling": ceilings,
                         "emulation_scales": scales, "cpu": cpu_model(),
                         "samples": {k: [{key: s[key] for key in KEYS} for s in ss]
                                     for k, ss in samples.items()}})
            ratio = rows[-1]["ratio"]
            arrivals = "" if request_rate is None else f" Poisson {request_rate:g}/s"
            arrivals += "" if hold_ms is None else f" hold<={hold_ms:g}ms"
            print(f"{name:<9} c={c:<3}{arrivals} tok/s {stock['output_throughput']:7.1f} -> "
                  f"{ours['output_throughput']:7.1f} (x{ratio['output_throughput']:.2f})  "
                  f"p50 TPOT x{ratio['median_tpot_ms']:.2f}  p99 TTFT x{ratio['p99_ttft_ms']:.2f}  "
                  f"held {decided['requests_held']:.0f} req, prompt steps "
                  f"{decided['prompt_steps']:.0f}; prompt steps' extra traffic "
                  f"{ceilings['stock scheduling']['extra_share']:.0%} of stock's run "
                  f"(ceiling x{ceilings['stock scheduling']['tok_s_ceiling']:.2f})", flush=True)
            save()  # after every grid point: a run cut short keeps what it measured
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--request-rate", type=float, default=None,
                    help="open loop: Poisson arrivals at this many requests per second "
                         "(default: closed loop, a request starts when one ends)")
    ap.add_argument("--max-prompt-hold-ms", type=float, default=None,
                    help="the expert-aware server's max_prompt_hold_ms (default: its default)")
    ap.add_argument("--out", default="benchmarks/results/scheduling.json")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows --out already has for grid points not rerun (noted per row)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adapmoe-scheduling-"))
    out = Path(args.out)
    rows: list[dict] = []
    if args.append and out.exists():
        before = json.loads(out.read_text())
        rows = [{"rounds": before["rounds"], **r} for r in before["rows"]
                if r["model"] not in args.models or r["concurrency"] not in args.concurrency
                or r.get("request_rate") != args.request_rate
                or r.get("max_prompt_hold_ms") != args.max_prompt_hold_ms]
    result = {"rounds": args.rounds, "load": "vllm bench serve, random 128 in / 64 out "
              "(each 0.5x-1.5x: --random-range-ratio 0.5), ignore_eos, max-concurrency C, 4C "
              "prompts (>= 8)", "compiled": True,
              "emulated": "emulated h100-pcie4 (except the resident rows)", "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    for name in args.models:
        run_model(name, args.concurrency, args.rounds, work, rows, save, args.request_rate,
                  args.max_prompt_hold_ms)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
