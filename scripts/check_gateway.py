"""Checks a rendered layout's gateway (smg) against the runtimes it fronts and against smg itself.

A gateway is a container whose image is named `smg`. For each:
  - its image is tagged with the smg version installed in target/tools/gateway (the one its
    arguments are checked against), and its arguments parse with that smg's own parser;
  - it discovers workers through Kubernetes, in the layout's namespace (the Role is namespaced),
    with the vLLM dialect (--backend vllm), listening on all addresses;
  - its --selector selects the runtime pods and no other pod of the layout, and
    --service-discovery-port is runtime-service's gRPC port (RUNTIME_LISTEN), which speaks
    plaintext without tokens (smg dials gRPC workers without TLS or credentials);
  - its HTTP, metrics and probe ports are declared, the Prometheus annotation names the metrics
    port, the probes ask its probe or HTTP port (/readiness for readiness, /liveness or /health
    otherwise), /tmp is writable (tokenizers are unpacked there), and the pod's grace period is
    longer than smg's own;
  - its pod mounts an API token, and its ServiceAccount is bound by a RoleBinding to a Role that
    lets it list and watch pods, and nothing more;
  - a Service routes to its HTTP port;
  - the runtime pods are fenced by an ingress NetworkPolicy that admits the gateway's pods on the
    gRPC port, and a policy fencing the gateway still admits clients on its HTTP port.
And in every layout: no pod but the gateway's mounts an API token.
"""

import json
import re
import subprocess

PARSE = """
import importlib.metadata, json, sys
from smg.launch_router import parse_router_args
args = parse_router_args(sys.argv[1:])
args._validate_router_args()
fields = ("host", "port", "prometheus_port", "prometheus_host", "health_check_port", "backend",
          "selector", "service_discovery_port", "service_discovery_namespace",
          "shutdown_grace_period_secs")
out = {f: getattr(args, f) for f in fields}
out["discovery"] = args.selected_discovery_provider()
out["version"] = importlib.metadata.version("smg")
print(json.dumps(out, default=str))
"""
# What discovery needs of the API (a reflector: list, then watch); `get` is harmless, more is not.
DISCOVERY_VERBS = {"list", "watch"}
HARMLESS_VERBS = {"get", "list", "watch"}


def is_gateway(container):
    image = container.get("image", "")
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0] == "smg"


def pods_of(docs):
    """(workload, pod spec, pod labels) of every workload's pod template."""
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            template = d["spec"]["template"]
            yield d, template["spec"], template["metadata"].get("labels", {})


def selects(selector, labels):
    """A LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def expand(arg, env):
    """Kubernetes' $(VAR) expansion of container arguments (unknown references stay as written)."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1)) or m.group(0), arg)


def check_tokens(docs, problem):
    """Only the gateway talks to the Kubernetes API: no other pod holds a token for it."""
    for d, pod, _ in pods_of(docs):
        if not any(is_gateway(c) for c in pod["containers"]) and pod.get("automountServiceAccountToken") is not False:
            problem(f"{d['kind']}/{d['metadata']['name']}", "mounts an API token it does not need: "
                    "set automountServiceAccountToken: false")


def check(docs, namespace, runtimes, smg_python, problem):
    gateways = [(d, pod, labels, c) for d, pod, labels in pods_of(docs) for c in pod["containers"] if is_gateway(c)]
    if gateways and not smg_python:
        problem("gateway", "the layout runs smg: pass the python of the venv smg is installed in")
        return
    for d, pod, labels, c in gateways:
        where = f"{d['kind']}/{d['metadata']['name']}/{c['name']}"
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        env.update({e["name"]: d["metadata"].get("namespace") for e in c.get("env", [])
                    if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace"})
        out = subprocess.run([smg_python, "-c", PARSE] + [expand(a, env) for a in c.get("args", [])],
                             capture_output=True, text=True)
        if out.returncode != 0:
            problem(where, f"smg refuses its arguments: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        args = json.loads(out.stdout)
        name = c["image"].split("@")[0].rsplit("/", 1)[-1]
        tag = name.split(":", 1)[1] if ":" in name else None
        if tag != args["version"]:
            problem(where, f"image {c['image']} is not smg {args['version']}, "
                           "the version its arguments were checked against")
        check_discovery(where, docs, namespace, runtimes, labels, args, problem)
        check_pod(where, pod, c, d["spec"]["template"]["metadata"].get("annotations", {}), args, problem)
        check_rbac(where, docs, namespace, pod, problem)
        check_service(where, docs, labels, c, args["port"], problem)
        check_policies(where, docs, namespace, labels, runtimes, c, args["port"], problem)
        print(f"  {where}: smg {args['version']}, pods {args['selector']} in {args['service_discovery_namespace']} "
              f"at port {args['service_discovery_port']}, OpenAI API on {args['port']}")


def check_discovery(where, docs, namespace, runtimes, labels, args, problem):
    if args["discovery"] != "kubernetes":
        problem(where, "no Kubernetes discovery (--service-discovery): the runtimes would not be found")
    if args["service_discovery_namespace"] != namespace:
        problem(where, f"--service-discovery-namespace is {args['service_discovery_namespace']!r}, not {namespace!r}: "
                       "smg must watch the layout's namespace, the one its Role covers (unset: every namespace)")
    if args["backend"] != "vllm":
        problem(where, f"--backend {args['backend']}: runtime-service speaks the vllm dialect")
    if args["host"] not in ("0.0.0.0", "::"):
        problem(where, f"--host {args['host']}: the kubelet and the Service reach the pod's address")
    selector = args["selector"] or {}
    # smg keeps the pods carrying every label of the selector.
    selected = {d["metadata"]["name"] for d, _, pod_labels in pods_of(docs)
                if selector and all(pod_labels.get(k) == v for k, v in selector.items())}
    runtime_names = {w["metadata"]["name"] for w, _, _, _ in runtimes}
    if not selector or not runtime_names <= selected:
        problem(where, f"--selector {selector} does not select the runtime pods "
                       f"({[w['spec']['template']['metadata'].get('labels') for w, _, _, _ in runtimes]})")
    others = sorted(selected - runtime_names)
    if others:
        problem(where, f"--selector {selector} also selects the pods of {others}")
    for w, _, _, env in runtimes:
        grpc = int(env["RUNTIME_LISTEN"].rsplit(":", 1)[1])
        if args["service_discovery_port"] != grpc:
            problem(where, f"--service-discovery-port {args['service_discovery_port']} is not "
                           f"{w['metadata']['name']}'s gRPC port {grpc} (RUNTIME_LISTEN)")
        for var in ("RUNTIME_TLS_CERT", "RUNTIME_AUTH_TOKENS", "RUNTIME_TLS_CLIENT_CA"):
            if env.get(var) is not None:
                problem(where, f"{w['metadata']['name']} sets {var}, but smg dials gRPC workers in plaintext "
                               "without credentials")


def check_pod(where, pod, c, annotations, args, problem):
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    wanted = {"--port": args["port"], "--prometheus-port": args["prometheus_port"],
              "--health-check-port": args["health_check_port"]}
    for flag, port in wanted.items():
        if port is not None and port not in ports.values():
            problem(where, f"{flag} {port} is not a declared port")
    if args["prometheus_host"] not in (None, "0.0.0.0", "::"):
        problem(where, f"--prometheus-host {args['prometheus_host']}: Prometheus scrapes the pod's address")
    scraped = annotations.get("prometheus.io/scrape"), annotations.get("prometheus.io/port")
    if scraped != ("true", str(args["prometheus_port"])):
        problem(where, f"the Prometheus annotations do not name the metrics port {args['prometheus_port']}")
    probe_ports = {args["port"], args["health_check_port"]} - {None}
    paths = {"startupProbe": ("/liveness", "/health"), "readinessProbe": ("/readiness",),
             "livenessProbe": ("/liveness", "/health")}
    for probe, allowed in paths.items():
        http = c.get(probe, {}).get("httpGet")
        if not http:
            problem(where, f"no {probe} (HTTP, {' or '.join(allowed)})")
            continue
        port = ports.get(http["port"]) if isinstance(http["port"], str) else http["port"]
        if port not in probe_ports:
            problem(where, f"{probe} asks port {http['port']}, not smg's HTTP or probe port {sorted(probe_ports)}")
        if http.get("path") not in allowed:
            problem(where, f"{probe} asks {http.get('path')!r}, not {' or '.join(allowed)}")
    if c.get("securityContext", {}).get("readOnlyRootFilesystem"):
        tmp = next((e["value"] for e in c.get("env", []) if e["name"] == "TMPDIR"), "/tmp")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if not any(m["mountPath"].rstrip("/") == tmp.rstrip("/") and "emptyDir" in volumes.get(m["name"], {})
                   for m in c.get("volumeMounts", [])):
            problem(where, f"the root filesystem is read-only and {tmp} is no emptyDir: tokenizers are unpacked there")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= args["shutdown_grace_period_secs"]:
        problem(where, f"terminationGracePeriodSeconds {grace} does not outlast "
                       f"--shutdown-grace-period-secs {args['shutdown_grace_period_secs']}")


def check_rbac(where, docs, namespace, pod, problem):
    account = pod.get("serviceAccountName", "default")
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    if account not in accounts:
        problem(where, f"ServiceAccount {account!r} is not in the render")
    # The pod's setting wins over its ServiceAccount's; both unset, the token is mounted.
    mounted = accounts.get(account, {}).get("automountServiceAccountToken", True)
    if not pod.get("automountServiceAccountToken", mounted):
        problem(where, "mounts no API token: discovery cannot list pods")
    subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
    bound = (lambda b: any(all(s.get(k) == v for k, v in subject.items()) for s in b.get("subjects", [])))
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    rules = []
    for b in docs:
        if b["kind"] in ("RoleBinding", "ClusterRoleBinding") and bound(b):
            if b["kind"] == "ClusterRoleBinding" or b["roleRef"]["kind"] != "Role":
                problem(where, f"{b['kind']}/{b['metadata']['name']} grants a ClusterRole; "
                               f"a Role in {namespace} is enough")
            elif b["roleRef"]["name"] not in roles:
                problem(where, f"RoleBinding/{b['metadata']['name']} refers to Role "
                               f"{b['roleRef']['name']!r}, not in the render")
            else:
                rules += roles[b["roleRef"]["name"]].get("rules", [])
    pods = [r for r in rules if set(r.get("apiGroups", [])) & {"", "*"} and set(r.get("resources", [])) & {"pods", "*"}]
    if not any(DISCOVERY_VERBS <= set(r.get("verbs", [])) or "*" in r.get("verbs", []) for r in pods):
        problem(where, f"ServiceAccount {account!r} may not list and watch pods in {namespace}")
    for r in rules:
        if set(r.get("resources", [])) != {"pods"} or not set(r.get("verbs", [])) <= HARMLESS_VERBS:
            problem(where, f"its Role grants {r.get('verbs')} on {r.get('resources')}: "
                           "discovery needs list and watch on pods")


def opens(rule, port, port_names):
    """Whether an ingress rule covers `port` (a number; `port_names` are the container's names for it)."""
    return any(p.get("port") is None or p["port"] in port_names
               or (isinstance(p["port"], int) and p["port"] <= port <= p.get("endPort", p["port"]))
               for p in rule.get("ports") or [{}])


def admits(rule, namespace_labels, labels, port, port_names):
    """Whether an ingress rule admits pods of the policy's namespace with `labels` on `port`."""
    if not opens(rule, port, port_names):
        return False
    for peer in rule.get("from") or [{}]:
        if "ipBlock" in peer:
            continue
        in_namespace = selects(peer["namespaceSelector"], namespace_labels) if "namespaceSelector" in peer else True
        if in_namespace and selects(peer.get("podSelector", {}), labels):
            return True
    return False


def check_policies(where, docs, namespace, labels, runtimes, c, http_port, problem):
    ns_doc = next(d for d in docs if d["kind"] == "Namespace")
    ns_labels = {**ns_doc["metadata"].get("labels", {}), "kubernetes.io/metadata.name": namespace}
    # Without policyTypes, a policy is an ingress policy.
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"
                and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])]
    for w, _, rc, env in runtimes:
        pod_labels = w["spec"]["template"]["metadata"].get("labels", {})
        grpc = int(env["RUNTIME_LISTEN"].rsplit(":", 1)[1])
        names = [p["name"] for p in rc.get("ports", []) if p["containerPort"] == grpc and "name" in p]
        fences = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels)]
        if not fences:
            problem(where, f"no NetworkPolicy fences {w['metadata']['name']}'s pods: anyone may call them directly")
        elif not any(admits(r, ns_labels, labels, grpc, names) for p in fences for r in p["spec"].get("ingress", [])):
            problem(where, f"no NetworkPolicy admits the gateway's pods to {w['metadata']['name']}'s gRPC port {grpc}")
    names = [p["name"] for p in c.get("ports", []) if p["containerPort"] == http_port and "name" in p]
    fences = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
    if fences and not any(opens(r, http_port, names) for p in fences for r in p["spec"].get("ingress", [])):
        problem(where, f"the gateway's pods are fenced and no NetworkPolicy admits clients "
                       f"to its HTTP port {http_port}")


def check_service(where, docs, labels, c, http_port, problem):
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for d in docs:
        selector = d.get("spec", {}).get("selector") if d["kind"] == "Service" else None
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            for p in d["spec"].get("ports", []):
                target = p.get("targetPort", p["port"])
                if (ports.get(target) if isinstance(target, str) else target) == http_port:
                    return
    problem(where, f"no Service routes to the gateway's HTTP port {http_port}")
