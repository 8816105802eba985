#!/usr/bin/env python3
"""runtime-service behind a real gateway, driven by a real client.

Starts memory-service, two runtime-services and the Shepherd Model Gateway (`smg launch --backend
vllm --worker-urls grpc://A grpc://B`, from target/tools/gateway) on loopback, then talks to the
gateway with the official `openai` Python client, as a user of an OpenAI-compatible endpoint would:

- models.list() shows the runtimes' model;
- completions and chat.completions, streaming and not, return the text runtime-service generates
  for the same prompt and seed through its own API (runtime.v1), and `usage` equals the runtime's
  own counts (its vllm:prompt_tokens_total and vllm:generation_tokens_total);
- both runtimes served requests (round robin);
- a client that closes its stream mid-way gets its sequence aborted: the runtime's blocks and
  memory-service's kv-cache leases go back to zero;
- an over-long prompt gets the gateway's 400, carrying runtime-service's message;
- a field the simulator cannot honour (logprobs) is refused by name, not ignored.

Before that, the README's "Behind a real gateway" block runs as written, on ephemeral ports.
Last, gateway_cache.py checks that smg's cache-aware policy follows runtime-service's KV events.
Before it, a second gateway discovers the runtimes from a file (`--discovery-provider file`): a runtime
added to the file is picked up and serves, one removed from it is dropped.

Usage: gateway.py MEMORY_SERVICE RUNTIME_SERVICE   (paths to the binaries)
Runs in target/tools/venv (grpcio, stubs' tools, openai); the gateway binary comes from
target/tools/gateway (scripts/tools.sh installs both). Every wait is a bounded poll.
"""


import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from gateway_cache import cache_aware_checks  # noqa: E402
from smg_gateway import MODEL, ROOT, SMG, WITHIN_S, Gateway, check, free_port, metrics, poll, series  # noqa: E402
from walkthrough import start_server, stop_servers, wait_serving  # noqa: E402

# Two engines share the device memory-service arbitrates, as two vLLM processes share one GPU:
# the default split holds one runtime's weights, these pools hold two (2 x 16.4 GB of weights,
# 2 x 0.18 GB of activations) and leave the rest of an H100's usable memory to their KV caches.
POOLS = "kv-cache=36GiB,activations=1GiB,uniforms=32GiB"


def runtime_v1(address):
    """A runtime.v1 client on stubs generated from proto/ (as the example client's)."""
    import grpc
    from runtime.v1 import runtime_pb2, runtime_pb2_grpc

    stub = runtime_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(address))

    def generate(prompt, max_tokens, seed):
        # Temperature 1: OpenAI's default, which the gateway sends (runtime.v1's is greedy).
        request = runtime_pb2.GenerateRequest(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                              seed=seed, temperature=1.0)
        text, summary = [], None
        for item in stub.Generate(request):
            if item.HasField("token"):
                text.append(item.token.text)
            else:
                summary = item.summary
        return "".join(text), summary

    return generate


def counts(runtimes):
    """Prompt and generated tokens counted by both runtimes so far."""
    pages = [metrics(r) for r in runtimes]
    return (sum(series(p, "vllm:prompt_tokens_total") for p in pages),
            sum(series(p, "vllm:generation_tokens_total") for p in pages))


def check_usage(runtimes, before, usage, what):
    prompt, generated = counts(runtimes)
    check((usage.prompt_tokens, usage.completion_tokens) == (prompt - before[0], generated - before[1]),
          f"{what}: usage {usage.prompt_tokens}+{usage.completion_tokens} tokens equals the runtimes' "
          f"counts {prompt - before[0]:.0f}+{generated - before[1]:.0f}")


def streamed(stream, chat):
    """Text and usage of a streamed answer (usage arrives on the last chunk)."""
    text, usage = [], None
    for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            text.append((choice.delta.content if chat else choice.text) or "")
        if chunk.usage:
            usage = chunk.usage
    return "".join(text), usage


def openai_checks(gateway, runtimes, memory, generate):
    import openai

    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=WITHIN_S)
    models = [m.id for m in client.models.list()]
    check(models == [MODEL], f"models.list() shows {models}")

    # Completions: the gateway tokenizes with the runtime's own tokenizer (fetched over
    # GetTokenizer) and decodes the ids it streams back; the text must be runtime.v1's.
    prompt, seed, n = "The quick brown fox", 7, 12
    expected, summary = generate(prompt, n, seed)
    before = counts(runtimes)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, seed=seed)
    check(reply.choices[0].text == expected,
          f"completion {reply.choices[0].text!r} is runtime.v1's text for the same prompt and seed")
    check(reply.usage.prompt_tokens == summary.prompt_tokens,
          f"completion counts {reply.usage.prompt_tokens} prompt tokens, as runtime.v1 does")
    check_usage(runtimes, before, reply.usage, "completion")

    before = counts(runtimes)
    text, usage = streamed(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=n, seed=seed, stream=True,
        stream_options={"include_usage": True}), chat=False)
    check(text == expected, f"streamed completion {text!r} is the same text")
    check_usage(runtimes, before, usage, "streamed completion")

    # Chat: the gateway applies the bundle's chat template ("role: content" lines, then
    # "assistant:"), so runtime.v1 given that rendered prompt generates the same reply.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    rendered = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    expected, summary = generate(rendered, 10, 3)
    before = counts(runtimes)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=3)
    check(reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "length",
          f"chat reply {reply.choices[0].message.content!r} is runtime.v1's for the rendered template")
    check(reply.usage.prompt_tokens == summary.prompt_tokens,
          f"chat counts {reply.usage.prompt_tokens} prompt tokens, as runtime.v1 does")
    check_usage(runtimes, before, reply.usage, "chat")

    before = counts(runtimes)
    text, usage = streamed(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, seed=3, stream=True,
        stream_options={"include_usage": True}), chat=True)
    check(text == expected, f"streamed chat {text!r} is the same text")
    check_usage(runtimes, before, usage, "streamed chat")

    served = [series(metrics(r), "vllm:request_success_total") for r in runtimes]
    check(all(s > 0 for s in served), f"both runtimes served requests through the gateway: {served}")

    # A client that hangs up mid-stream: the gateway drops its gRPC stream, which aborts the
    # sequence; its blocks go back to the runtime and its slabs to memory-service.
    aborted_before = sum(series(metrics(r), "vllm:request_success_total", finished_reason="abort")
                         for r in runtimes)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4096, seed=1, stream=True)
    received = 0
    for chunk in stream:
        received += len(chunk.choices[0].text or "") if chunk.choices else 0
        if received >= 20:
            break
    in_use = series(metrics(memory), "memory_pool_used_bytes", pool="kv-cache")
    check(in_use > 0, f"mid-stream, the sequence holds {in_use:.0f} bytes of kv-cache in memory-service")
    stream.close()
    poll("the aborted sequence's memory back", lambda: (
        series(metrics(memory), "memory_pool_used_bytes", pool="kv-cache") == 0
        and sum(series(metrics(r), "runtime_kv_blocks", state="used") for r in runtimes) == 0
        and sum(series(metrics(r), "vllm:request_success_total", finished_reason="abort")
                for r in runtimes) == aborted_before + 1))
    check(True, "closing the stream aborted the sequence: 0 blocks used, 0 kv-cache bytes leased")

    # Refusals reach the client through the gateway with runtime-service's message.
    try:
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=4)
        check(False, "an over-long prompt is refused")
    except openai.BadRequestError as err:
        check("accepts at most 8192" in str(err), f"over-long prompt: {err.status_code} {err.message}")
    try:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, logprobs=2)
        check(False, "logprobs is refused")
    except openai.BadRequestError as err:
        check("logprobs" in str(err), f"logprobs: {err.status_code} {err.message}")


def write_manifest(path, urls):
    """The gateway's discovery file, replaced atomically so it never reads half of one."""
    with open(path + ".tmp", "w") as f:
        json.dump({"version": 1, "workers": [{"url": u} for u in urls]}, f)
    os.replace(path + ".tmp", path)


def discovery_checks(urls):
    import openai

    manifest = os.path.join(ROOT, "target", "tools", "gateway-workers.json")
    write_manifest(manifest, urls[:1])
    gateway = Gateway(discovery_file=manifest, log_name="smg-discovery")
    try:
        gateway.wait_workers(urls[:1])
        check(True, f"file discovery: the gateway picked up {urls[0]}")
        write_manifest(manifest, urls)
        gateway.wait_workers(urls)
        check(True, f"file discovery: {urls[1]} added to the file is picked up")
        write_manifest(manifest, urls[1:])
        gateway.wait_workers(urls[1:])
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                               timeout=WITHIN_S)
        reply = client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
        check(reply.usage.completion_tokens == 3,
              f"file discovery: {urls[0]} removed from the file is dropped; {urls[1]} still serves")
    finally:
        gateway.stop()


def readme_block(readme):
    """The command lines of the README's gateway block (continuations joined, comments cut)."""
    text = open(readme, encoding="utf-8").read()
    match = re.search(r"<!-- walkthrough:gateway -->\s*```[a-z]*\n(.*?)```", text, re.S)
    if not match:
        sys.exit(f"no walkthrough block named 'gateway' in {readme}")
    lines = []
    for line in match.group(1).replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def readme_walkthrough(memory_bin, runtime_bin):
    """Runs the README's gateway block as a user would, with its binaries on PATH and each fixed
    port it names moved to a free one (so it runs beside anything); the chat stream it prints
    must carry tokens and end. Setup lines (tools, build, PATH) are done by scripts/test."""
    ports = {port: free_port() for port in (50051, 50052, 50062, 9475, 30000)}
    bin_dir = tempfile.mkdtemp(prefix="gateway-walkthrough-")
    for name, path in (("memory-service", memory_bin), ("runtime-service", runtime_bin), ("smg", SMG)):
        os.symlink(os.path.abspath(path), os.path.join(bin_dir, name))
    # The first runtime takes its default addresses: the environment moves them.
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RUST_LOG="warn",
               MEMORY_LISTEN=f"127.0.0.1:{ports[50051]}", MEMORY_ADMIN_LISTEN="127.0.0.1:0",
               RUNTIME_LISTEN=f"127.0.0.1:{ports[50052]}", RUNTIME_ADMIN_LISTEN="127.0.0.1:0",
               RUNTIME_MEMORY_ADDR=f"http://127.0.0.1:{ports[50051]}")
    background, output = [], None
    log = open(os.path.join(ROOT, "target", "tools", "gateway-walkthrough.log"), "w")
    try:
        for line in readme_block(os.path.join(ROOT, "README.md")):
            if line.startswith(("scripts/tools.sh", "export PATH=")):
                continue
            for old, new in ports.items():
                line = re.sub(rf"(?<=[:\s]){old}\b", str(new), line)
            command = line.split()[0]
            if command not in ("memory-service", "runtime-service", "smg", "until", "curl"):
                sys.exit(f"the README's gateway block runs {command!r}, which this check does not know")
            if line.endswith("&"):
                line = line[:-1].strip()
                if command == "smg":  # its metrics port is not in the README: keep it off 29000
                    line += f" --prometheus-host 127.0.0.1 --prometheus-port {free_port()}"
                print(f"$ {line} &", flush=True)
                background.append(subprocess.Popen(["bash", "-c", f"exec {line}"], env=env,
                                                   stdout=log, stderr=subprocess.STDOUT))
            else:
                print(f"$ {line}", flush=True)
                result = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True,
                                        timeout=WITHIN_S)
                if result.returncode != 0:
                    check(False, f"{command} exited with {result.returncode}: {result.stderr}")
                output = result.stdout
    finally:
        for process in reversed(background):
            process.terminate()
        for process in background:
            try:
                process.wait(timeout=WITHIN_S)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()
        shutil.rmtree(bin_dir, ignore_errors=True)
    chunks = [json.loads(l[len("data: "):]) for l in (output or "").splitlines()
              if l.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    # Unseeded: the model may end its reply before max_tokens ("stop").
    ended = [r for r in reasons if r]
    check(bool(text) and ended in (["length"], ["stop"]) and (output or "").rstrip().endswith("data: [DONE]"),
          f"the README's gateway block streamed {text!r} and ended ({ended}, [DONE])")


def main():
    memory_bin, runtime_bin = sys.argv[1:3]
    if not os.access(SMG, os.X_OK):
        sys.exit(f"{SMG} is missing: run scripts/tools.sh")
    stubs = os.path.join(ROOT, "target", "examples", "python")
    subprocess.run(["bash", "examples/python/generate.sh", stubs], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHON=sys.executable), stdout=subprocess.DEVNULL)
    # The engine dialect's stubs too: the cache-aware check reads KV events as the gateway does.
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_out={stubs}",
                    f"--grpc_python_out={stubs}", "proto/vllm/grpc/engine/vllm_engine.proto",
                    "proto/smg/grpc/common/common.proto"], cwd=ROOT, check=True)
    sys.path.insert(0, stubs)
    readme_walkthrough(memory_bin, runtime_bin)
    servers, gateway = [], None
    try:
        servers.append(start_server([memory_bin, "--pool", POOLS]))
        memory = servers[0]
        for _ in range(2):
            servers.append(start_server([runtime_bin, "--memory-addr", f"http://{memory[1]}"]))
        runtimes = [s[0] for s in servers[1:]]
        addresses = [s[1] for s in servers[1:]]
        for address in addresses:
            wait_serving(address)
        urls = [f"grpc://{a}" for a in addresses]
        gateway = Gateway(workers=urls)
        gateway.wait_workers(urls)
        openai_checks(gateway, runtimes, memory[0], runtime_v1(addresses[0]))
        gateway.stop()
        gateway = None
        discovery_checks(urls)
        code = stop_servers(servers)
        servers = []
        if code != 0:
            sys.exit(f"a server exited with {code} after SIGTERM")
        cache_aware_checks(memory_bin, runtime_bin)
    finally:
        if gateway:
            gateway.stop()
        code = stop_servers(servers)
    if code != 0:
        sys.exit(f"a server exited with {code} after SIGTERM")
    print("gateway: the openai client through smg to two runtimes OK, file discovery OK, "
          "cache-aware routing follows the KV events")


if __name__ == "__main__":
    main()
