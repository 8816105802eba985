"""Starting the Shepherd Model Gateway (smg, from target/tools/gateway) in front of runtimes, and
reading the services' /metrics: shared by the gateway test (gateway.py) and the demo's last leg
(gateway_demo.py)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from walkthrough import admin_address  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMG = os.path.join(ROOT, "target", "tools", "gateway", "bin", "smg")
MODEL = "llama-3.1-8b"
# Bound on every poll: far beyond what a healthy gateway or runtime needs.
WITHIN_S = 60


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        raise SystemExit(f"gateway test failed: {what}")


def free_port():
    """A loopback port nothing listens on now. smg takes ports, not a listener, so this is the
    one place a port is chosen before its server binds; the window is small and loopback-only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(what, probe):
    """Calls `probe` until it returns a true value, for at most WITHIN_S; returns that value."""
    deadline = time.monotonic() + WITHIN_S
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except OSError as err:  # not listening yet, connection reset
            last = err
        time.sleep(0.1)
    raise SystemExit(f"gateway test failed: {what} not within {WITHIN_S} s (last: {last!r})")


def http_json(url):
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


def metrics(server):
    """The runtime's or memory-service's /metrics as {series: value}."""
    page = urllib.request.urlopen(f"http://{admin_address(server)}/metrics", timeout=10).read().decode()
    values = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def series(values, name, **labels):
    """Sum of the series `name` whose labels include `labels`."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


class Gateway:
    """An smg process routing to gRPC workers, given by URL or by a discovery file."""

    def __init__(self, workers=None, discovery_file=None, log_name="smg", policy="round_robin"):
        self.port = free_port()
        args = [SMG, "launch", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(self.port),
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
                "--policy", policy, "--log-level", "warn"]
        if workers:
            args += ["--worker-urls", *workers]
        else:
            args += ["--discovery-provider", "file", "--discovery-file", discovery_file,
                     "--discovery-check-interval-secs", "1"]
        self.log = open(os.path.join(ROOT, "target", "tools", f"{log_name}.log"), "w")
        # No network: the tokenizer must come from the runtime (GetTokenizer), never from a hub.
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def workers(self):
        """URLs of the workers the gateway routes to (registered, healthy and ready)."""
        listed = http_json(f"{self.url}/workers").get("workers", [])
        return sorted(w["url"] for w in listed if w.get("is_healthy") and w.get("status") == "ready")

    def wait_workers(self, expected):
        expected = sorted(expected)

        def probe():
            if self.process.poll() is not None:
                raise SystemExit(f"smg exited with {self.process.returncode}; see {self.log.name}")
            return self.workers() == expected

        poll(f"gateway routing to {expected}", probe)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=WITHIN_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
