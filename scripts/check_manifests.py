#!/usr/bin/env python3
"""Checks that rendered Kubernetes manifests agree with the binaries they run.

For every memory-service and runtime-service container of a `kubectl kustomize` render:
  - every MEMORY_* / RUNTIME_* / LOG_FORMAT variable it sets is one the binary reads (its --help);
  - the gRPC and metrics ports of the *_LISTEN variables are the ports the container declares,
    the ports its probes ask, and the port the Prometheus annotation names;
  - probes are gRPC probes of the gRPC port or HTTP probes of the admin port (/readyz, /livez);
    readiness asks for the service the binary reports (memory.v1.MemoryService,
    runtime.v1.RuntimeService) or /readyz; a server with TLS on (*_TLS_CERT) has no gRPC probe
    (the kubelet's gRPC probes speak no TLS);
  - every TLS or token file a variable names is in a mounted volume;
  - runtime-service's --memory-addr port is the one memory-service listens on;
  - every ConfigMap a container refers to (envFrom, volumes) is in the render;
  - every object is in the render's one namespace, and every container but the gateway's runs
    from one tagged image (the project's: both binaries and their helpers);
  - the pools memory-service creates on a node (asked of the binary itself, `--print-pools`, with
    the container's settings) hold the weights and activations of the runtimes scheduled there
    (`runtime-service --print-memory`, with its settings and its mounted config file): one per
    node when a required anti-affinity or a sidecar says so, else every replica (one node), plus
    a rolling update's surge pods beside them;
  - the gateway, where a layout runs one (smg, from its own pinned image), agrees with the
    runtimes and with smg itself: scripts/check_gateway.py.

Usage: check_manifests.py RENDERED.yaml MEMORY_SERVICE RUNTIME_SERVICE [SMG_PYTHON]
  SMG_PYTHON: the python of the venv smg is installed in (target/tools/gateway/bin/python), which
  checks the gateway's arguments; needed only by layouts that run the gateway.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

import check_gateway

SERVICES = {"memory-service": "memory.v1.MemoryService", "runtime-service": "runtime.v1.RuntimeService"}
PREFIX = {"memory-service": "MEMORY_", "runtime-service": "RUNTIME_"}
problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def env_of(container, config_maps):
    """The container's variables: values where the manifest gives them, None for valueFrom."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(config_maps.get(source.get("configMapRef", {}).get("name"), {}))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def binary_help(binary):
    return subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout


def ask(binary, flag, env, files):
    """Runs the binary with `flag` and only the container's own settings; parses its JSON.

    Paths of TLS and token files (mounted Secrets, absent here) are passed as they are:
    --print-pools and --print-memory check how they combine (a certificate without its key, a
    memory CA with an http:// address) but read none of them.
    """
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(env)
        for var, (path, text) in files.items():
            local = os.path.join(tmp, os.path.basename(path))
            with open(local, "w", encoding="utf-8") as f:
                f.write(text)
            env[var] = local
        clean = {k: v for k, v in env.items() if k.startswith(("MEMORY_", "RUNTIME_")) and v is not None}
        clean["PATH"] = os.environ.get("PATH", "")
        out = subprocess.run([binary, flag], capture_output=True, text=True, env=clean)
        if out.returncode != 0:
            raise RuntimeError(f"{os.path.basename(binary)} {flag}: {out.stderr.strip()}")
        return json.loads(out.stdout)


def mounted_files(pod, container, config_maps, env):
    """Config files the container reads through a *_CONFIG variable from a mounted ConfigMap."""
    files = {}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for var, path in env.items():
        if not var.endswith("_CONFIG"):
            continue
        for mount in container.get("volumeMounts", []):
            if path.startswith(mount["mountPath"].rstrip("/") + "/"):
                source = volumes.get(mount["name"], {}).get("configMap", {}).get("name")
                name = path[len(mount["mountPath"].rstrip("/")) + 1:]
                if name in config_maps.get(source, {}):
                    files[var] = (path, config_maps[source][name])
        if var not in files:
            problem(var, f"{path} is not a file of a mounted ConfigMap")
    return files


# Variables naming a file of TLS material or tokens: MEMORY_TLS_CERT, RUNTIME_MEMORY_TLS_CA,
# MEMORY_AUTH_TOKENS, RUNTIME_MEMORY_TOKEN_FILE, ...
SECRET_FILE = re.compile(r"_(TLS_CERT|TLS_KEY|TLS_CA|TLS_CLIENT_CA|AUTH_TOKENS|TOKEN_FILE)$")


def check_secret_files(where, pod, container, env):
    """Every TLS or token file a variable names is under a mount of a Secret or ConfigMap volume."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for var, path in env.items():
        if not SECRET_FILE.search(var) or path is None:
            continue
        mounts = [m for m in container.get("volumeMounts", [])
                  if path.startswith(m["mountPath"].rstrip("/") + "/")]
        sources = [volumes.get(m["name"], {}) for m in mounts]
        if not any("secret" in v or "configMap" in v or "projected" in v for v in sources):
            problem(where, f"{var} names {path}, which is in no mounted Secret or ConfigMap volume")


def check_probes(where, service, container, env, ports):
    """Probes: gRPC on the gRPC port, or HTTP on the admin port (see the module docs)."""
    prefix = PREFIX[service]
    listen = env[f"{prefix}LISTEN"]
    admin = env.get(f"{prefix}ADMIN_LISTEN")
    # The admin port the kubelet can reach: not off, not loopback (the default is loopback).
    admin_port = port_of(admin) if admin and admin != "off" and not admin.startswith("127.") else None
    # The kubelet's gRPC probes speak plaintext HTTP/2 only: against a TLS port they always fail.
    # The server's own certificate only: RUNTIME_MEMORY_TLS_CERT is a client certificate.
    tls = env.get(f"{prefix}TLS_CERT") is not None
    paths = {"startupProbe": ("/readyz",), "readinessProbe": ("/readyz",), "livenessProbe": ("/readyz", "/livez")}
    for probe, allowed in paths.items():
        spec = container.get(probe, {})
        grpc, http = spec.get("grpc"), spec.get("httpGet")
        if grpc:
            if tls:
                problem(where, f"{probe} is a gRPC probe, but {prefix}TLS_CERT turns TLS on and the kubelet's "
                               f"gRPC probes speak no TLS: probe the admin port's {' or '.join(allowed)}")
            if grpc["port"] != port_of(listen):
                problem(where, f"{probe} asks port {grpc['port']}, the server listens on {port_of(listen)}")
        if http:
            # A named port is the container's port of that name.
            port = ports.get(http["port"], http["port"]) if isinstance(http["port"], str) else http["port"]
            if admin_port is None:
                problem(where, f"{probe} asks HTTP port {port}, but the admin port is {admin or 'loopback'}: "
                               f"set {prefix}ADMIN_LISTEN to 0.0.0.0:<port>")
            elif port != admin_port:
                problem(where, f"{probe} asks HTTP port {port}, the admin port is {admin_port}")
            if http.get("path") not in allowed:
                problem(where, f"{probe} asks {http.get('path')!r}, not {' or '.join(allowed)}")
            if http.get("scheme", "HTTP") != "HTTP":
                problem(where, f"{probe} uses {http['scheme']}; the admin port speaks plain HTTP")
    ready = container.get("readinessProbe", {})
    if ready.get("grpc") and ready["grpc"].get("service") != SERVICES[service]:
        problem(where, f"readinessProbe asks {ready['grpc'].get('service')!r}, not {SERVICES[service]!r}")
    if not ready.get("grpc") and not ready.get("httpGet") and not listen.startswith("127."):
        problem(where, "no readiness probe (gRPC on the gRPC port, or the admin port's /readyz)")


def main():
    rendered, memory_bin, runtime_bin = sys.argv[1:4]
    smg_python = sys.argv[4] if len(sys.argv) > 4 else None
    binaries = {"memory-service": memory_bin, "runtime-service": runtime_bin}
    helps = {name: binary_help(path) for name, path in binaries.items()}
    docs = [d for d in yaml.safe_load_all(open(rendered, encoding="utf-8")) if d]
    config_maps = {}
    for d in docs:
        if d["kind"] == "ConfigMap":
            # Generated names carry a hash suffix; workloads refer to the hashed name.
            config_maps[d["metadata"]["name"]] = d.get("data", {})
    # One namespace for everything: a Service, ConfigMap or policy left in `default` is invisible
    # to the pods it is meant for.
    namespaces = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    if len(namespaces) != 1:
        problem(rendered, f"expected one Namespace, found {namespaces}")
    for d in docs:
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") not in namespaces:
            problem(f"{d['kind']}/{d['metadata']['name']}", f"namespace {d['metadata'].get('namespace')!r} is not {namespaces}")
    images = set()

    found = {}  # service -> list of (workload, pod, container, env)
    for d in docs:
        if d["kind"] not in ("Deployment", "DaemonSet"):
            continue
        pod = d["spec"]["template"]["spec"]
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        for c in pod["containers"] + pod.get("initContainers", []):
            if not check_gateway.is_gateway(c):
                images.add(c.get("image", ""))
            service = os.path.basename(c.get("command", [""])[0])
            if service not in SERVICES:
                continue
            where = f"{d['kind']}/{d['metadata']['name']}/{service}"
            referenced = [s.get("configMapRef", {}).get("name") for s in c.get("envFrom", [])]
            referenced += [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
            for name in referenced:
                if name not in config_maps:
                    problem(where, f"refers to ConfigMap {name!r}, which the render does not contain")
            env = env_of(c, config_maps)
            found.setdefault(service, []).append((d, pod, c, env))
            for var in env:
                read = re.search(rf"\b{re.escape(var)}\b", helps[service])
                if (var.startswith(PREFIX[service]) or var == "LOG_FORMAT") and not read:
                    problem(where, f"{var} is not read by {service} (not in its --help)")
            listen = env.get(f"{PREFIX[service]}LISTEN")
            admin = env.get(f"{PREFIX[service]}ADMIN_LISTEN")
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            if listen is None:
                problem(where, f"{PREFIX[service]}LISTEN is not set (the default listens on loopback)")
                continue
            loopback = listen.startswith("127.")
            if not loopback and port_of(listen) not in ports.values():
                problem(where, f"listens on {port_of(listen)}, which is not a declared port")
            if admin and admin != "off" and port_of(admin) not in ports.values():
                problem(where, f"serves metrics on {port_of(admin)}, which is not a declared port")
            scraped = annotations.get("prometheus.io/port")
            if service == "runtime-service" and admin and admin != "off" and str(port_of(admin)) != scraped:
                problem(where, f"prometheus.io/port {scraped} is not {port_of(admin)}")
            check_probes(where, service, c, env, ports)
            check_secret_files(where, pod, c, env)

    if len(images) != 1 or ":" not in next(iter(images)):
        problem(rendered, f"the services run from {sorted(images)}: expected one tagged image")
    if set(found) != set(SERVICES):
        problem(rendered, f"expected both services, found {sorted(found)}")
    else:
        check_memory(found, binaries, config_maps)
        check_gateway.check(docs, namespaces[0], found["runtime-service"], smg_python, problem)
    check_gateway.check_tokens(docs, problem)
    if problems:
        sys.exit("manifest problems in %s:\n  %s" % (rendered, "\n  ".join(problems)))
    print(f"{os.path.basename(rendered)}: manifests agree with the binaries")


def check_memory(found, binaries, config_maps):
    memory_env = found["memory-service"][0][3]
    memory_port = port_of(memory_env["MEMORY_LISTEN"])
    pools = ask(binaries["memory-service"], "--print-pools", memory_env, {})["pools"]
    for workload, pod, c, env in found["runtime-service"]:
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        addr = env.get("RUNTIME_MEMORY_ADDR", "")
        if not re.search(rf":{memory_port}$", addr):
            problem(where, f"RUNTIME_MEMORY_ADDR {addr!r} does not reach memory-service's port {memory_port}")
        files = mounted_files(pod, c, config_maps, env)
        needs = ask(binaries["runtime-service"], "--print-memory", env, files)
        sidecar = any(
            os.path.basename(x.get("command", [""])[0]) == "memory-service"
            for x in pod["containers"] + pod.get("initContainers", [])
        )
        anti = pod.get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", [])
        one_per_node = sidecar or any(t.get("topologyKey") == "kubernetes.io/hostname" for t in anti)
        replicas = workload["spec"].get("replicas", 1)
        # A rolling update runs its surge pods beside the old ones: on one node, they need room too.
        rolling = workload["spec"].get("strategy", {}).get("rollingUpdate", {})
        surge = rolling.get("maxSurge", "25%")
        surge = -(-replicas * int(surge[:-1]) // 100) if isinstance(surge, str) else int(surge)
        per_node = (1 if sidecar else 1 + surge) if one_per_node else replicas + surge
        for pool, need in (("uniforms", needs["preload_weight_bytes"]), ("activations", needs["activation_bytes"])):
            if pools.get(pool, 0) < per_node * need:
                problem(where, f"{per_node} runtime(s) per node need {per_node * need} bytes of {pool}; "
                               f"memory-service's pool holds {pools.get(pool, 0)}")
        print(f"  {where}: {per_node} per node, {needs['preload_weight_bytes']} bytes of weights preloaded each; "
              f"uniforms {pools.get('uniforms')} bytes, activations {pools.get('activations')} bytes")


if __name__ == "__main__":
    main()
