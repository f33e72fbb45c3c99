#!/usr/bin/env python
"""Throughput of `hf_sft_eval.py serve`: requests/s and tokens/s for 1, 4 and 16 concurrent clients.

    python bench/bench_serve.py --model outputs/demo                     # starts the server, measures, stops it
    python bench/bench_serve.py --url http://127.0.0.1:8000 --name demo  # measure a server already running

Every request is a short chat prompt with `max_tokens` new tokens and `ignore_eos` (fixed-length answers, so
tokens/s does not depend on when the model chooses to stop), greedy. The server generates one request at a
time, so more clients raise the latency while throughput stays about the same: the table shows both.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Who are you?", "Summarize: the cat sat on the mat.", "Sentiment: I love this lunch box.",
             "What is 2 + 2?", "Name a color.", "Say hello in French.", "What day comes after Monday?",
             "Give me one word that rhymes with cat."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(REPO / "bench" / "out" / "bench_serve_server.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "hf_sft_eval.py"), "serve", "--model", model, "--port",
                             str(port), "--threads", str(threads), "--served_name", "bench",
                             "--eval_dtype", "float32"],  # as docs/BENCHMARKS.md's table was measured
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see bench/out/bench_serve_server.log")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not start in 300 s")


def one_request(url: str, name: str, question: str, max_tokens: int) -> tuple[float, int]:
    body = {"model": name, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        reply = json.loads(response.read())
    return time.perf_counter() - started, reply["usage"]["completion_tokens"]


def measure(url: str, name: str, clients: int, requests: int, max_tokens: int) -> dict:
    questions = [QUESTIONS[k % len(QUESTIONS)] for k in range(requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda q: one_request(url, name, q, max_tokens), questions))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": requests, "seconds": round(wall, 2),
            "requests_per_s": round(requests / wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(statistics.median(latencies), 2),
            "latency_max_s": round(latencies[-1], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/demo", help="checkpoint to serve (ignored with --url)")
    parser.add_argument("--url", help="a running server (default: start one for --model)")
    parser.add_argument("--name", default="bench", help="its model name (with --url)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the started server")
    args = parser.parse_args(argv)
    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
    proc, url, name = None, args.url, args.name
    if url is None:
        proc, url = start_server(args.model, args.threads)
        name = "bench"
    try:
        one_request(url, name, "warm up", 2)
        rows = []
        for clients in [int(c) for c in args.clients.split(",")]:
            rows.append(measure(url, name, clients, max(clients, 4), args.max_tokens))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(f"\n{args.model if args.url is None else url}, max_tokens {args.max_tokens}, greedy, ignore_eos\n")
    print("| clients | requests | seconds | requests/s | tokens/s | latency p50 (s) | latency max (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['seconds']} | {r['requests_per_s']} | {r['tokens_per_s']} | "
              f"{r['latency_p50_s']} | {r['latency_max_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
