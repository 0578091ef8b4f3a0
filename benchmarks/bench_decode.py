"""Decode throughput and expert traffic: stock vLLM vs adapmoe budgets, alternating in one run.

For each batch size, every configuration generates the same greedy batch; rounds alternate the
configurations (A B C A B C ...) so machine noise hits all alike; medians are reported.
Decode tokens/s = batch × (N−1) / (t(N new tokens) − t(1 new token)), i.e. prefill removed.

Link emulation (`--link`): the emulated host→device bandwidth is derived from this machine's own
all-resident batch-1 decode so that one expert load costs about `--link-layers` (10) layers of
decode compute; results taken with it are labelled "emulated".

    python benchmarks/bench_decode.py [--model DIR] [--batches 1 16] [--budgets 1.0 0.5 0.25]
                                      [--link] [--rounds 3] [--out benchmarks/results/decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def make_prompts(model: str, n: int) -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "vllm_adapmoe" / "bundled" / "heldout.txt").read_text()
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    return [lines[(i * 37) % len(lines)] for i in range(n)]


def timed(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0


def decode_rate(llm, prompts, new_tokens: int) -> float:
    t_full = timed(llm, prompts, new_tokens)
    t_prefill = timed(llm, prompts, 1)
    return len(prompts) * (new_tokens - 1) / max(t_full - t_prefill, 1e-9)


def main() -> None:
    import vllm_adapmoe
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=vllm_adapmoe.bundled_model_path())
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25],
                    help="fraction of each layer's experts held on device")
    ap.add_argument("--link", action="store_true", help="also run with an emulated slow link")
    ap.add_argument("--link-layers", type=float, default=10.0)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eviction", default="lru")
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    args = ap.parse_args()

    cfg = json.loads((Path(args.model) / "config.json").read_text())
    E, L = cfg["num_local_experts"], cfg["num_hidden_layers"]
    common = dict(model=args.model, enforce_eager=True, max_model_len=1024, seed=0,
                  max_num_seqs=max(args.batches))
    engines = {"stock": LLM(**common)}

    def adapmoe_engine(budget: float, link: float | None):
        settings = {"cache_slots": max(1, round(E * budget)), "eviction": args.eviction}
        if link:
            settings["link_gbps"] = link
        return LLM(**common, model_impl="adapmoe", additional_config={"adapmoe": settings})

    for b in args.budgets:
        engines[f"adapmoe {b:.0%}"] = adapmoe_engine(b, None)
    prompts_by_batch = {b: make_prompts(args.model, b) for b in args.batches}

    link_gbps = None
    if args.link:
        ref = engines[f"adapmoe {1.0:.0%}"] if 1.0 in args.budgets else engines["stock"]
        rate = statistics.median(decode_rate(ref, prompts_by_batch[1][:1], args.new_tokens)
                                 for _ in range(3))
        layer_s = 1.0 / rate / L
        expert_bytes = vllm_adapmoe.stats(engines[f"adapmoe {args.budgets[0]:.0%}"])["layers"][0]["expert_bytes"]
        link_gbps = expert_bytes / (args.link_layers * layer_s) / 1e9
        print(f"decode layer time {layer_s * 1e3:.3f} ms; expert {expert_bytes} B; "
              f"emulated link {link_gbps:.4f} GB/s (1 load ≈ {args.link_layers:g} layers)")
        for b in args.budgets:
            if b < 1.0:
                engines[f"adapmoe {b:.0%} emulated-link"] = adapmoe_engine(b, link_gbps)

    rows = []
    for batch, prompts in prompts_by_batch.items():
        rates: dict[str, list[float]] = {name: [] for name in engines}
        traffic: dict[str, dict] = {}
        for name, llm in engines.items():  # warm-up round (fills caches, JIT, allocator)
            decode_rate(llm, prompts, 8)
        for _ in range(args.rounds):
            for name, llm in engines.items():
                if name != "stock":
                    vllm_adapmoe.reset_stats(llm)
                rates[name].append(decode_rate(llm, prompts, args.new_tokens))
                if name != "stock":
                    traffic[name] = vllm_adapmoe.stats(llm)
        stock = statistics.median(rates["stock"])
        resident = statistics.median(rates.get(f"adapmoe {1.0:.0%}", rates["stock"]))
        for name, r in rates.items():
            med = statistics.median(r)
            row = {"batch": batch, "config": name, "decode_tok_s": med,
                   "vs_stock": med / stock, "vs_all_resident": med / resident, "samples": r}
            if name in traffic:
                t = traffic[name]["total"]
                decoded = traffic[name]["layers"][0]["decode_tokens"]
                row.update(slots_per_layer=traffic[name]["layers"][0]["slots"],
                           hit_rate=t["hit_rate"],
                           loads_per_decoded_token=t["loads"] / max(decoded, 1),
                           bytes_per_decoded_token=t["bytes_loaded"] / max(decoded, 1),
                           stall_s=t["stall_s"], decoded_tokens=decoded)
            rows.append(row)

    print(f"\n{'batch':>5} {'config':<28} {'tok/s':>8} {'vs stock':>8} {'vs 100%':>8} "
          f"{'hit rate':>8} {'loads/tok':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['config']:<28} {r['decode_tok_s']:>8.1f} {r['vs_stock']:>8.2f} "
              f"{r['vs_all_resident']:>8.2f} {r.get('hit_rate', float('nan')):>8.3f} "
              f"{r.get('loads_per_decoded_token', float('nan')):>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "experts_per_layer": E, "moe_layers": L,
                               "link_gbps_emulated": link_gbps, "new_tokens": args.new_tokens,
                               "rounds": args.rounds, "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
