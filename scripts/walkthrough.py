#!/usr/bin/env python3
"""Runs the README's grpcurl walk-through against a live server, through gRPC reflection.

grpcurl cannot be installed here, so each `grpcurl` line of the README block that follows the
`<!-- walkthrough:NAME -->` marker is executed by this script instead: `list`, `describe` and
method calls (unary and server-streaming) resolved through the server's reflection service
(v1alpha, the version Python's grpcio-reflection speaks). Any failed call fails the script, so the
README cannot drift from the API.

Usage: walkthrough.py README.md NAME EXPECTED_EVENT_KINDS SERVER [ARGS...] [-- SERVER [ARGS...]]...

EXPECTED_EVENT_KINDS is a comma-separated list of event kinds every WatchEvents call of the block
must have received (the README says what the watch terminal shows; this keeps it honest); empty
for none.

Servers are started in order on 127.0.0.1:0, each address read from the server's "listening" log
line; every server after the first gets `--memory-addr http://<first server>`. The commands go to
the last server, once its health reports SERVING. At the end every server is stopped with
SIGTERM, in reverse order, and must exit 0 (graceful shutdown).
"""

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading

import grpc
from google.protobuf import descriptor_pb2, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

TIMEOUT_S = 10


def walkthrough_lines(readme, name):
    """The grpcurl command lines of the fenced block after the marker (continuations joined)."""
    text = open(readme, encoding="utf-8").read()
    match = re.search(r"<!-- walkthrough:%s -->\s*```[a-z]*\n(.*?)```" % re.escape(name), text, re.S)
    if not match:
        sys.exit(f"no walkthrough block named {name!r} in {readme}")
    joined = match.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("grpcurl ")]


class Client:
    def __init__(self, target):
        self.channel = grpc.insecure_channel(target)
        self.db = ProtoReflectionDescriptorDatabase(self.channel)
        self.pool = DescriptorPool(self.db)
        self.streams = []
        self.last_response = {}

    def run(self, line, real_target):
        args = shlex.split(line)[1:]
        data = None
        rest = []
        i = 0
        while i < len(args):
            if args[i] == "-plaintext":
                i += 1
            elif args[i] == "-d":
                data = args[i + 1]
                i += 2
            else:
                rest.append(args[i])
                i += 1
        _target, *command = rest
        if command[0] == "list":
            services = self.db.get_services()
            print("\n".join(services))
            if len(command) > 1:
                service = self.pool.FindServiceByName(command[1])
                print("\n".join(m.full_name for m in service.methods))
            return
        if command[0] == "describe":
            symbol = command[1]
            file = self.pool.FindFileContainingSymbol(symbol)
            short = symbol.rsplit(".", 1)[-1]
            desc = file.services_by_name.get(short) or file.message_types_by_name.get(short)
            if desc is None:
                sys.exit(f"describe {symbol}: not a service or message")
            proto = (descriptor_pb2.ServiceDescriptorProto() if hasattr(desc, "methods")
                     else descriptor_pb2.DescriptorProto())
            desc.CopyToProto(proto)
            print(f"{symbol} ({file.name}):")
            print(proto)
            return
        self.call(command[0], data or "{}")

    def call(self, path, data):
        service_name, method_name = path.split("/")
        method = self.pool.FindServiceByName(service_name).methods_by_name[method_name]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        if "<lease_id>" in data:
            data = data.replace("<lease_id>", self.last_response["Allocate"]["leases"][0]["leaseId"])
        request = json_format.Parse(data, request_cls())
        rpc_path = f"/{service_name}/{method_name}"
        ser, de = request_cls.SerializeToString, response_cls.FromString
        if method.server_streaming and method_name != "WatchEvents":
            # A finite stream (Generate): print every message as it arrives.
            for message in self.channel.unary_stream(rpc_path, ser, de)(request, timeout=TIMEOUT_S * 6):
                print(json.dumps(json_format.MessageToDict(message)))
            return
        if method.server_streaming:
            call = self.channel.unary_stream(rpc_path, ser, de)(request, timeout=TIMEOUT_S * 6)
            received = []
            # Headers arrive once the server has subscribed: later calls' events cannot be missed.
            call.initial_metadata()
            thread = threading.Thread(target=self.drain, args=(call, received), daemon=True)
            thread.start()
            self.streams.append((method_name, call, received, thread))
            print(f"(streaming {method_name} in the background)")
            return
        response = self.channel.unary_unary(rpc_path, ser, de)(request, timeout=TIMEOUT_S)
        as_json = json_format.MessageToDict(response)
        self.last_response[method_name] = as_json
        print(json.dumps(as_json, indent=2))

    @staticmethod
    def drain(call, received):
        try:
            for message in call:
                received.append(json_format.MessageToDict(message))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                received.append({"error": str(err.code())})

    def finish_streams(self, expected_kinds):
        def kinds(received):
            return {r.get("event", {}).get("kind", "?") for r in received}

        for name, call, received, thread in self.streams:
            # Bounded wait for the events the walk-through caused to arrive, then hang up.
            for _ in range(TIMEOUT_S * 100):
                if expected_kinds <= kinds(received) or not thread.is_alive():
                    break
                thread.join(0.01)
            call.cancel()
            thread.join(TIMEOUT_S)
            errors = [r for r in received if "error" in r]
            if errors or not expected_kinds <= kinds(received):
                sys.exit(f"{name}: expected kinds {sorted(expected_kinds)}, got {received}")
            print(f"{name} received {len(received)} items: {', '.join(sorted(kinds(received)))}")


def wait_serving(target):
    """Blocks on a health Watch stream until the server reports SERVING (no polling)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S * 6):
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
    sys.exit(f"{target} never became SERVING")


def start_server(command, quiet=False):
    """Starts the server on an ephemeral loopback port; returns (process, address). Its log is
    echoed to stderr unless `quiet`."""
    # Pinned log settings: the address is read from the text "listening" line, whatever the
    # caller's environment says.
    env = dict(os.environ, RUST_LOG="info", LOG_FORMAT="text")
    server = subprocess.Popen(
        command + ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    found = queue.Queue()
    admin = queue.Queue()

    def read():
        for line in server.stderr:  # blocks until the server logs; no polling
            if not quiet:
                sys.stderr.write(line)
            match = re.search(r"listening addr=(\S+)", line)
            if match:
                found.put(match.group(1))
            match = re.search(r"metrics on /metrics addr=(\S+)", line)
            if match:
                admin.put(match.group(1))
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        addr = found.get(timeout=TIMEOUT_S * 6)
    except queue.Empty:
        server.kill()
        sys.exit(f"{command[0]} did not log its address within {TIMEOUT_S * 6} s")
    if addr is None:
        sys.exit(f"server exited with {server.wait()} before listening")
    server.admin = admin  # the admin address arrives on this queue (see admin_address)
    return server, addr


def admin_address(server):
    """The server's metrics address, from its log (it is logged before it listens for gRPC);
    read once, then remembered."""
    if not hasattr(server, "admin_addr"):
        server.admin_addr = server.admin.get(timeout=TIMEOUT_S)
    return server.admin_addr


def stop_servers(servers):
    """SIGTERM each server, the last started first; the first non-zero exit code, or 0."""
    code = 0
    for server, _ in reversed(servers):
        server.send_signal(signal.SIGTERM)
        code = code or server.wait(timeout=30)
    return code


def main():
    readme, name, expected, *rest = sys.argv[1:]
    expected_kinds = {f"EVENT_KIND_{k.strip().upper()}" for k in expected.split(",") if k.strip()}
    commands = [[]]
    for arg in rest:
        if arg == "--":
            commands.append([])
        else:
            commands[-1].append(arg)
    lines = walkthrough_lines(readme, name)
    if not lines:
        sys.exit("walkthrough block has no grpcurl lines")
    servers = []
    try:
        for command in commands:
            if servers:
                command = command + ["--memory-addr", f"http://{servers[0][1]}"]
            servers.append(start_server(command))
        target = servers[-1][1]
        wait_serving(target)
        client = Client(target)
        for line in lines:
            print(f"$ {line}")
            try:
                client.run(line, target)
            except grpc.RpcError as err:
                sys.exit(f"FAILED: {line}\n{err.code()}: {err.details()}")
        client.finish_streams(expected_kinds)
        client.channel.close()
    finally:
        code = stop_servers(servers)
    if code != 0:
        sys.exit(f"a server exited with {code} after SIGTERM")
    print(f"walkthrough {name!r}: {len(lines)} commands OK, servers stopped cleanly")


if __name__ == "__main__":
    main()
