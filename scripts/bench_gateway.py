#!/usr/bin/env python3
"""The gateway benchmark: NVIDIA's aiperf through the Shepherd Model Gateway, against the runtimes'
own histograms and against a direct gRPC client. Run it with scripts/bench-gateway, which installs
the tools and builds the release binaries first.

What it starts, all on loopback, all stopped on every path (SIGTERM to each process group it
created, SIGKILL after a bound): one memory-service and two runtime-services on ephemeral ports
(each address read from its "listening" and "metrics on /metrics" log lines), and `smg` on ports
picked free by binding port 0. Readiness is awaited, never slept for: a runtime's gRPC health
Watch must say SERVING, the gateway's /readiness must answer 200 (polled, bounded).

The tokenizer aiperf counts and synthesises prompts with is the runtime's own, fetched over the
dialect's GetTokenizer (a zip in chunks, checked against its SHA-256). aiperf runs with
HF_HUB_OFFLINE=1, and aiperf 0.13.0 in offline mode passes every --tokenizer through
huggingface_hub's snapshot_download(local_files_only=True), which rejects a directory path
("Repo id must be in the form 'repo_name'..."); so the bundle is laid out as a Hugging Face cache
entry (`models--runtime-service--<model>/snapshots/<rev>/`, `refs/main`) under a private HF_HOME
in target/, and --tokenizer names it as `runtime-service/<model>`. Nothing is fetched from a hub.

Part 1, agreement: a fixed-rate workload (constant arrivals, 2048 prompt and 128 output tokens,
streaming, ignore_eos so every output has exactly 128 tokens) through the gateway, which routes
round robin to both runtimes. aiperf's TTFT and ITL means are compared with the runtimes'
vllm:time_to_first_token_seconds and vllm:inter_token_latency_seconds over the same requests
(delta of _sum over delta of _count, both runtimes added; the request counts must match, so no
other request is in the window). Goal: within 10%; the script exits 1 when a mean is not.
  - aiperf measures at the HTTP client, the runtime from the call's arrival at the runtime. So
    aiperf's TTFT also holds the HTTP request, the gateway's chat template and tokenisation, its
    gRPC call and the first chunk's way back: a few milliseconds on top of the runtime's TTFT
    (70 ms here), printed as the difference. The runtime's TTFT ends when the device produces
    the token, before it is sent.
  - aiperf's ITL is per request, (latency - TTFT) / (tokens - 1), averaged over requests; the
    runtime's histogram holds every gap between two tokens. With equal output lengths both means
    weigh every gap alike; they differ only by the time from the last token to the stream's end.
Part 2, gateway against direct: at 1 and 32 concurrent streams (closed loop, one warm-up round of
as many requests as streams, then a bounded number of requests; the same lengths), aiperf through
a gateway routing to runtime A alone (so both paths load one device alike), then a
small grpc.aio client calling runtime A's VllmEngine/Generate with token ids of the length the
gateway sent (measured: the runtime's prompt-token counter over the gateway run), ignore_eos and
the same max_tokens, temperature 1 (OpenAI's default; aiperf sends none). Same definitions
of TTFT (send to first token) and ITL (per request, as aiperf's) on both sides.

Tables are printed in Markdown. Every load is bounded in requests and in time.
"""

import asyncio
import hashlib
import io
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import grpc
import grpc.aio
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
TOOLS = ROOT / "target" / "tools"
OUT = ROOT / "target" / "bench-gateway"
STUBS = OUT / "stubs"
HF_HOME = OUT / "hf"
LOGS = OUT / "logs"

# Prompts of 2048 tokens: the gateway's own cost (HTTP, chat template, tokenisation, a gRPC hop)
# is about 2 ms plus 1.5 ms per 1,000 prompt tokens on these 2 cores, 3.2 ms or 9.6% of TTFT at
# 1024 tokens (the runtime sweep's shape), which would leave the 10% check no margin for what it
# checks: that the client's and the runtime's measurements agree. At 2048 it is 4.7 ms, 6.7%.
ISL, OSL = 2048, 128
RATE, RATE_REQUESTS = 4.0, 80  # part 1: 4 requests/s for 20 s
CONCURRENCY = ((1, 8), (32, 64))  # part 2: (streams, requests)
TOLERANCE = 0.10
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 150  # one aiperf run or one direct run, at most
# Two runtimes preload their weights into one memory-service (each ~16 GiB of uniforms).
POOLS = "kv-cache=36GiB,activations=1GiB,uniforms=32GiB"


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


class Stack:
    """Processes this bench started; `stop` ends each of them, newest first, on every path. Their
    output goes to `logs` (scripts/bench_prefix.py keeps its own)."""

    def __init__(self, logs=LOGS):
        self.procs = []
        self.logs = logs

    def spawn(self, name, command, env=None, parse=False):
        """Starts `command` in its own process group, its output in the stack's log directory.
        With `parse`, waits for its "listening" line and returns (gRPC address, admin address)."""
        env = dict(os.environ, **(env or {}))
        logfile = open(self.logs / f"{name}.log", "w", encoding="utf-8")
        proc = subprocess.Popen(command, stdout=logfile, stderr=subprocess.PIPE if parse else logfile,
                                text=True, env=env, start_new_session=True)
        proc.name = name
        self.procs.append(proc)
        if not parse:
            return proc
        found = queue.Queue()

        def read():
            admin = None
            for line in proc.stderr:  # blocks until the server logs
                logfile.write(line)
                logfile.flush()
                match = re.search(r"metrics on /metrics addr=(\S+)", line)
                if match:
                    admin = match.group(1)
                match = re.search(r"listening addr=(\S+)", line)
                if match:
                    found.put((match.group(1), admin))
            found.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            addrs = found.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            addrs = None
        if addrs is None:
            raise SystemExit(f"{name} did not log its address (see {self.logs / (name + '.log')})")
        return proc, addrs

    def stop(self, proc):
        """SIGTERM to the process group this bench created for it, SIGKILL after 20 s."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(target):
    """Blocks on a health Watch until SERVING (bounded)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=START_TIMEOUT_S):
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
    raise SystemExit(f"{target} never became SERVING")


def start_gateway(stack, name, workers, policy="round_robin"):
    port, prom = free_port(), free_port()
    smg = stack.spawn(name, [
        # The venv's python, not its `smg` script: a copied venv's scripts keep their old shebang.
        str(TOOLS / "gateway" / "bin" / "python"), "-m", "smg", "launch", "--backend", "vllm",
        "--worker-urls", *[f"grpc://{w}" for w in workers],
        "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom),
        "--policy", policy,
        # Two log lines per request at info cost CPU that the 2 cores share with the runtimes.
        "--log-level", "warn",
    ])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # bounded poll: ready once every worker is connected and the tokenizer loaded
        if smg.poll() is not None:
            raise SystemExit(f"smg exited with {smg.returncode} (see {stack.logs / (name + '.log')})")
        try:
            with urllib.request.urlopen(f"{url}/readiness", timeout=2) as reply:
                if reply.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"smg not ready within {START_TIMEOUT_S} s")
        time.sleep(0.1)
    return smg, url


def chat_once(url, model, max_tokens):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "warm up"}],
                       "max_tokens": max_tokens, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body,
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        json.load(reply)


# ---------------------------------------------------------------- engine dialect


def stubs():
    """Python stubs of the dialect, generated from proto/ into target/ (never into the tree)."""
    STUBS.mkdir(parents=True, exist_ok=True)
    protos = ["vllm/grpc/engine/vllm_engine.proto", "smg/grpc/common/common.proto"]
    include = Path(protoc.__file__).parent / "_proto"
    if protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={STUBS}",
                    f"--grpc_python_out={STUBS}", *protos]) != 0:
        raise SystemExit("protoc failed on the dialect's protos")
    sys.path.insert(0, str(STUBS))
    from smg.grpc.common import common_pb2
    from vllm.grpc.engine import vllm_engine_pb2, vllm_engine_pb2_grpc

    return common_pb2, vllm_engine_pb2, vllm_engine_pb2_grpc


def fetch_tokenizer(target, pb):
    """The engine model's info and its tokenizer bundle, laid out as a Hugging Face cache entry;
    returns (model info, repo id for --tokenizer, the lowest special token id)."""
    common_pb2, engine_pb2, engine_grpc = pb
    with grpc.insecure_channel(target) as channel:
        stub = engine_grpc.VllmEngineStub(channel)
        info = stub.GetModelInfo(engine_pb2.GetModelInfoRequest(), timeout=10)
        data, sha = b"", ""
        for chunk in stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=30):
            data += chunk.data
            sha = chunk.sha256 or sha
    if hashlib.sha256(data).hexdigest() != sha:
        raise SystemExit("GetTokenizer: the zip's SHA-256 does not match the one sent")
    repo = f"runtime-service/{info.served_model_name}"
    entry = HF_HOME / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.rmtree(entry, ignore_errors=True)
    revision = sha[:40]
    zipfile.ZipFile(io.BytesIO(data)).extractall(entry / "snapshots" / revision)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(revision)
    added = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("tokenizer.json"))["added_tokens"]
    return info, repo, min(t["id"] for t in added if t["special"])


async def direct_run(target, pb, concurrency, count, prompt_len, vocab, seed, prompts=None):
    """A closed loop of `concurrency` streams sending `count` requests in all to VllmEngine, of
    random ids unless `prompts` (lists of ids) are given; returns per-request (ttft, itl,
    cached prompt tokens), times in seconds, measured as aiperf measures them."""
    _, engine_pb2, engine_grpc = pb
    if prompts is None:
        rng = random.Random(seed)
        prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(count)]
    todo = list(range(count))
    results = []
    run = uuid.uuid4().hex[:8]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = engine_grpc.VllmEngineStub(channel)

        async def one(i):
            request = engine_pb2.GenerateRequest(
                request_id=f"bench-{run}-{i}",
                tokenized=engine_pb2.TokenizedInput(input_ids=prompts[i]),
                sampling_params=engine_pb2.SamplingParams(temperature=1.0, max_tokens=OSL,
                                                          ignore_eos=True),
                stream=True)
            sent = time.perf_counter()
            first, tokens, reason, cached = None, 0, None, 0
            async for reply in stub.Generate(request, timeout=RUN_TIMEOUT_S):
                if reply.HasField("chunk") and reply.chunk.token_ids:
                    first = first or time.perf_counter()
                    tokens += len(reply.chunk.token_ids)
                elif reply.HasField("complete"):
                    reason, cached = reply.complete.finish_reason, reply.complete.cached_tokens
            end = time.perf_counter()  # aiperf's latency ends with the stream too
            if tokens != OSL or reason != "length":
                raise SystemExit(f"direct request {i}: {tokens} tokens, finish {reason!r}")
            results.append((first - sent, (end - first) / (tokens - 1), cached))

        async def stream():
            while todo:
                await one(todo.pop(0))

        await asyncio.wait_for(asyncio.gather(*[stream() for _ in range(concurrency)]),
                               RUN_TIMEOUT_S)
    return results


# ---------------------------------------------------------------- measurements


def scrape(admin, model):
    """Sum of every sample of the engine model, by metric name (labels other than model added)."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"(vllm:[^{\s]+)(\{[^}]*\})?\s+(\S+)$", line)
        if match and f'model_name="{model}"' in (match.group(2) or ""):
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(3))
    return values


def delta(admins, model, before):
    after = [scrape(a, model) for a in admins]
    out = {}
    for b, a in zip(before, after):
        for key, value in a.items():
            out[key] = out.get(key, 0.0) + value - b.get(key, 0.0)
    return out


def hist_mean(d, name):
    count = d[f"{name}_count"]
    return d[f"{name}_sum"] / count if count else float("nan")


def aiperf(name, url, model, tokenizer, load):
    """Runs aiperf profile (bounded in requests and time); returns its JSON summary."""
    art = OUT / "aiperf" / name
    shutil.rmtree(art, ignore_errors=True)
    command = [
        str(TOOLS / "aiperf" / "bin" / "aiperf"), "profile",
        "--model", model, "--tokenizer", tokenizer, "--url", url,
        "--endpoint-type", "chat", "--streaming",
        "--isl", str(ISL), "--osl", str(OSL), "--prompt-corpus", "random",
        "--extra-inputs", "ignore_eos:true",
        # Output lengths from the usage the gateway reports (exact with ignore_eos) rather than
        # re-tokenising every output on the 2 cores the runtimes use.
        "--use-server-token-count",
        "--random-seed", "7", "--wait-for-model-timeout", "0",
        "--ui", "none", "--no-server-metrics", "--no-gpu-telemetry",
        "--output-artifact-dir", str(art), *load,
    ]
    env = dict(os.environ, HF_HOME=str(HF_HOME), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    with open(LOGS / f"aiperf-{name}.log", "w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = f"still running after {RUN_TIMEOUT_S} s"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    summary = art / "profile_export_aiperf.json"
    if code != 0 or not summary.exists():
        raise SystemExit(f"aiperf {name} failed ({code}); see {LOGS / f'aiperf-{name}.log'}")
    result = json.loads(summary.read_text())
    if result.get("request_error_rate", {}).get("avg", 0) or result.get("error_summary"):
        raise SystemExit(f"aiperf {name}: errors {result.get('error_summary')}")
    return result


def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default, which aiperf uses)."""
    values = sorted(values)
    rank = (len(values) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def stats_ms(values_s):
    ms = [v * 1000 for v in values_s]
    return {"avg": sum(ms) / len(ms), "p50": percentile(ms, 50), "p99": percentile(ms, 99)}


# ---------------------------------------------------------------- the bench


def part1(url, admins, model, tokenizer):
    before = [scrape(a, model) for a in admins]
    result = aiperf("rate", url, model, tokenizer, [
        "--request-rate", str(RATE), "--arrival-pattern", "constant",
        "--request-count", str(RATE_REQUESTS)])
    d = delta(admins, model, before)
    requests = int(result["request_count"]["avg"])
    seen = int(d["vllm:time_to_first_token_seconds_count"])
    if requests != RATE_REQUESTS or seen != requests:
        raise SystemExit(f"part 1: aiperf counted {requests} requests, the runtimes {seen}")
    rows = []
    for label, key, metric in (("TTFT", "time_to_first_token", "vllm:time_to_first_token_seconds"),
                               ("ITL", "inter_token_latency", "vllm:inter_token_latency_seconds")):
        client = result[key]["avg"]
        server = hist_mean(d, metric) * 1000
        rows.append((label, client, server, result[key]))
    print("\n## Part 1: aiperf through the gateway against the runtimes' histograms\n")
    print(f"{RATE_REQUESTS} requests at {RATE:g}/s (constant arrivals), {ISL} prompt + {OSL} output "
          f"tokens, streaming, ignore_eos; smg round robin over 2 runtimes. Runtime means: delta "
          f"of _sum over delta of _count, both runtimes. Mean prompt as the runtimes counted it: "
          f"{d['vllm:prompt_tokens_total'] / seen:.1f} tokens.\n")
    print("| metric | aiperf mean | runtime histogram mean | aiperf − runtime | ratio | within 10% |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    ok = True
    for label, client, server, _ in rows:
        ratio = client / server
        inside = abs(ratio - 1) <= TOLERANCE
        ok &= inside
        print(f"| {label} | {client:.2f} ms | {server:.2f} ms | {client - server:+.2f} ms | "
              f"{ratio:.3f} | {'yes' if inside else 'NO'} |")
    print("\naiperf percentiles (over requests): " + "; ".join(
        f"{label} p50 {s['p50']:.2f}, p90 {s['p90']:.2f}, p99 {s['p99']:.2f} ms"
        for label, _, _, s in rows))
    return ok


def part2(stack, runtime, admin, model, tokenizer, vocab, pb):
    smg, url = start_gateway(stack, "smg-one", [runtime])
    chat_once(url, model, 4)
    table, views = [], []
    for streams, count in CONCURRENCY:
        before = [scrape(admin, model)]
        # The warm-up round opens aiperf's connections (32 cold connects cost 25-45 ms each of
        # TTFT here) and is left out of aiperf's figures; the direct client warms up alike.
        name = f"c{streams}"
        result = aiperf(name, url, model, tokenizer, [
            "--concurrency", str(streams), "--request-count", str(count),
            "--warmup-request-count", str(streams)])
        d = delta([admin], model, before)
        prompt_len = round(d["vllm:prompt_tokens_total"] / d["vllm:time_to_first_token_seconds_count"])
        gateway = {"TTFT": result["time_to_first_token"], "ITL": result["inter_token_latency"]}
        # Every request of the run, warm-up included, as aiperf's records and the runtime saw them.
        records = [json.loads(line)["metrics"] for line in
                   (OUT / "aiperf" / name / "profile_export.jsonl").read_text().splitlines()]
        views.append((streams, "gateway (aiperf)", d,
                      [r["time_to_first_token"]["value"] / 1000 for r in records],
                      [r["inter_token_latency"]["value"] / 1000 for r in records]))

        before = [scrape(admin, model)]
        warm = asyncio.run(direct_run(runtime, pb, streams, streams, prompt_len, vocab, 0))
        samples = asyncio.run(direct_run(runtime, pb, streams, count, prompt_len, vocab, streams))
        d = delta([admin], model, before)
        direct = {"TTFT": stats_ms([s[0] for s in samples]), "ITL": stats_ms([s[1] for s in samples])}
        views.append((streams, "direct (gRPC)", d, [s[0] for s in warm + samples],
                       [s[1] for s in warm + samples]))
        table.append((streams, count, gateway, direct))
    stack.stop(smg)
    print("\n## Part 2: through the gateway (aiperf) against direct gRPC (VllmEngine), runtime A\n")
    print(f"Closed loop after a warm-up round of as many requests as streams, {ISL} prompt + {OSL} "
          f"output tokens (the direct client sends the prompt length the runtime counted from the "
          f"gateway: {prompt_len} ids), ignore_eos, streaming. Figures over the requests after the "
          f"warm-up.\n")
    cells = [(metric, stat) for metric in ("TTFT", "ITL") for stat in ("avg", "p50", "p99")]
    print("| streams × requests | path | " + " | ".join(
        f"{m} {'mean' if s == 'avg' else s}" for m, s in cells) + " |")
    print("| ---: | --- |" + " ---: |" * len(cells))
    for streams, count, gateway, direct in table:
        for path, values in (("gateway (aiperf)", gateway), ("direct (gRPC)", direct)):
            print(f"| {streams} × {count} | {path} | " + " | ".join(
                f"{values[m][s]:.2f} ms" for m, s in cells) + " |")
        print(f"| {streams} × {count} | gateway ÷ direct | " + " | ".join(
            f"{gateway[m][s] / direct[m][s]:.2f}" for m, s in cells) + " |")
    print("\nThe same runs as the client and the runtime saw them (every request of a run, warm-up "
          "included: the runtime's histograms cannot tell the two apart). client − runtime is "
          "what the path adds to TTFT; the runtime's own TTFT shows how the device was loaded.\n")
    print("| streams | path | requests | client TTFT | runtime TTFT | client − runtime | client ITL "
          "| runtime ITL |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for streams, path, d, ttfts, itls in views:
        seen = int(d["vllm:time_to_first_token_seconds_count"])
        if seen != len(ttfts):
            raise SystemExit(f"part 2, {path} at {streams}: {len(ttfts)} requests, runtime saw {seen}")
        client_ttft = sum(ttfts) / len(ttfts) * 1000
        server_ttft = hist_mean(d, "vllm:time_to_first_token_seconds") * 1000
        print(f"| {streams} | {path} | {seen} | {client_ttft:.2f} ms | {server_ttft:.2f} ms | "
              f"{client_ttft - server_ttft:+.2f} ms | {sum(itls) / len(itls) * 1000:.2f} ms | "
              f"{hist_mean(d, 'vllm:inter_token_latency_seconds') * 1000:.2f} ms |")


def main():
    for d in (LOGS, OUT / "aiperf"):
        d.mkdir(parents=True, exist_ok=True)
    # The servers run in sessions of their own (a terminal's Ctrl-C does not reach them): a
    # SIGTERM or SIGHUP to the bench must unwind through the `finally` that stops them.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _: sys.exit(128 + number))
    pb = stubs()
    stack = Stack()
    started = time.monotonic()
    try:
        _, (memory, _) = stack.spawn("memory-service", [
            str(BIN / "memory-service"), "--pool", POOLS,
            "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            env={"RUST_LOG": "info", "LOG_FORMAT": "text"}, parse=True)
        runtimes = []
        for name in ("runtime-a", "runtime-b"):
            _, addrs = stack.spawn(name, [
                str(BIN / "runtime-service"), "--memory-addr", f"http://{memory}",
                "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
                env={"RUST_LOG": "info", "LOG_FORMAT": "text"}, parse=True)
            runtimes.append(addrs)
        for target, _ in runtimes:
            wait_serving(target)
        info, tokenizer, specials = fetch_tokenizer(runtimes[0][0], pb)
        model = info.served_model_name
        smg, url = start_gateway(stack, "smg-two", [r[0] for r in runtimes])
        for _ in range(2):  # first requests set up the gateway's channels: outside the window
            chat_once(url, model, 4)
        log(f"stack ready in {time.monotonic() - started:.1f} s; part 1")
        ok = part1(url, [r[1] for r in runtimes], model, tokenizer)
        stack.stop(smg)
        log("part 2")
        # Direct prompts: random ids below the first special token (the specials come last).
        part2(stack, runtimes[0][0], runtimes[0][1], model, tokenizer, specials, pb)
    finally:
        stack.stop_all()
    version = subprocess.run([str(TOOLS / "aiperf" / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('aiperf'))"],
                             capture_output=True, text=True).stdout.strip()
    print(f"\naiperf {version}, smg launch --backend vllm; all done in "
          f"{time.monotonic() - started:.0f} s")
    if not ok:
        print(f"FAILED: an aiperf mean is not within {TOLERANCE:.0%} of the runtimes' histograms")
        sys.exit(1)


if __name__ == "__main__":
    main()
