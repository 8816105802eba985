#!/usr/bin/env python3
"""A Python client of both services, on stubs generated from proto/ (see generate.sh).

It allocates kv-cache and activations atomically in a scope, watches the events, renews the scope
over KeepAlive, provokes a RESOURCE_EXHAUSTED and prints its RetryInfo, frees the scope, streams a
Generate, cancels another, and prints an INVALID_ARGUMENT's BadRequest. Exits non-zero if any step
does not behave as documented.

Usage: client.py MEMORY_ADDR RUNTIME_ADDR   (stubs on PYTHONPATH, e.g. target/examples/python)
"""

import sys
import threading

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from memory.v1 import memory_pb2, memory_pb2_grpc
from runtime.v1 import runtime_pb2, runtime_pb2_grpc

MIB = 1 << 20
SCOPE = "python-example"


def details(err, kind):
    """The first google.rpc detail of type `kind` in the status of a failed call."""
    status = rpc_status.from_call(err)
    for any_detail in status.details if status else []:
        if any_detail.Is(kind.DESCRIPTOR):
            detail = kind()
            any_detail.Unpack(detail)
            return detail
    return None


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")
    print(f"ok  {what}")


def main(memory_addr, runtime_addr):
    memory = memory_pb2_grpc.MemoryServiceStub(grpc.insecure_channel(memory_addr))
    runtime = runtime_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(runtime_addr))

    # Watch events in the background, from before the first allocation.
    events = memory.WatchEvents(memory_pb2.WatchEventsRequest())
    seen = []
    watching = threading.Event()

    def watch():
        try:
            for item in events:
                watching.set()
                if item.HasField("event") and item.event.scope_id == SCOPE:
                    seen.append(memory_pb2.EventKind.Name(item.event.kind))
        except grpc.RpcError:
            pass  # cancelled at the end

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # The stream is open once an event arrives: allocate and free a probe until one does
    # (bounded), so no event of the steps below can come before the watch is in place.
    for _ in range(50):
        probe = memory.Allocate(memory_pb2.AllocateRequest(
            items=[memory_pb2.AllocationItem(pool="kv-cache", size_bytes=1)], holder="python-example"))
        memory.Free(memory_pb2.FreeRequest(lease_id=probe.leases[0].lease_id))
        if watching.wait(timeout=0.02):
            break
    check(watching.is_set(), "WatchEvents is streaming")

    # Atomic: both items or neither.
    granted = memory.Allocate(memory_pb2.AllocateRequest(
        items=[memory_pb2.AllocationItem(pool="kv-cache", size_bytes=64 * MIB),
               memory_pb2.AllocationItem(pool="activations", size_bytes=8 * MIB)],
        holder="python-example", scope_id=SCOPE, ttl=duration_pb2.Duration(seconds=30)))
    check(len(granted.leases) == 2, f"Allocate granted {len(granted.leases)} leases atomically")

    # One KeepAlive message renews the whole scope; the reply counts its leases.
    reply = next(memory.KeepAlive(iter([memory_pb2.KeepAliveRequest(scope_ids=[SCOPE])])))
    check(reply.renewed_count == 2, f"KeepAlive renewed {reply.renewed_count} leases of the scope")

    # A pool of its own, filled: one more byte, without waiting, is RESOURCE_EXHAUSTED with a
    # retry hint (a pool others use could free room between two calls).
    memory.CreatePool(memory_pb2.CreatePoolRequest(name="python-example", capacity_bytes=MIB))
    memory.Allocate(memory_pb2.AllocateRequest(
        items=[memory_pb2.AllocationItem(pool="python-example", size_bytes=MIB)],
        holder="python-example", scope_id=SCOPE))
    try:
        memory.Allocate(memory_pb2.AllocateRequest(
            items=[memory_pb2.AllocationItem(pool="python-example", size_bytes=1)], holder="python-example"))
        check(False, "an Allocate beyond the available bytes is refused")
    except grpc.RpcError as err:
        retry = details(err, error_details_pb2.RetryInfo)
        check(err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry is not None,
              f"RESOURCE_EXHAUSTED, retry in {retry.retry_delay.ToMilliseconds() if retry else '?'} ms")

    freed = memory.FreeScope(memory_pb2.FreeScopeRequest(scope_id=SCOPE))
    check(freed.freed_leases == 3, f"FreeScope freed {freed.freed_leases} leases")

    # A generation, streamed.
    text, summary = [], None
    for item in runtime.Generate(runtime_pb2.GenerateRequest(
            model="distilgpt2", prompt="Tell me about memory", max_tokens=12, seed=7)):
        if item.HasField("token"):
            text.append(item.token.text)
        else:
            summary = item.summary
    check(summary is not None and summary.completion_tokens == 12,
          f"Generate streamed {''.join(text)!r}, TPOT "
          f"{summary.time_per_output_token.ToMicroseconds() / 1000 if summary else 0:.2f} ms")

    # Another, cancelled after its first token.
    stream = runtime.Generate(runtime_pb2.GenerateRequest(
        model="llama-3.1-8b", prompt="A long story", max_tokens=1000, request_id="python-cancel"))
    next(stream)
    runtime.Cancel(runtime_pb2.CancelRequest(request_id="python-cancel"))
    try:
        for _ in stream:
            pass
        check(False, "a cancelled stream ends with CANCELLED")
    except grpc.RpcError as err:
        check(err.code() == grpc.StatusCode.CANCELLED, f"Cancel ended the stream with {err.code().name}")

    # Every violation of a request, listed in BadRequest.
    try:
        for _ in runtime.Generate(runtime_pb2.GenerateRequest(
                model="distilgpt2", prompt="hi", max_tokens=0, temperature=3.0, top_p=2.0)):
            pass
        check(False, "a bad request is refused")
    except grpc.RpcError as err:
        bad = details(err, error_details_pb2.BadRequest)
        fields = [v.field for v in bad.field_violations] if bad else []
        check(err.code() == grpc.StatusCode.INVALID_ARGUMENT and fields == ["max_tokens", "temperature", "top_p"],
              f"INVALID_ARGUMENT with BadRequest violations {fields}")

    events.cancel()
    watcher.join(timeout=5)
    check({"EVENT_KIND_ALLOCATED", "EVENT_KIND_RENEWED", "EVENT_KIND_FREED"} <= set(seen),
          f"WatchEvents saw {sorted(set(seen))} for the scope")
    print("python client: all steps OK")


if __name__ == "__main__":
    main(*sys.argv[1:3])
