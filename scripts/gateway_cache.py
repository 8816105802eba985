"""The gateway's cache-aware routing follows runtime-service's KV events (scripts/gateway.py
runs this after its OpenAI checks).

Two runtimes share a small kv-cache pool behind `smg --policy cache_aware`. A prompt is sent to
runtime Y directly (not through the gateway), so only Y's KV events can tell the gateway that Y
holds it: requests through the gateway that start with that prompt then all land on Y and report
its cached tokens. Y's cache is then pushed out by other prompts (LRU eviction), the same prompt
is sent to X directly, and the gateway follows the events to X.
"""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))
from smg_gateway import MODEL, WITHIN_S, Gateway, check, metrics, poll, series  # noqa: E402
from walkthrough import admin_address, start_server, stop_servers, wait_serving  # noqa: E402

# 256 blocks of llama-3.1-8b (2 MiB each) for both runtimes: a few 600-token prompts fill it.
POOLS = "kv-cache=512MiB,activations=1GiB,uniforms=32GiB"
WORDS = ("the a this every each one our their fast small large shared pinned idle warm cold stable "
         "model token cache kernel buffer pipeline scheduler tensor batch stream engine pool "
         "computes prepares streams holds frees returns reads writes shapes guards").split()


def prompt(seed, words=600):
    """A prompt of the model's own words (one token each), distinct from its first words on."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def direct(address):
    """Generates on one runtime through runtime.v1, bypassing the gateway."""
    import grpc
    from runtime.v1 import runtime_pb2, runtime_pb2_grpc

    stub = runtime_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(address))

    def generate(text):
        for item in stub.Generate(runtime_pb2.GenerateRequest(model=MODEL, prompt=text, max_tokens=2)):
            if item.HasField("summary"):
                return item.summary
        return None

    return generate


def sent(runtime):
    return series(metrics(runtime), "runtime_kv_event_batches_sent_total")


def served(runtime):
    return series(metrics(runtime), "vllm:request_success_total")


def prime(runtime, address, text):
    """Caches `text` on `runtime` directly and waits until its KV events left for the gateway."""
    before = sent(runtime)
    summary = direct(address)(text)
    check(summary is not None and summary.cached_tokens == 0, f"{address} computed the prompt itself")
    poll(f"{address}'s KV events sent to the gateway", lambda: sent(runtime) > before)


def route(client, runtimes, text, expect, what):
    """Sends three requests starting with `text` through the gateway; all must land on
    runtimes[expect] with the prefix cached there."""
    before = [served(r) for r in runtimes]
    cached = []
    for i in range(3):
        reply = client.completions.create(model=MODEL, prompt=f"{text} and {WORDS[i]}", max_tokens=2)
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
    landed = [served(r) - b for r, b in zip(runtimes, before)]
    wanted = [3.0 if i == expect else 0.0 for i in range(len(runtimes))]
    check(landed == wanted and all(c >= 512 for c in cached),
          f"{what}: the gateway sent all three to the runtime holding the prefix {landed}, "
          f"{cached} prompt tokens cached")


class KvEvents:
    """A runtime's KV event stream (SubscribeKvEvents), read as the gateway reads it."""

    def __init__(self, address):
        import grpc
        from smg.grpc.common import common_pb2
        from vllm.grpc.engine import vllm_engine_pb2_grpc

        stub = vllm_engine_pb2_grpc.VllmEngineStub(grpc.insecure_channel(address))
        request = common_pb2.SubscribeKvEventsRequest(start_sequence_number=0)
        self.batches = stub.SubscribeKvEvents(request, timeout=WITHIN_S * 2)
        next(self.batches)  # the snapshot of what it holds now

    def stored(self, count):
        """Hashes of the next `count` blocks stored."""
        hashes = []
        while len(hashes) < count:
            for event in next(self.batches).events:
                if event.HasField("stored"):
                    hashes.extend(b.block_hash for b in event.stored.blocks)
        return hashes[:count]

    def wait_removed(self, block_hash):
        """Reads on until `block_hash` is removed (bounded by the stream's deadline)."""
        for batch in self.batches:
            for event in batch.events:
                if event.HasField("removed") and block_hash in event.removed.block_hashes:
                    return True
        return False


def cache_aware_checks(memory_bin, runtime_bin):
    import openai

    servers, gateway = [], None
    try:
        servers.append(start_server([memory_bin, "--pool", POOLS], quiet=True))
        for _ in range(2):
            servers.append(start_server([runtime_bin, "--memory-addr", f"http://{servers[0][1]}",
                                         "--kv-slab-blocks", "16"], quiet=True))
        runtimes = [s[0] for s in servers[1:]]
        addresses = [s[1] for s in servers[1:]]
        for address in addresses:
            wait_serving(address)
        urls = [f"grpc://{a}" for a in addresses]
        gateway = Gateway(workers=urls, log_name="smg-cache-aware", policy="cache_aware")
        gateway.wait_workers(urls)
        subscribed = lambda r: series(metrics(r), "grpc_server_started_total", grpc_method="SubscribeKvEvents")  # noqa: E731
        poll("the gateway following both runtimes' KV events", lambda: all(subscribed(r) >= 1 for r in runtimes))
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=WITHIN_S)
        x, y = 0, 1
        shared = prompt(1)
        events = KvEvents(addresses[y])
        prime(runtimes[y], addresses[y], shared)
        first = events.stored(1)[0]
        route(client, runtimes, shared, y, "after the prompt was cached on Y alone")
        # Other prompts push it out of Y's cache (the pool holds about six of them, LRU).
        for seed in range(2, 12):
            direct(addresses[y])(prompt(seed))
        check(events.wait_removed(first), "Y evicted the shared prompt's first block and said so")
        prime(runtimes[x], addresses[x], shared)
        route(client, runtimes, shared, x, "after Y evicted it and X cached it")
    finally:
        if gateway:
            gateway.stop()
        stop_servers(servers)
