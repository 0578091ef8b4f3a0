"""Parity with every expert resident, default flags: stock vLLM vs `--model-impl adapmoe`.

What a user feels when nothing is offloaded: the plugin's own cost. On a held-out Mixtral-shaped
model (seeded random weights, a shape no test or profile was made on), both compiled (vLLM's
default), alternating round by round, medians of `--rounds`:

* offline: `LLM.generate` decode tokens/s (prefill removed) at each of `--batches`;
* serving: two servers at once (`vllm serve`, default flags), driven by vLLM's own load generator,
  `vllm bench serve --dataset-name random` (128-token prompts, 64 out, `--ignore-eos`) at each of
  `--concurrency`: output tokens/s, median TPOT and TTFT.

    python benchmarks/bench_parity.py [--model DIR] [--rounds 5] [--batches 1 16]
        [--concurrency 1 16] [--out benchmarks/results/parity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny_model: the seeded checkpoint builder

# hidden 256, intermediate 512, 6 layers, 8 experts top-2; a seed no test uses
HELD_OUT = dict(seed=20261202, num_layers=6, hidden_size=256, intermediate_size=512)


def offline(model: str, batches: list[int], rounds: int, new_tokens: int) -> list[dict]:
    from bench_decode import decode_rate, make_prompts
    from vllm import LLM

    common = dict(model=model, max_model_len=512, seed=0, kv_cache_memory_bytes=256 * 2**20,
                  max_num_seqs=max(batches))
    engines = {"stock": LLM(**common), "adapmoe 100%": LLM(**common, model_impl="adapmoe")}
    rows = []
    try:
        for batch in batches:
            prompts = make_prompts(model, batch)
            for llm in engines.values():  # warm-up
                decode_rate(llm, prompts, 8)
            rates: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(rounds):
                for name, llm in engines.items():
                    rates[name].append(decode_rate(llm, prompts, new_tokens)[0])
            stock = statistics.median(rates["stock"])
            for name, r in rates.items():
                rows.append({"batch": batch, "config": name, "decode_tok_s": statistics.median(r),
                             "vs_stock": statistics.median(r) / stock, "samples": r})
                print(f"offline batch {batch:<3} {name:<14} {rows[-1]['decode_tok_s']:8.1f} tok/s "
                      f"x{rows[-1]['vs_stock']:.3f}", flush=True)
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
    return rows


def bench_serve(base: str, model: str, concurrency: int, prompts: int, out_dir: Path,
                seed: int, extra: tuple[str, ...] = ()) -> dict:
    """One `vllm bench serve` run against ``base`` (``extra``: more of its flags); its saved
    JSON result."""
    name = f"c{concurrency}_{seed}_{base.rsplit(':', 1)[1]}.json"
    cmd = [str(Path(sys.executable).with_name("vllm")), "bench", "serve", "--backend", "vllm",
           "--base-url", base, "--model", model, "--tokenizer", model, "--dataset-name", "random",
           "--random-input-len", "128", "--random-output-len", "64", "--ignore-eos",
           "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
           "--seed", str(seed), "--save-result", "--result-dir", str(out_dir),
           "--result-filename", name, "--disable-tqdm", *extra]
    # a slow emulated server takes seconds per request at concurrency 16 (one round of 64 prompts
    # passed 300 s once): the limit grows with the prompts
    limit = max(300, 10 * prompts)
    for attempt in range(2):  # the client itself once hung before sending anything: retry once
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            break
        except subprocess.TimeoutExpired:
            if attempt:
                raise
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads((out_dir / name).read_text())


def alternate(servers: dict[str, tuple], model: str, concurrency: int, prompts: int, rounds: int,
              out_dir: Path, extra: tuple[str, ...] = (),
              after_warmup: Callable[[], None] | None = None) -> dict[str, list[dict]]:
    """One warm-up run per server (the shapes this load brings; then ``after_warmup()``), then
    ``rounds`` rounds of one `vllm bench serve` run per server in turn; ``servers``: name →
    (process, base URL)."""
    for _, base in servers.values():
        bench_serve(base, model, concurrency, prompts, out_dir, seed=0, extra=extra)
    if after_warmup is not None:
        after_warmup()
    samples: dict[str, list[dict]] = {name: [] for name in servers}
    for r in range(rounds):
        for name, (_, base) in servers.items():
            samples[name].append(bench_serve(base, model, concurrency, prompts, out_dir,
                                             seed=r + 1, extra=extra))
    return samples


def serving(model: str, concurrency: list[int], rounds: int, logs: Path) -> list[dict]:
    from bench_serve import start, wait_ready

    servers = {"stock": start(model, None, logs / "stock.log", eager=False),
               "adapmoe 100%": start(model, {}, logs / "adapmoe.log", eager=False)}
    rows = []
    try:
        for name, (proc, base) in servers.items():
            wait_ready(proc, base, logs / ("stock.log" if name == "stock" else "adapmoe.log"))
        for c in concurrency:
            samples = alternate(servers, model, c, max(8, 4 * c), rounds, logs)
            med = {name: {k: statistics.median(s[k] for s in ss) for k in
                          ("output_throughput", "median_tpot_ms", "median_ttft_ms")}
                   for name, ss in samples.items()}
            for name, m in med.items():
                rows.append({"concurrency": c, "config": name, **m,
                             "vs_stock": m["output_throughput"] / med["stock"]["output_throughput"],
                             "tpot_vs_stock": m["median_tpot_ms"] / med["stock"]["median_tpot_ms"],
                             "samples": [{k: s[k] for k in ("output_throughput", "median_tpot_ms",
                                                            "median_ttft_ms")} for s in samples[name]]})
                print(f"serve c={c:<3} {name:<14} {m['output_throughput']:8.1f} tok/s "
                      f"x{rows[-1]['vs_stock']:.3f}  TPOT {m['median_tpot_ms']:.2f} ms  "
                      f"TTFT {m['median_ttft_ms']:.1f} ms", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=60)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: build the held-out Mixtral-shaped model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/parity.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="adapmoe-parity-"))
    model = args.model
    if model is None:
        from tiny_model import build_tiny_mixtral

        model = str(build_tiny_mixtral(work / "heldout_mixtral", **HELD_OUT))
    result = {"model": args.model or f"held-out random Mixtral {HELD_OUT}", "rounds": args.rounds,
              "baseline": "stock vLLM, default flags (compiled); adapmoe with every expert resident, "
                          "default flags",
              "offline": offline(model, args.batches, args.rounds, args.new_tokens)}
    if not args.skip_serve:
        result["serve"] = serving(model, args.concurrency, args.rounds, work)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
