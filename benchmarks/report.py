"""Render benchmarks/results/*.json as the README's results section.

    python benchmarks/report.py            # print markdown
    python benchmarks/report.py --readme   # replace the block between the results markers in README.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(v, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def decode_section(data: dict) -> list[str]:
    link = data.get("link_gbps_emulated")
    baseline = data.get("baseline", "stock vLLM with enforce_eager (older run)")
    out = [f"**Decode throughput** (`benchmarks/bench_decode.py`, {data['rounds']} alternating rounds, "
           f"medians; {data['new_tokens']} new tokens; \"vs stock\" = {baseline}; rows marked eager use "
           "`enforce_eager=True`; emulated link "
           f"{'%.4f GB/s (one expert load ≈ 10 decode layers)' % link if link else 'off'}; "
           "\"vs LRU\" = the same batch's uniform-LRU row at the same budget and link):", "",
           "| batch | config | decode tok/s | vs stock | vs all-resident | vs LRU | hit rate | misses / decoded token | loads / decoded token | slots |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lru = _lru_row(data["rows"], r)
        vs_lru = r["decode_tok_s"] / lru["decode_tok_s"] if lru else None
        out.append(f"| {r['batch']} | {r['config']} | {r['decode_tok_s']:.1f} | {r['vs_stock']:.2f} | "
                   f"{r['vs_all_resident']:.2f} | {_fmt(vs_lru)} | {_fmt(r.get('hit_rate'), '.3f')} | "
                   f"{_fmt(r.get('misses_per_decoded_token'))} | {_fmt(r.get('loads_per_decoded_token'))} | "
                   f"{r.get('slots', '–')} |")
    return out


def _lru_row(rows: list[dict], row: dict) -> dict | None:
    """The uniform-LRU row at ``row``'s batch, budget and link (None for stock / all resident)."""
    budget = re.search(r"\d+%", row["config"])
    if budget is None or row["config"] == "100%" or "eager" in row["config"]:
        return None
    link = "emulated-link" in row["config"]
    return next((r for r in rows if r["batch"] == row["batch"]
                 and r["config"].startswith(f"LRU {budget.group()}")
                 and ("emulated-link" in r["config"]) == link), None)


def policies_section(data: dict, title: str) -> list[str]:
    out = [f"**{title}** (`benchmarks/bench_policies.py --trace {Path(data['trace']).name}`; summed "
           "over layers, pure-decode steps):", "",
           "| budget | config | on-demand misses / decoded token | loads / decoded token | hit rate | slots |",
           "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['budget']:.0%} | {r['config']} | {r['misses_per_decoded_token']:.3f} | "
                   f"{r['loads_per_decoded_token']:.3f} | {r['hit_rate']:.3f} | {r['slots']} |")
    return out


def gating_section(data: dict, title: str = "Adaptive gating") -> list[str]:
    model = Path(data["model"]).name
    out = [f"**{title}** (`benchmarks/sweep_threshold.py`, model `{model}`, {data['tokens']} held-out "
           "tokens, every token gated):", "",
           "| rule | T | w2 threshold | perplexity | Δ ppl | experts / token / layer | Δ experts | top-1 share |",
           "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['rule']} | {r['threshold']:.4g} | {_fmt(r.get('w2_threshold'), '.2f')} | "
                   f"{r['ppl']:.3f} | {r['ppl_increase']:+.2%} | {r['activated_per_token_layer']:.3f} | "
                   f"{-r['activated_reduction']:+.1%} | {r['top1_fraction']:.1%} |")
    return out


def parallel_section(data: dict) -> list[str]:
    out = [f"**Tensor parallel on this CPU** (`benchmarks/bench_parallel.py`, model "
           f"`{Path(data['model']).name}`, compiled, {data['rounds']} alternating rounds, medians; "
           "adapmoe slots are per layer per rank):", "",
           "| batch | layout | engine | decode tok/s | vs TP=1 (default binding) |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        engine = r["impl"] if r["slots"] is None else f"{r['impl']}, {r['slots']} slots"
        out.append(f"| {r['batch']} | {r['layout']} | {engine} | {r['decode_tok_s']:.1f} | "
                   f"{r['vs_tp1_default']:.2f} |")
    return out


def layer_section(data: dict) -> list[str]:
    out = [f"**One MoE layer, {data['shape']}** (`benchmarks/bench_layer.py --shape {data['shape']}`: hidden "
           f"{data['hidden']}, intermediate {data['intermediate']}, {data['experts']} experts, top-{data['top_k']}, "
           f"bf16 random weights, routing replayed from `{data['trace']}`, every expert resident, "
           f"{data['rounds']} alternating rounds × {data['iters']} calls, medians; host = router top-k + "
           "gating + residency + prefetch; µs per call):", "",
           "| batch | config | µs | vs stock | mean µs | mean vs stock | host µs | host share | experts / token | phases (µs) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["results"]:
        for name, e in row["configs"].items():
            phases = ", ".join(f"{p} {v:.0f}" for p, v in e.get("phases_us", {}).items())
            out.append(f"| {row['batch']} | {name} | {e['median_us']:.0f} | {e['vs_stock']:.2f} | "
                       f"{_fmt(e.get('mean_us'), '.0f')} | {_fmt(e.get('vs_stock_mean'))} | "
                       f"{_fmt(e.get('host_us'), '.0f')} | {_fmt(e.get('host_share'), '.0%')} | "
                       f"{_fmt(e.get('experts_per_token'), '.3f')} | {phases or '–'} |")
    gated = [(row["batch"], e) for row in data["results"] for e in row["configs"].values()
             if "time_vs_ungated" in e]
    out += ["", "Gating (vs the same step ungated, with prefetch; mean time over the replayed steps): " + "; ".join(
        f"batch {b}: time ×{e['time_vs_ungated']:.2f} at activated experts ×{e['activated_ratio']:.2f}"
        for b, e in gated) + "."]
    return out


def prefill_section(data: dict) -> list[str]:
    out = [f"**Prompt steps** (`benchmarks/bench_prefill.py`: vLLM-free engine, {data['shape']} "
           f"shape, {data['layers']} MoE layers, {data['slots']} of {data['experts']} slots per "
           f"layer (top-{data['top_k']}; \"same memory\": the rows' memory as more own slots, "
           "no rows), seeded synthetic routing, a warm cache, then "
           f"{data['steps']} prompt steps per run; {data['rounds']} alternating rounds, medians, "
           f"one run; {data['link']}):", "",
           "| prompt tokens per step | setting | ms / prompt step | × no rows | loads / layer "
           "| loads / prompt token | waves / layer | tokens on host |",
           "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['tokens']} | {r['setting']} | {r['step_ms']:.1f} | {r['speedup']:.2f} "
                   f"| {r['loads_per_layer']:.1f} | {r['loads_per_prompt_token']:.3f} "
                   f"| {r['waves_per_layer']:.1f} | {r['host_token_share']:.2f} |")
    return out


def _served_clocks(data: dict) -> str:
    """Whether a served run's emulated servers shared one emulation clock, and where it ran."""
    scales = set((data.get("emulation_scales") or {}).values())
    if not scales:
        return "emulation clocks not recorded: each server measured its own"
    clocks = (f"one emulation clock, x{scales.pop():g}" if len(scales) == 1
              else "emulation clocks " + " / ".join(f"x{x:g}" for x in sorted(scales)))
    return f"{clocks}, {data['cpu']}" if data.get("cpu") else clocks


def prefill_serve_section(data: dict) -> list[str]:
    rows = next(k for k in data["configs"] if not k.startswith("no rows"))
    slots, experts = data.get("slots", 2), data.get("experts", 8)
    model_arg = data.get("model_arg", "mixtral")  # runs before --model: the Mixtral-shaped one
    flag = "" if model_arg == "mixtral" else f" --model {model_arg}"
    out = [f"**Served prompt steps** (`benchmarks/bench_prefill.py --serve{flag}`: {data['model']}, "
           f"{data['emulated']}, all servers compiled, stock scheduling: `{rows}` on {slots} of "
           f"{experts} slots per layer vs no rows at {slots} of {experts} and vs no rows with the "
           "rows' memory as own slots "
           f"(same memory); {data['load']}; {data['rounds']} alternating rounds, medians, one "
           f"run; {_served_clocks(data)}):", "",
           "| concurrency | vs | output tok/s → with rows | × | p50 TTFT × | p99 TTFT × "
           "| p50 TPOT × | p99 TPOT × |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        wide = r["medians"][rows]
        for name, x in r["rows_vs"].items():
            out.append(f"| {r['concurrency']} | {name} | {r['medians'][name]['output_throughput']:.1f}"
                       f" → {wide['output_throughput']:.1f} | {x['output_throughput']:.2f} "
                       f"| {x['median_ttft_ms']:.2f} | {x['p99_ttft_ms']:.2f} "
                       f"| {x['median_tpot_ms']:.2f} | {x['p99_tpot_ms']:.2f} |")
    return out


def engine_section(data: dict) -> list[str]:
    link = data["link"]
    emulated = f", emulated link {link['emulated_gbps']} GB/s" if link.get("emulated_gbps") else ""
    emu = data.get("emulation")
    if emu:
        p = emu["preset"]
        emulated = (f"; **{data['emulated']}** (link {p['link_gbps']:g} GB/s, device "
                    f"{p['device_gbps']:g} GB/s, host {p['host_gbps']:g} GB/s and "
                    f"{p['host_tflops']:g} TFLOP/s; scale x{emu['scale']:.0f} from one expert on "
                    f"the device here, {emu['device_expert_ms_here']:.3f} ms: a load "
                    f"{emu['load_ms']:.1f} ms, one expert on the host {emu['host_ms_1_token']:.2f} ms "
                    "for 1 token, all emulated)")
    rounds = data.get("rounds", 1)
    out = [f"**The vLLM-free engine on {data['device']}** (`benchmarks/bench_engine.py --device "
           f"{'cpu' if data['device'] == 'cpu' else 'cuda'} --shape {data['shape']}"
           f"{' --emulate ' + emu['preset']['name'] if emu else ''}`: {data['layers']} "
           f"MoE layers{_host_layers(data)}, residual stream only, bf16 random experts, "
           f"routing `{data['routing']}`, "
           f"gating T={data['threshold']}; one expert copy through the engine's link "
           f"{link['copy_ms']:.2f} ms = {link['measured_gbps']:.1f} GB/s measured{emulated}; "
           + (f"{rounds} alternating rounds, medians, one run):" if rounds > 1 else "one run):")]
    for batch, b in data["batches"].items():
        split = (f"; hybrid AdapMoE's split: the DP over the "
                 + ("gated " if b.get("host_curves_gated") else "")
                 + f"host curves of {b['host_curves_from']}" if b.get("host_curves_from") else "")
        replay = b.get("time_replay")
        replayed = (f"; simulator time replay (kernel call {replay['call_ms']:.3f} ms + "
                    f"{replay['expert_ms']:.3f} ms per expert + {replay['pair_ms']:.4f} ms per "
                    f"token-expert pair, a copy {replay['load_ms']:.3f} ms"
                    + (f", a call on part of the step's tokens {replay['subset_ms']:.3f} ms more"
                       if replay.get("subset_ms") else "")
                    + ", measured; a layer's "
                    "overhead fitted on all-resident runs with the row's features: "
                    + ", ".join(f"{k} {v:.3f} ms" for k, v in replay["layer_overhead_ms"].items())
                    + (f"; a host call's own overhead {replay['host_call_ms']:.3f} ms, fitted on "
                       "a run with every expert on the host" if replay.get("host_call_ms") else "")
                    + (f"; a load's engine overhead beyond its copy {replay['load_overhead_ms']:.3f}"
                       " ms, fitted on a separate run of layer streaming's setting (so that row "
                       "checks little)" if "load_overhead_ms" in replay else "")
                    + ("; the replay's own planner time added" if "subset_ms" in replay else "")
                    + "): replayed tok/s ÷ measured" if replay else "")
        measured = f"{b['steps']} measured decode steps per row; " if b.get("steps") else ""
        out += ["", f"batch {batch}: {measured}layer compute {b['layer_compute_ms']:.3f} ms; one expert load ≈ "
                f"{b['load_in_layers']:.1f} layers{split}{replayed}{_whole_token_bound(b, data)}", "",
                "| setting | tok/s | × all resident | × uniform LRU | × host-only | loads / token | "
                "hit rate | experts / token·layer | tokens on host | promotions / token |"
                + (" replayed ÷ measured |" if replay else ""),
                "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if replay else "")]
        label = " (emulated)" if emu else ""
        for name, r in b["settings"].items():
            out.append(f"| {name}{label} | {r['tok_s']:.1f} | {r['vs_resident']:.2f} | "
                       f"{_fmt(r.get('vs_uniform_lru'))} | {_fmt(r.get('vs_host_only'))} | "
                       f"{r['loads_per_token']:.2f} | {r['hit_rate']:.2f} | "
                       f"{r['activated_per_token_layer']:.2f} | {_fmt(r.get('host_token_share'))} | "
                       f"{_fmt(r.get('promotions_per_token'))} |"
                       + (f" {_fmt(r.get('predicted_vs_measured'))} |" if replay else ""))
    return out


def _best_split(curves: list[list[float]], total: int) -> float:
    """min over own slots per layer summing to ``total`` (staging rows free) of sum_l h_l(s_l):
    the engine's DP, with h indexed from 0 slots as ``plan_hybrid`` does."""
    from vllm_adapmoe.engine.cache_plan import plan_dp

    slots = [k - 1 for k in plan_dp(curves, total + len(curves), lo=1)]
    return sum(curve[s] for curve, s in zip(curves, slots))


def _host_layers(data: dict) -> str:
    """Where the run tiled fewer layers of host experts over its stack (``--host-layers``)."""
    n = data.get("host_layers", data["layers"])
    return (f" (the host experts of {n} distinct layers tiled over them, to fit host memory)"
            if n < data["layers"] else "")


def _whole_token_bound(b: dict, data: dict) -> str:
    """What any split of a budget into own slots can save in host work over the even split,
    from the batch's host curves (host experts per decoded token at 0..E own slots, ungated):
    a token runs whole on the host when any of its experts is cold, so where the host's reads
    set the pace (emulated rows) placement alone gains at most this over host-only."""
    curves = b.get("host_curves")
    if not curves or not data.get("emulation"):
        return ""
    gated = b.get("host_curves_gated")
    layers, experts = len(curves), len(curves[0]) - 1
    parts, gated_parts = [], []
    for pct in (50, 25):
        total = layers * experts * pct // 100
        even = sum(c[min(total // layers, experts)] for c in curves)
        parts.append(f"{pct}%: {even / _best_split(curves, total):.2f}×")
        if gated:
            gated_parts.append(f"{pct}%: {even / _best_split(gated, total):.2f}×")
    return ("; whole-token bound, ungated (host work of the even split ÷ that of the best "
            "split of the budget, from the host curves: what placement alone can gain over "
            "host-only where the host's reads set the pace; gating gains beyond it): "
            + ", ".join(parts)
            + (f"; with the AdapMoE rows' gating (T = {data['threshold']}; the even split "
               "ungated, as host-only runs; the best split of the gated curves): "
               + ", ".join(gated_parts) if gated_parts else ""))


def serve_section(data: dict) -> list[str]:
    out = ["**Serving** (`benchmarks/bench_serve.py`, OpenAI /v1/completions, alternating servers"
           f"{'; ' + data['note'] if data.get('note') else ''}):", "",
           "| concurrency | config | output tok/s | vs stock | mean latency (s) |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['concurrency']} | {r['config']} | {r['tok_s']:.1f} | {r['vs_stock']:.2f} | "
                   f"{r['mean_latency_s']:.2f} |")
    return out


def _rounds(data: dict) -> str:
    """The rounds behind a result's rows (rows appended from an earlier run keep theirs)."""
    per_row = sorted({r.get("rounds", data["rounds"]) for r in data["rows"]})
    if len(per_row) == 1:
        return str(per_row[0])
    return " or ".join(str(n) for n in per_row) + " (per row: the column rounds)"


def _clocks(row: dict) -> str:
    """The two servers' emulation scales (one clock when pinned), and the CPU where recorded."""
    if not row["settings"].get("emulate"):
        return "—"
    scales = row.get("emulation_scales")
    if not scales:
        return "not recorded"
    stock, ours = scales["stock scheduling"], scales["expert-aware"]
    clocks = f"x{stock:g}, one clock" if stock == ours else f"x{stock:g} / x{ours:g}"
    return f"{clocks}; {row['cpu']}" if row.get("cpu") else clocks


def _arrivals(row: dict) -> str:
    """A scheduling row's load: its concurrency, its arrival rate where arrivals were open, and
    the expert-aware server's hold bound where it was set."""
    label = str(row["concurrency"])
    if row.get("request_rate") is not None:
        label += f", Poisson arrivals {row['request_rate']:g}/s"
    if row.get("max_prompt_hold_ms") is not None:
        label += f", expert-aware holds ≤ {row['max_prompt_hold_ms']:g} ms"
    return label


def _ceiling(row: dict) -> str:
    """The most any prompt scheduling could give this row's stock server (output tok/s, as if
    its prompt steps cost a decode step's expert traffic) and those steps' extra share of the run."""
    c = row.get("prompt_step_ceiling", {}).get("stock scheduling")
    return "not recorded" if c is None else f"{c['tok_s_ceiling']:.2f} ({c['extra_share']:.0%})"


def scheduling_section(data: dict) -> list[str]:
    out = ["**Expert-aware scheduling** (`benchmarks/bench_scheduling.py`: stock scheduling vs "
           '`"scheduling": "expert-aware"`, both servers compiled, '
           f"{data['load']}; {_rounds(data)} alternating rounds, medians, one run; "
           f"{data['emulated']}):", "",
           "| model | budget | concurrency | output tok/s stock → expert-aware | × | p50 TPOT × | "
           "p99 TPOT × | p50 TTFT × | p99 TTFT × | held (requests / steps) | prompt steps | "
           "tokens per prompt step | ceiling × (prompt steps' extra traffic) | rounds | "
           "emulation clocks |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = ["mixtral", "qwen3moe", "resident", "mixtral+ngram", "mixtral+rows", "qwen3moe+rows",
             "mixtral+hybrid", "qwen3moe+hybrid"]
    rows = sorted(data["rows"], key=lambda r: (order.index(r["model"]) if r["model"] in order
                                               else len(order), r.get("request_rate") is not None,
                                               r["concurrency"],
                                               -(r.get("max_prompt_hold_ms") or 1e9)))
    for r in rows:
        s, e, x, d = r["stock"], r["expert_aware"], r["ratio"], r["scheduler"]
        budget = (f"{r['settings']['cache_slots']} slots/layer, emulated h100-pcie4"
                  if r["settings"] else "all resident")
        per = (f"{d['prompt_tokens'] / d['prompt_steps']:.0f}"
               if d.get("prompt_tokens") is not None and d["prompt_steps"] else "—")
        held_steps = "—" if d.get("held_steps") is None else f"{d['held_steps']:.0f}"
        model = r["model"].replace("+ngram", " + n-gram speculation (3 tokens)").replace(
            "+rows", f" + {r['settings'].get('prefill_rows')} prefill rows (both servers)").replace(
            "+hybrid", ' + hybrid "auto" (both servers)')
        out.append(f"| {model} | {budget} | {_arrivals(r)} | "
                   f"{s['output_throughput']:.1f} → {e['output_throughput']:.1f} | "
                   f"{x['output_throughput']:.2f} | {x['median_tpot_ms']:.2f} | "
                   f"{x['p99_tpot_ms']:.2f} | {x['median_ttft_ms']:.2f} | {x['p99_ttft_ms']:.2f} | "
                   f"{d['requests_held']:.0f} / {held_steps} | {d['prompt_steps']:.0f} | {per} | "
                   f"{_ceiling(r)} | {r.get('rounds', data['rounds'])} | {_clocks(r)} |")
    out += ["", "Ceiling ×: the output tok/s the stock server's run would reach if its prompt "
            "steps had cost no more expert traffic (stall + host time) than a decode step, "
            "measured over the same rounds; in brackets that extra traffic's share of the run. "
            "No admission policy can exceed it: merging prompt steps saves their shared part "
            "only. With `hybrid` the host computes beside the link and stall + host time can "
            "exceed the wall time it took, so those ceilings are looser still."]
    if any(r.get("recovered") for r in data["rows"]):
        out += ["", "Rows without held steps or tokens per prompt step: "
                + next(r["recovered"] for r in data["rows"] if r.get("recovered")) + "."]
    notes: dict[tuple[str, str], list[str]] = {}  # (model, note) → concurrencies
    for r in rows:
        for note in (r.get("earlier"), r.get("note")):  # from an earlier run; about this one
            if note:
                notes.setdefault((r["model"], note), []).append(_arrivals(r))
    for (model, note), cs in notes.items():
        out += ["", f"{model} at concurrency {' / '.join(cs)}: {note}."]
    return out


def hybrid_served_section(data: dict) -> list[str]:
    """Served with and without ``hybrid`` under stock scheduling: the stock-scheduling servers of
    the scheduling grid's ``<model>`` and ``<model>+hybrid`` points, closed loop (separate runs,
    so each row gives both clocks)."""
    closed = {(r["model"], r["concurrency"]): r for r in data["rows"]
              if r.get("request_rate") is None and r.get("max_prompt_hold_ms") is None}
    out = ["**Served with and without `hybrid`** (the stock-scheduling servers of the grid above, "
           "both compiled, 25% of the experts in slots, emulated h100-pcie4, closed loop; the two "
           "columns come from separate runs, so their clocks differ — the last column gives both):",
           "", "| model | concurrency | output tok/s load on miss → hybrid \"auto\" | × | "
           "p50 TPOT × | p50 TTFT × | p99 TTFT × | clocks (load on miss / hybrid) |",
           "|---|---|---|---|---|---|---|---|"]
    left_out: list[str] = []
    for (model, c), base in sorted(closed.items()):
        hybrid = closed.get((model + "+hybrid", c))
        if "+" in model or hybrid is None or not base.get("emulation_scales"):
            continue
        s, h = base["stock"], hybrid["stock"]
        x_base = base["emulation_scales"]["stock scheduling"]
        x_hybrid = hybrid["emulation_scales"]["stock scheduling"]
        clocks = f"x{x_base:g} / x{x_hybrid:g}"
        if max(x_base, x_hybrid) > 1.05 * min(x_base, x_hybrid):  # not comparable
            left_out.append(f"{model} at concurrency {c} ({clocks})")
            continue
        out.append(f"| {model} | {c} | {s['output_throughput']:.1f} → {h['output_throughput']:.1f} | "
                   f"{h['output_throughput'] / s['output_throughput']:.2f} | "
                   f"{h['median_tpot_ms'] / s['median_tpot_ms']:.2f} | "
                   f"{h['median_ttft_ms'] / s['median_ttft_ms']:.2f} | "
                   f"{h['p99_ttft_ms'] / s['p99_ttft_ms']:.2f} | {clocks} |")
    if len(out) == 4:
        return []
    if left_out:
        out += ["", "Left out, their clocks more than 5% apart: " + "; ".join(left_out) + "."]
    return out


def parity_section(data: dict) -> list[str]:
    out = [f"**Parity, every expert resident** (`benchmarks/bench_parity.py`, {data['model']}; "
           f"{data['baseline']}; {data['rounds']} alternating rounds, medians, one run"
           f"{'; ' + data['note'] if data.get('note') else ''}):", "",
           "| where | load | stock | adapmoe 100% | adapmoe / stock |", "|---|---|---|---|---|"]
    rows = {(r["batch"], r["config"]): r for r in data["offline"]}
    for batch in sorted({b for b, _ in rows}):
        s, a = rows[batch, "stock"], rows[batch, "adapmoe 100%"]
        out.append(f"| offline `LLM.generate` | batch {batch} | {s['decode_tok_s']:.1f} tok/s | "
                   f"{a['decode_tok_s']:.1f} tok/s | {a['vs_stock']:.3f} |")
    serve = {(r["concurrency"], r["config"]): r for r in data.get("serve", [])}
    for c in sorted({c for c, _ in serve}):
        s, a = serve[c, "stock"], serve[c, "adapmoe 100%"]
        out.append(f"| `vllm bench serve` (random 128 in / 64 out) | concurrency {c} | "
                   f"{s['output_throughput']:.1f} tok/s, TPOT {s['median_tpot_ms']:.2f} ms | "
                   f"{a['output_throughput']:.1f} tok/s, TPOT {a['median_tpot_ms']:.2f} ms | "
                   f"{a['vs_stock']:.3f} (TPOT ×{a['tpot_vs_stock']:.3f}) |")
    return out


def soak_section(runs: list[dict]) -> list[str]:
    """``benchmarks/soak.py`` results, one row per server (and the soak phase where run)."""
    first = runs[0]
    out = [f"**Load and soak through the OpenAI server** (`benchmarks/soak.py`, bundled model, "
           f"{first['load']['completed'] + first['load']['aborted'] + first['load']['n_errors']} "
           f"streamed requests with {first['concurrency']} in flight, "
           f"{first['distinct_prompts']['long']} of the {sum(first['distinct_prompts'].values())} "
           f"distinct prompts long (about 200–350 tokens; prefill chunked at "
           f"`--max-num-batched-tokens {first['max_num_batched_tokens']}`), {first['max_tokens']} "
           "greedy tokens, about a tenth closed mid-stream; "
           f"{'eager' if first['eager'] else 'default flags (compiled)'}; one run):", "",
           "| server | completed | aborted | errors | short | drift from serial | wall (s) |",
           "|---|---|---|---|---|---|---|"]
    for r in runs:
        name = "stock" if r["impl"] == "stock" else "adapmoe " + ", ".join(
            f"{k}={v}" for k, v in r["settings"].items() if k != "profile")
        ld = r["load"]
        out.append(f"| {name} | {ld['completed']} | {ld['aborted']} | {ld['n_errors']} | "
                   f"{ld['short']} | {ld['drift']} of {ld['completed']} | {ld['wall_s']:.0f} |")
    for r in runs:
        sk = r.get("soak")
        if sk:
            out += ["", f"Soak ({r['impl']}): {sk['completed'] + sk['aborted'] + sk['n_errors']} more "
                    f"requests, {sk['n_errors']} errors, {sk['short']} short, drift {sk['drift']} of "
                    f"{sk['completed']}; server RSS (API server + engine core + workers) "
                    f"{sk['rss_after_warmup_mib']:.0f} MiB after the first tenth, growth to the end "
                    f"{sk['rss_growth_mib']:+.0f} MiB (peak {sk['rss_peak_growth_mib']:+.0f} MiB), "
                    f"{sk['wall_s']:.0f} s."]
    return out


def quantized_section(data: dict) -> list[str]:
    q, b = data["heldout"], data["expert_bytes"]
    fmts = [f for f in ("fp8", "int4") if f in b]
    sizes = "; ".join(f"{f.upper()} {b[f]} = **{b[f] / b['bf16']:.3f}×**" for f in fmts)
    ppl = ", ".join(f"{f.upper()} {q[f]['ppl']:.3f} ({100 * (q[f]['ppl'] / q['bf16']['ppl'] - 1):+.2f}%)"
                    for f in fmts)
    out = [f"**Quantized experts vs bf16** (`benchmarks/bench_quantized.py`, bundled model "
           f"quantized by `adapmoe quantize`, compiled, {data['rounds']} alternating rounds, "
           f"medians; bytes per expert, scales included: bf16 {b['bf16']}; {sizes}; held-out "
           f"perplexity bf16 {q['bf16']['ppl']:.3f}, {ppl}; budgets: `cache_gib` "
           f"{data['cache_gib']:.4f} = {data['budget']:.0%} of the bf16 experts for every format; "
           f"**emulated link** {data['link_gbps_emulated']:.4f} GB/s (one bf16 expert load ≈ "
           f"{data['link_layers']:g} decode layers); quantized experts computed by the engine's "
           "dequantizing kernel, bf16 by vLLM's `cpu_fused_moe`):", "",
           "| batch | config | decode tok/s | vs bf16, same setting | slots | hit rate | bytes / decoded token | experts / token / layer |",
           "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['batch']} | {r['config']} | {r['decode_tok_s']:.1f} | "
                   f"{r['vs_bf16_same_setting']:.2f} | {r['slots_total']} | {r['hit_rate']:.3f} | "
                   f"{r['bytes_per_decoded_token']:.0f} | {r['activated_per_token_layer']:.2f} |")
    return out


def gating_families_section(data: dict) -> list[str]:
    out = [f"**Gating on the newer families' tiny random checkpoints** (`benchmarks/gating_families.py`: "
           f"calibrated, then {data['tokens']} held-out tokens scored at each T, every token gated; "
           "random models, so perplexity barely moves — the rows show gating drops experts on these "
           "routers; a trained model's trade-off is under \"Adaptive gating\"):", "",
           "| family | S_l | " + " | ".join(f"T = {t:g}" for t in data["thresholds"]) + " |",
           "|---|---|" + "---|" * len(data["thresholds"])]
    for name, fam in data["families"].items():
        base = fam["rows"][0]["ppl"]
        cells = [f"{r['activated_per_token_layer']:.2f} experts, ppl {100 * (r['ppl'] / base - 1):+.2f}%"
                 for r in fam["rows"]]
        out.append(f"| {name} | {', '.join(f'{x:.3g}' for x in fam['sensitivity'])} | "
                   + " | ".join(cells) + " |")
    return out


def render() -> str:
    parts: list[list[str]] = []
    for name, fn in (("parity.json", parity_section), ("decode.json", decode_section), ("decode_link_50.json", decode_section),
                     ("decode_link_25.json", decode_section), ("gating_sweep.json", gating_section),
                     ("serve.json", serve_section), ("parallel.json", parallel_section),
                     ("quantized_cpu.json", quantized_section),
                     ("gating_families.json", gating_families_section)):
        data = _load(name)
        if data:
            parts.append(fn(data))
    data = _load("scheduling.json")
    if data:
        parts.append(scheduling_section(data))
        served = hybrid_served_section(data)
        if served:
            parts.append(served)
    soaks = [d for d in (_load("soak_stock.json"), _load("soak_adapmoe.json"),
                         _load("soak_adapmoe_nogating.json")) if d]
    if soaks:
        parts.append(soak_section(soaks))
    data = _load("gating_sweep_qwen3moe.json")
    if data:
        parts.append(gating_section(data, "Adaptive gating, fine-grained model (64 experts, top-8)"))
    for name in ("engine_cuda.json", "engine_cpu_h100-pcie4.json", "engine_cpu_mixtral-8x7b_h100-pcie4.json",
                 "engine_cpu_mixtral-8x7b_b16_h100-pcie4.json",
                 "engine_cpu_free_hybrid.json", "engine_cpu_mixtral-8x7b.json", "engine_cpu.json"):
        data = _load(name)
        if data:
            parts.append(engine_section(data))
    for name in ("prefill_cpu_bundled_h100-pcie4.json", "prefill_cpu_bundled.json"):
        data = _load(name)
        if data:
            parts.append(prefill_section(data))
    for name in ("prefill_serve.json", "prefill_serve_qwen3moe.json"):
        data = _load(name)
        if data:
            parts.append(prefill_serve_section(data))
    if not _load("engine_cuda.json"):
        parts.append(["**CUDA: not run.** `benchmarks/results/engine_cuda.json` is missing: no GPU "
                      "was available to the sessions so far (run `python benchmarks/bench_engine.py "
                      "--device cuda --shape mixtral-8x7b` on one)."])
    for name in ("layer_mixtral-8x7b.json", "layer_bundled.json"):
        data = _load(name)
        if data:
            parts.append(layer_section(data))
    fine = "fine-grained model (`shakespeare_qwen3moe`: 64 experts, top-8)"
    for name, title in (("policies_b1.json", "Cache policies, batch-1 trace"),
                        ("policies_b16.json", "Cache policies, batch-16 trace"),
                        ("policies_qwen3moe_b1.json", f"Cache policies, {fine}, batch-1 trace"),
                        ("policies_qwen3moe_b16.json", f"Cache policies, {fine}, batch-16 trace")):
        data = _load(name)
        if data:
            parts.append(policies_section(data, title))
    return "\n\n".join("\n".join(p) for p in parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    text = render()
    if not args.readme:
        print(text)
        return
    readme = ROOT / "README.md"
    body = readme.read_text()
    if START not in body:
        raise SystemExit(f"README.md has no {START} … {END} block")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    print("README.md results updated")


if __name__ == "__main__":
    main()
