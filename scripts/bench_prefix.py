#!/usr/bin/env python3
"""The prefix-cache benchmark: a shared-prefix workload with runtime-service's prefix cache on and
off, then two runtimes behind the Shepherd Model Gateway (smg) routing `round_robin` and
`cache_aware`, each pair side by side in one run. Run it with scripts/bench-prefix, which installs
the tools and builds the release binaries first.

The workload: 16 clients in a closed loop, 128 requests in all (8 per client); each request is a
1,000-token system prompt followed by 100 tokens of its own, and asks for exactly 128 output
tokens (ignore_eos, temperature 1).

Part 1, caching on against off, one runtime (llama-3.1-8b on the default h100-sxm): every request
shares one system prompt. The client is scripts/bench_gateway.py's direct grpc.aio client of the
engine dialect (VllmEngine/Generate with token ids: random ids below the first special token, one
fixed system prompt, a suffix of its own per request). A fresh runtime per mode, started with
`--prefix-caching on` or `off`, so neither sees the other's cache.
Part 2, routing: two fresh runtimes (caching on) behind `smg --policy round_robin`, then two
fresh ones behind `smg --policy cache_aware` (smg's defaults otherwise), which follows their KV
events (SubscribeKvEvents). First with 4 system prompts, client c on prompt c mod 4 (four clients
share each), then with 16, one per client (as each conversation's own history would be): under
round robin each runtime must compute a prompt once before it can hit it, so the more prompts
per request, the more routing matters while both runtimes' caches hold everything (36 GiB of
kv-cache: they never evict here). The client is a small asyncio HTTP client (httpx2, the one
the openai package uses here) of the gateway's OpenAI /v1/completions (streaming, the prompt as
text of the model's own words, one token each: scripts/gateway_cache.py's WORDS), so the gateway
tokenises and routes on what it sees.

Measured per run, all at the client unless named: TTFT (send to the first token), ITL per request
((end - first) / (tokens - 1), as aiperf and bench_gateway.py measure it), output tokens per
second of wall time over the whole run, and from the runtimes' /metrics (deltas over the run,
summed over runtimes): the prefix-cache hit rate (vllm:prefix_cache_hits_total over
vllm:prefix_cache_queries_total, both in tokens; a runtime with caching off counts neither), the
runtime's own TTFT mean (vllm:time_to_first_token_seconds) and, in part 2, how many requests
each runtime served (vllm:time_to_first_token_seconds_count). "cold" counts the requests whose
reply reported fewer cached tokens than the system prompt's full 16-token blocks (992 of its
1,000), i.e. that computed it; so the hit rate cannot exceed 992 / 1,100 = 90.2%. The cached
tokens the replies report (GenerateComplete's cached_tokens; OpenAI
usage.prompt_tokens_details.cached_tokens) must add up to the hits the counters saw, and the
runtimes must have counted exactly the run's requests.

Everything runs on loopback; readiness is awaited by health Watch and bounded polls, never
slept for; every process is stopped on every path (bench_gateway.Stack). Tables in Markdown.
"""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx2

sys.path.insert(0, os.path.dirname(__file__))
import bench_gateway as bg  # noqa: E402
from bench_gateway import (  # noqa: E402
    Stack, chat_once, delta, direct_run, fetch_tokenizer, hist_mean, log, start_gateway,
    stats_ms, stubs, wait_serving)
from gateway_cache import prompt as words  # noqa: E402
from smg_gateway import poll, series  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "bench-prefix"
LOGS = OUT / "logs"
SYSTEM, UNIQUE, OSL = 1000, 100, bg.OSL  # tokens: shared system prompt, own suffix, output (128)
CLIENTS, REQUESTS = 16, 128
# Part 2's system prompts: 4, four clients on each; then 16, one per client (as a conversation's
# own history would be), so that each runtime would have to compute every prompt under round robin.
GROUPS = (4, 16)
# What a hit can cover of the system prompt: its full blocks (the runtime's 16-token KV blocks).
SHARED_BLOCKS = SYSTEM // 16 * 16
RUN_TIMEOUT_S = 120  # one run of 128 requests, at most
# One memory-service for the whole bench, sized for two runtimes (each preloads ~16 GiB of weights).
POOLS = bg.POOLS


def start_runtime(stack, name, memory, *flags):
    """A runtime-service on ephemeral loopback ports, SERVING; returns (process, gRPC, admin)."""
    proc, (target, admin) = stack.spawn(name, [
        str(bg.BIN / "runtime-service"), "--memory-addr", f"http://{memory}",
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *flags],
        env={"RUST_LOG": "info", "LOG_FORMAT": "text"}, parse=True)
    wait_serving(target)
    return proc, target, admin


def grpc_started(admin, method):
    """grpc_server_started_total of `method` on a runtime's admin port."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as reply:
        page = reply.read().decode()
    values = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return series(values, "grpc_server_started_total", grpc_method=method)


def hit_rate(d):
    queries = d.get("vllm:prefix_cache_queries_total", 0.0)
    return d.get("vllm:prefix_cache_hits_total", 0.0) / queries if queries else float("nan")


def summarise(samples, wall, d):
    """One row: the client's TTFT and ITL statistics, throughput and the runtimes' counters."""
    return {"ttft": stats_ms([s[0] for s in samples]), "itl": stats_ms([s[1] for s in samples]),
            "tok_s": len(samples) * OSL / wall, "wall": wall, "hit": hit_rate(d),
            "server_ttft": hist_mean(d, "vllm:time_to_first_token_seconds") * 1000,
            # Requests that computed their system prompt: fewer of its full blocks came cached.
            "cold": sum(1 for s in samples if s[2] < SHARED_BLOCKS)}


def check_counts(what, samples, d):
    seen = int(d["vllm:time_to_first_token_seconds_count"])
    hits = int(d.get("vllm:prefix_cache_hits_total", 0))
    cached = sum(s[2] for s in samples)
    if seen != len(samples) or hits != cached:
        raise SystemExit(f"{what}: {len(samples)} requests and {cached} cached tokens at the "
                         f"client, {seen} requests and {hits} hit tokens at the runtimes")


# ---------------------------------------------------------------- part 1: on against off


def part1(stack, memory, pb):
    """Returns the engine model's name."""
    rows, prompts = {}, None
    for mode in ("off", "on"):
        proc, target, admin = start_runtime(stack, f"runtime-caching-{mode}", memory,
                                            "--prefix-caching", mode)
        if prompts is None:
            # The model, and its first special token id: the ids sent stay below it.
            info, _, vocab = fetch_tokenizer(target, pb)
            model = info.served_model_name
            rng = random.Random(1)
            system = [rng.randrange(vocab) for _ in range(SYSTEM)]
            prompts = [system + [rng.randrange(vocab) for _ in range(UNIQUE)]
                       for _ in range(REQUESTS)]
        log(f"part 1: caching {mode}")
        before = [bg.scrape(admin, model)]
        started = time.perf_counter()
        samples = asyncio.run(direct_run(target, pb, CLIENTS, REQUESTS, 0, vocab, 0,
                                         prompts=prompts))
        wall = time.perf_counter() - started
        d = delta([admin], model, before)
        stack.stop(proc)
        check_counts(f"caching {mode}", samples, d)
        rows[mode] = summarise(samples, wall, d)
    print("\n## Part 1: prefix caching on against off, one runtime\n")
    print(f"llama-3.1-8b on h100-sxm; {CLIENTS} clients in a closed loop, {REQUESTS} requests of "
          f"one shared {SYSTEM:,}-token system prompt + {UNIQUE} tokens of their own, {OSL} output "
          f"tokens (ignore_eos); direct gRPC (VllmEngine, token ids). A fresh runtime per mode. "
          f"Hit rate at most {SHARED_BLOCKS} / {SYSTEM + UNIQUE:,} = "
          f"{SHARED_BLOCKS / (SYSTEM + UNIQUE):.1%}; cold: requests that computed the system "
          f"prompt.\n")
    table(rows, [("off", "on")], "caching", "on ÷ off", [""])
    return model


# ---------------------------------------------------------------- part 2: routing


async def http_run(url, model, prompts):
    """`prompts[c]` are client c's requests, sent one after another on its own stream, all
    clients at once, to the gateway's /v1/completions; returns per-request (ttft, itl, cached
    tokens, prompt tokens), times in seconds."""
    results = []
    limits = httpx2.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx2.AsyncClient(base_url=url, timeout=RUN_TIMEOUT_S, limits=limits) as client:

        async def one(text):
            body = {"model": model, "prompt": text, "max_tokens": OSL, "ignore_eos": True,
                    "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}}
            sent = time.perf_counter()
            first, usage = None, None
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                if reply.status_code != 200:
                    raise SystemExit(f"gateway: HTTP {reply.status_code}: {await reply.aread()!r}")
                async for line in reply.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("choices"):
                        first = time.perf_counter()
                    usage = chunk.get("usage") or usage
            end = time.perf_counter()
            tokens = (usage or {}).get("completion_tokens")
            if first is None or tokens != OSL:
                raise SystemExit(f"gateway: {tokens} output tokens, usage {usage}")
            cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
            results.append((first - sent, (end - first) / (tokens - 1), cached,
                            usage["prompt_tokens"]))

        async def stream(texts):
            for text in texts:
                await one(text)

        await asyncio.wait_for(asyncio.gather(*[stream(p) for p in prompts]), RUN_TIMEOUT_S)
    return results


def part2(stack, memory, model):
    per_client = REQUESTS // CLIENTS
    rows, split = {}, []
    for groups in GROUPS:
        systems = [words(100 + g, SYSTEM) for g in range(groups)]
        prompts = [[f"{systems[c % groups]} {words(10_000 + c * per_client + k, UNIQUE)}"
                    for k in range(per_client)] for c in range(CLIENTS)]
        for policy in ("round_robin", "cache_aware"):
            runtimes = [start_runtime(stack, f"runtime-{groups}-{policy}-{x}", memory)
                        for x in "ab"]
            admins = [r[2] for r in runtimes]
            smg, url = start_gateway(stack, f"smg-{groups}-{policy}", [r[1] for r in runtimes],
                                     policy=policy)
            if policy == "cache_aware":  # bounded: the gateway follows both runtimes' KV events
                poll("the gateway subscribed to both runtimes' KV events",
                     lambda: all(grpc_started(a, "SubscribeKvEvents") >= 1 for a in admins))
            for _ in range(2):  # first requests set up the gateway's channels: outside the window
                chat_once(url, model, 4)
            log(f"part 2: {groups} system prompts, {policy}")
            before = [bg.scrape(a, model) for a in admins]
            started = time.perf_counter()
            samples = asyncio.run(http_run(url, model, prompts))
            wall = time.perf_counter() - started
            d = delta(admins, model, before)
            per = [delta([a], model, [b]) for a, b in zip(admins, before)]
            for proc in [smg] + [r[0] for r in runtimes]:
                stack.stop(proc)
            check_counts(f"{groups} prompts, {policy}", samples, d)
            row = f"{groups} prompts, {policy}"
            rows[row] = summarise(samples, wall, d)
            rows[row]["prompt"] = sum(s[3] for s in samples) / len(samples)
            split.append((row, [int(p["vllm:time_to_first_token_seconds_count"]) for p in per],
                          [hit_rate(p) for p in per]))
    prompt = sum(r["prompt"] for r in rows.values()) / len(rows)
    print("\n## Part 2: two runtimes behind smg, round_robin against cache_aware\n")
    print(f"{' and '.join(map(str, GROUPS))} system prompts of {SYSTEM:,} words (one token each), "
          f"client c on prompt c mod the count; otherwise part 1's load ({CLIENTS} clients, "
          f"{REQUESTS} requests, {UNIQUE} words of their own, {OSL} output tokens), through smg's "
          f"/v1/completions (streaming). Prompts as the gateway tokenised them: {prompt:.0f} "
          f"tokens. Fresh runtimes per run, caching on.\n")
    table(rows, [(f"{g} prompts, round_robin", f"{g} prompts, cache_aware") for g in GROUPS],
          "system prompts, policy", "{} prompts, cache_aware ÷ round_robin",
          [f"{g}" for g in GROUPS])
    print("\n| system prompts, policy | requests on A / B | hit rate on A / B |")
    print("| --- | ---: | ---: |")
    for row, served, hits in split:
        print(f"| {row} | {served[0]} / {served[1]} | {hits[0]:.1%} / {hits[1]:.1%} |")


# ---------------------------------------------------------------- output


def table(rows, pairs, label, ratio_label, ratio_names):
    """Rows in `pairs` order, each pair (baseline, other) followed by other ÷ baseline."""
    cells = [("hit rate", lambda r: r["hit"], "{:.1%}"),
             ("cold", lambda r: r["cold"], "{:d}"),
             ("TTFT mean", lambda r: r["ttft"]["avg"], "{:.1f} ms"),
             ("TTFT p50", lambda r: r["ttft"]["p50"], "{:.1f} ms"),
             ("TTFT p99", lambda r: r["ttft"]["p99"], "{:.1f} ms"),
             ("runtime TTFT mean", lambda r: r["server_ttft"], "{:.1f} ms"),
             ("ITL mean", lambda r: r["itl"]["avg"], "{:.2f} ms"),
             ("output tok/s", lambda r: r["tok_s"], "{:,.0f}"),
             ("wall", lambda r: r["wall"], "{:.1f} s")]
    print(f"| {label} | " + " | ".join(c[0] for c in cells) + " |")
    print("| --- |" + " ---: |" * len(cells))
    for (base, other), name in zip(pairs, ratio_names):
        for row in (base, other):
            print(f"| {row} | " + " | ".join(
                "off" if rows[row]["hit"] != rows[row]["hit"] and title == "hit rate"
                else fmt.format(get(rows[row])) for title, get, fmt in cells) + " |")
        a, b = rows[other], rows[base]
        print(f"| {ratio_label.format(name)} | " + " | ".join(
            "—" if title in ("hit rate", "cold") else f"{get(a) / get(b):.2f}"
            for title, get, _ in cells) + " |")


def main():
    LOGS.mkdir(parents=True, exist_ok=True)
    # The servers run in sessions of their own: a SIGTERM or SIGHUP to the bench must unwind
    # through the `finally` that stops them.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _: sys.exit(128 + number))
    # fetch_tokenizer lays the tokenizer out as a Hugging Face cache entry: keep it in our tree.
    bg.HF_HOME = OUT / "hf"
    pb = stubs()
    stack = Stack(LOGS)
    started = time.monotonic()
    try:
        _, (memory, _) = stack.spawn("memory-service", [
            str(bg.BIN / "memory-service"), "--pool", POOLS,
            "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            env={"RUST_LOG": "info", "LOG_FORMAT": "text"}, parse=True)
        wait_serving(memory)
        model = part1(stack, memory, pb)
        part2(stack, memory, model)
    finally:
        stack.stop_all()
    print(f"\nsmg launch --backend vllm (smg {smg_version()}); all done in "
          f"{time.monotonic() - started:.0f} s")


def smg_version():
    return subprocess.run([str(bg.TOOLS / "gateway" / "bin" / "python"), "-c",
                           "import importlib.metadata as m; print(m.version('smg'))"],
                          capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
