#!/usr/bin/env python3
"""Runs the example clients in examples/ (Python on generated stubs, Node with grpc-js) against
real servers: memory-service and runtime-service started on 127.0.0.1:0 as in the walk-through,
stopped with SIGTERM at the end; then lints both services' /metrics with promtool. Any client
step or lint problem fails the script.

Usage: clients.py MEMORY_SERVICE RUNTIME_SERVICE   (paths to the binaries)
Tools come from target/tools (scripts/tools.sh): the Python venv running this script, and node
modules under target/tools/node.
"""

import os
import re
import subprocess
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from walkthrough import admin_address, start_server, stop_servers, wait_serving  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# runtime-service also exports vLLM's series under vLLM's own names (routers and autoscalers match
# them exactly), and promtool's lint reserves ':' for recording rules: that one finding is expected
# for them, as it is on vLLM's own /metrics. Any other finding, or a parse error, fails.
VLLM_NAME = re.compile(r"^vllm:[a-zA-Z0-9_:]+ metric names should not contain ':'$")


def promtool_findings(promtool, page):
    """promtool's findings on a /metrics page, less the expected one for vLLM's names."""
    result = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True)
    lines = (result.stdout + result.stderr).decode().splitlines()
    unexpected = [line for line in lines if line.strip() and not VLLM_NAME.match(line)]
    # Exit 3 is "lint problems"; anything else non-zero is a page promtool could not read.
    if result.returncode not in (0, 3):
        unexpected.append(f"promtool exited with {result.returncode}")
    return unexpected


def run(command, env):
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, env=env, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"FAILED: {' '.join(command)} exited with {result.returncode}")


def main():
    memory_bin, runtime_bin = sys.argv[1:3]
    stubs = os.path.join(ROOT, "target", "examples", "python")
    run(["bash", "examples/python/generate.sh", stubs], dict(os.environ, PYTHON=sys.executable))
    servers = []
    try:
        servers.append(start_server([memory_bin]))
        memory = servers[0][1]
        servers.append(start_server([runtime_bin, "--memory-addr", f"http://{memory}"]))
        runtime = servers[1][1]
        wait_serving(runtime)
        run([sys.executable, "examples/python/client.py", memory, runtime], dict(os.environ, PYTHONPATH=stubs))
        node_path = os.path.join(ROOT, "target", "tools", "node", "node_modules")
        run(["node", "examples/node/client.js", memory, runtime], dict(os.environ, NODE_PATH=node_path))
        # After real traffic, both /metrics pages pass promtool's lint (names, units, types).
        promtool = os.path.join(ROOT, "target", "tools", "promtool", "usr", "bin", "promtool")
        for server, _ in servers:
            page = urllib.request.urlopen(f"http://{admin_address(server)}/metrics", timeout=10).read()
            unexpected = promtool_findings(promtool, page)
            if unexpected:
                sys.exit("promtool check metrics failed:\n" + "\n".join(unexpected))
        print("promtool check metrics: both services OK (vllm:* names carry vLLM's ':')")
    finally:
        code = stop_servers(servers)
    if code != 0:
        sys.exit(f"a server exited with {code} after SIGTERM")
    print("example clients: Python and Node OK, servers stopped cleanly")


if __name__ == "__main__":
    main()
