"""Load and soak through the OpenAI server: streamed requests at high concurrency, long prompts
whose prefill is chunked over several steps, aborts mid-stream, and the server's memory over a
long run.

    python benchmarks/soak.py [--model DIR] [--impl adapmoe|stock] [--settings JSON]
        [--requests 1000] [--concurrency 1000] [--long 40] [--soak 10000]
        [--max-num-batched-tokens 64] [--eager] [--out benchmarks/results/soak_adapmoe.json]

Phases, on one server:
1. **serial**: each distinct prompt once, alone (greedy) — the reference outputs;
2. **load**: ``--requests`` streamed requests (every distinct prompt, then repeats) with
   ``--concurrency`` in flight, an ``--abort`` fraction closed mid-stream; *drift* = completed
   requests whose text differs from the serial one. vLLM is not batch-invariant (batch shape
   changes the rounding of its dense GEMMs), so stock drifts too: compare with ``--impl stock``;
3. **soak**: ``--soak`` more requests alike; the server's resident memory (the API server, engine
   core and workers together) sampled as it goes; growth is counted after the first tenth.

Every request that was not aborted must complete with ``--max-tokens`` tokens; any HTTP error
is counted and reported. Default settings: offloaded at half the experts, prefetch over a link
pinned at one layer's compute per load, and the bundled profile's gating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import start, wait_ready  # noqa: E402  (same launcher as the serving benchmark)

BUNDLED = Path(__file__).resolve().parents[1] / "vllm_adapmoe" / "bundled"
BUNDLED_MODEL = str(BUNDLED / "shakespeare_moe")
# link_layers: a load costs one layer's compute, so copies queue on the link's thread and
# prefetches are issued and cancelled as on a GPU (on a CPU an unpinned copy is inline)
DEFAULT_SETTINGS = {"cache_slots": 4, "prefetch": True, "link_layers": 1,
                    "profile": str(BUNDLED / "shakespeare_moe.profile.json"), "threshold": 0.013}


def make_prompts(text: str, short: int, long: int, seed: int = 0) -> list[str]:
    """``short`` prompts of 4–40 words and ``long`` ones of 120–170 words (about 200–350 tokens), cut from ``text``."""
    words = text.split()
    rng = random.Random(seed)

    def cut(lo: int, hi: int) -> str:
        n = rng.randint(lo, hi)
        at = rng.randrange(0, len(words) - n)
        return " ".join(words[at:at + n])
    return [cut(4, 40) for _ in range(short)] + [cut(120, 170) for _ in range(long)]


@dataclass
class Outcome:
    completed: int = 0
    aborted: int = 0
    errors: list[str] = field(default_factory=list)
    short: int = 0           # completed with fewer tokens than asked
    drift: int = 0           # completed, text differs from the serial reference
    tokens: int = 0
    wall_s: float = 0.0


async def stream_one(client: httpx.AsyncClient, base: str, model: str, prompt: str,
                     max_tokens: int, abort_after: int | None) -> tuple[str, int, bool]:
    """One streamed completion: (text, tokens, aborted). ``abort_after`` chunks: close it.
    Tokens come from the final usage chunk (a busy server merges several tokens into one chunk)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    text, chunks, tokens = [], 0, 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                text.append(chunk["choices"][0]["text"])
                chunks += 1
            if abort_after is not None and chunks >= abort_after:
                return "".join(text), chunks, True  # leaving the block closes the stream
    return "".join(text), tokens, False


async def run_load(base: str, model: str, prompts: list[str], reference: dict[str, str] | None,
                   concurrency: int, max_tokens: int, abort: float, seed: int,
                   on_done=None) -> Outcome:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    out = Outcome()
    # a fresh connection per request: a pooled one the server is just closing (uvicorn's 5 s
    # keep-alive) fails as a ReadError that is the client's race, not a failed request
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        async def one(prompt: str) -> None:
            # chunks before closing: few enough that the stream is still open then
            abort_after = rng.randint(1, max_tokens // 4) if rng.random() < abort else None
            async with sem:
                try:
                    text, tokens, aborted = await stream_one(client, base, model, prompt,
                                                             max_tokens, abort_after)
                except httpx.HTTPError as exc:
                    out.errors.append(f"{type(exc).__name__}: {exc}")
                    return
            if aborted:
                out.aborted += 1
            else:
                out.completed += 1
                out.tokens += tokens
                out.short += tokens < max_tokens
                out.drift += reference is not None and text != reference[prompt]
            if on_done is not None:
                on_done()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        out.wall_s = time.perf_counter() - t0
    return out


def serial(base: str, model: str, prompts: list[str], max_tokens: int) -> dict[str, str]:
    """Each distinct prompt alone: the outputs every loaded request is compared with."""
    ref = {}
    with httpx.Client(timeout=600) as client:
        for p in dict.fromkeys(prompts):
            r = client.post(f"{base}/v1/completions", json={
                "model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True})
            r.raise_for_status()
            ref[p] = r.json()["choices"][0]["text"]
    return ref


def server_rss(pid: int) -> int:
    """Resident bytes of the server and every process under it."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(base: str, pid: int, model: str, prompts: list[str], requests: int, concurrency: int,
        soak: int, max_tokens: int, abort: float, seed: int = 0) -> dict:
    reference = serial(base, model, prompts, max_tokens)
    order = [prompts[i % len(prompts)] for i in range(requests)]
    load = asyncio.run(run_load(base, model, order, reference, concurrency, max_tokens, abort, seed))
    result = {"serial_prompts": len(reference), "load": vars(load) | {"errors": load.errors[:5],
                                                                      "n_errors": len(load.errors)}}
    if soak:
        samples: list[tuple[int, float]] = [(0, server_rss(pid) / 2**20)]
        done = 0
        every = max(soak // 50, 1)

        def on_done() -> None:
            nonlocal done
            done += 1
            if done % every == 0:
                samples.append((done, server_rss(pid) / 2**20))
        rng = random.Random(seed + 1)
        order = [rng.choice(prompts) for _ in range(soak)]
        out = asyncio.run(run_load(base, model, order, reference, concurrency, max_tokens, abort,
                                   seed + 1, on_done))
        samples.append((soak, server_rss(pid) / 2**20))
        warm = next(mib for n, mib in samples if n >= soak // 10)
        result["soak"] = vars(out) | {"errors": out.errors[:5], "n_errors": len(out.errors),
                                      "rss_mib": samples, "rss_after_warmup_mib": warm,
                                      "rss_growth_mib": samples[-1][1] - warm,
                                      "rss_peak_growth_mib": max(m for n, m in samples
                                                                 if n >= soak // 10) - warm}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=BUNDLED_MODEL)
    ap.add_argument("--impl", choices=["adapmoe", "stock"], default="adapmoe")
    ap.add_argument("--settings", type=json.loads, default=DEFAULT_SETTINGS,
                    help="the adapmoe settings (JSON); default: half the experts, prefetch, gating")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--short", type=int, default=160, help="distinct short prompts")
    ap.add_argument("--long", type=int, default=40, help="distinct long prompts (chunked prefill)")
    ap.add_argument("--soak", type=int, default=0, help="requests in the soak phase (0: none)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--abort", type=float, default=0.1, help="fraction closed mid-stream")
    ap.add_argument("--max-num-batched-tokens", type=int, default=64)
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (default: compiled)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    text = (BUNDLED / "heldout.txt").read_text()
    prompts = make_prompts(text, args.short, args.long)
    log = Path(args.out or "soak").with_suffix(".log")
    settings = args.settings if args.impl == "adapmoe" else None
    proc, base = start(args.model, settings, log, eager=args.eager,
                       extra=["--max-num-batched-tokens", str(args.max_num_batched_tokens),
                              "--max-num-seqs", str(args.max_num_batched_tokens)])
    try:
        wait_ready(proc, base, log)
        t0 = time.perf_counter()
        result = run(base, proc.pid, args.model, prompts, args.requests, args.concurrency,
                     args.soak, args.max_tokens, args.abort)
        result |= {"impl": args.impl, "settings": settings, "eager": args.eager,
                   "max_num_batched_tokens": args.max_num_batched_tokens,
                   "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                   "distinct_prompts": {"short": args.short, "long": args.long},
                   "wall_s": time.perf_counter() - t0}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except Exception:
            proc.kill()
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
