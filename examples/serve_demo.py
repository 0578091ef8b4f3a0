"""Serve the bundled Shakespeare MoE with `vllm serve --model-impl adapmoe`, ask one completion.

Run through `bash scripts/demo.sh` (which installs first), or directly with the venv's python:
    python examples/serve_demo.py [--model DIR] [--settings JSON] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

import vllm_adapmoe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=vllm_adapmoe.bundled_model_path())
    ap.add_argument("--settings", default='{"cache_slots": 4}',
                    help='the "adapmoe" settings (JSON); default: 4 of 8 experts per layer on device')
    ap.add_argument("--prompt", default="ROMEO:\n")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", args.model,
           "--model-impl", "adapmoe", "--additional-config",
           json.dumps({"adapmoe": json.loads(args.settings)}),
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024"]
    print("$", " ".join(cmd[1:]), flush=True)
    server = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if server.poll() is not None:
                print(f"vllm serve exited with code {server.returncode}", file=sys.stderr)
                return 1
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        body = {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens,
                "temperature": 0.0}
        t0 = time.perf_counter()
        reply = requests.post(f"{base}/v1/completions", json=body, timeout=120).json()
        dt = time.perf_counter() - t0
        print("\n=== POST /v1/completions ===")
        print(args.prompt + reply["choices"][0]["text"])
        print(f"=== {reply['usage']['completion_tokens']} tokens in {dt:.2f}s ===")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
