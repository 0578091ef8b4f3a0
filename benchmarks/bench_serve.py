"""Serving benchmark: stock `vllm serve` vs `vllm serve --model-impl adapmoe` configurations,
OpenAI /v1/completions under concurrency 1 / 8 / 32, alternating servers round by round.

All servers run at once (different ports); each round sends, to each server in turn, N requests
with C in flight (greedy, ignore_eos). Reports median output tokens/s and mean request latency,
and the ratio to stock; writes JSON.

    python benchmarks/bench_serve.py [--model DIR] [--concurrency 1 8 32] [--rounds 3]
        [--configs '{"LRU 50%": {"cache_slots": 4}}'] [--out benchmarks/results/serve.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, settings: dict | None, log: Path, eager: bool = True,
          extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "512", "--seed", "0"]
    if eager:
        cmd.append("--enforce-eager")
    cmd += list(extra)
    if settings is not None:
        cmd += ["--model-impl", "adapmoe", "--additional-config", json.dumps({"adapmoe": settings})]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def emulation_scale(log: Path) -> float | None:
    """The scale an ``emulate`` server measured (or was pinned to) at start-up, from its log."""
    found = re.search(r"emulated [\w.-]+ \(x([0-9.]+):", log.read_text(errors="replace"))
    return float(found.group(1)) if found else None


def start_on_one_clock(model: str, configs: dict[str, dict | None], logs: dict[str, Path],
                       eager: bool = True, extra: list[str] = ()) -> dict[str, tuple]:
    """One server per configuration, started in turn, each ready before the next. Emulated ones
    share one emulation clock: the first measures its scale at start-up and the others are
    pinned to it (``emulate_scale``). Left to measure their own, two servers' scales -- one
    expert's device time, ~0.02 ms here -- came out 1.49x apart once, and their ratio with it."""
    servers: dict[str, tuple] = {}
    scale: float | None = None
    try:
        for name, settings in configs.items():
            emulated = settings is not None and "emulate" in settings
            if emulated and scale is not None and "emulate_scale" not in settings:
                settings = {**settings, "emulate_scale": scale}
            servers[name] = start(model, settings, logs[name], eager, extra)
            wait_ready(*servers[name], logs[name])
            if emulated and scale is None:
                scale = emulation_scale(logs[name])
                if scale is None:
                    raise RuntimeError(f"no emulation scale in {logs[name]}")
    except BaseException:
        for proc, _ in servers.values():
            proc.terminate()
        raise
    return servers


def wait_ready(proc: subprocess.Popen, base: str, log: Path) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("server did not start")


async def load(base: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async with httpx.AsyncClient(timeout=600) as client:
        async def one(prompt: str) -> None:
            nonlocal tokens
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(f"{base}/v1/completions", json={
                    "model": model, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0.0, "ignore_eos": True})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    return {"tok_s": tokens / wall, "mean_latency_s": statistics.mean(latencies)}


def main() -> None:
    import vllm_adapmoe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=vllm_adapmoe.bundled_model_path())
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--configs", default='{"100%": {}, "LRU 50%": {"cache_slots": 4}}',
                    help="adapmoe configurations by name (JSON); stock is always included")
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()

    text = (Path(vllm_adapmoe.__file__).parent / "bundled" / "heldout.txt").read_text()
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    configs = {"stock": None, **json.loads(args.configs)}
    logs = Path(args.out).with_suffix("")
    logs.mkdir(parents=True, exist_ok=True)
    servers = {name: start(args.model, cfg, logs / f"{name.replace(' ', '_').replace('%', 'pct')}.log")
               for name, cfg in configs.items()}
    try:
        for name, (proc, base) in servers.items():
            wait_ready(proc, base, logs / f"{name.replace(' ', '_').replace('%', 'pct')}.log")
        rows = []
        for c in args.concurrency:
            prompts = [lines[(i * 31) % len(lines)] for i in range(max(2 * c, 8))]
            samples: dict[str, list[dict]] = {n: [] for n in servers}
            for name, (_, base) in servers.items():  # warm-up
                asyncio.run(load(base, args.model, prompts[:c], c, 8))
            for _ in range(args.rounds):
                for name, (_, base) in servers.items():
                    samples[name].append(asyncio.run(load(base, args.model, prompts, c, args.max_tokens)))
            stock = statistics.median(s["tok_s"] for s in samples["stock"])
            for name, ss in samples.items():
                tok_s = statistics.median(s["tok_s"] for s in ss)
                rows.append({"concurrency": c, "config": name, "tok_s": tok_s, "vs_stock": tok_s / stock,
                             "mean_latency_s": statistics.median(s["mean_latency_s"] for s in ss),
                             "samples": ss})
                print(f"c={c:<3} {name:<24} {tok_s:8.1f} tok/s  x{tok_s / stock:.2f} vs stock  "
                      f"latency {rows[-1]['mean_latency_s']:.2f}s", flush=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "configs": configs, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
