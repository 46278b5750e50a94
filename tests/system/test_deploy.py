"""The deployment files, checked offline: every Kubernetes manifest against the schemas of one
Kubernetes release in strict mode (unknown fields are errors), and the facts the Dockerfile, the
manifests and the in-pod TorchServe config must agree on. Each check is a function returning its
problems, run on the real files (none) and on broken copies (some), so each is shown able to fail.

No cluster, container runtime or network is needed. The gateway test runs nginx with its njs module
(Debian: nginx, libnginx-mod-http-js) on loopback, against a stand-in for TorchServe.
"""

from __future__ import annotations

import copy
import http.server
import json
import shutil
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from harness.servers import REPO
from sam_fast_serve.tools.cli import _parser

DEPLOY = REPO / "deploy"
KUBE = DEPLOY / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
# The Kubernetes release whose schemas the manifests must satisfy (shipped in kubernetes-validate's wheel).
K8S_VERSION = "1.37.0"
LISTENERS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
# token_expiration_min must outlast any pod: the probes and the gateway use TorchServe's keys.
ONE_YEAR_MIN = 365 * 24 * 60
# What wait-ready may spend on top of --timeout: its last HTTP try (5 s to connect, 5 s to read).
WAIT_READY_SLACK_S = 10

Doc = dict[str, Any]
# The gateway under test: its base URL, the folder of its token and key files, the stand-in TorchServe.
Gateway = tuple[str, Path, http.server.HTTPServer]


# ---- loading ------------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[Doc]:
    """The YAML documents of a file, empty ones dropped."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/ (kustomization files are not Kubernetes objects)."""
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomization_files() -> list[Path]:
    return sorted(KUBE.rglob("kustomization.yaml"))


def base_objects() -> list[Doc]:
    """The objects the base kustomization lists, in order."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml_docs(KUBE / name)]


def find(objects: list[Doc], kind: str, name: str) -> Doc:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def generated_configmaps(folder: Path = KUBE) -> list[Doc]:
    """The ConfigMaps a kustomization's configMapGenerator makes (without kustomize's name hash)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": gen["name"]},
            "data": {Path(f).name: (folder / f).read_text() for f in gen["files"]},
        }
        for gen in kustomization.get("configMapGenerator", [])
    ]


def parse_properties(text: str) -> dict[str, str]:
    """A Java .properties file of plain key=value lines (what TorchServe's config uses)."""
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        word, _, rest = (current + line).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        current = ""
    return instructions


def image_command(instructions: list[tuple[str, str]]) -> list[str]:
    """The image's command line: the last ENTRYPOINT then the last CMD, both in exec (JSON) form."""
    command: list[str] = []
    for kind in ("ENTRYPOINT", "CMD"):
        found = [args for word, args in instructions if word == kind]
        if found:
            command += json.loads(found[-1])
    return command


def option(argv: list[str], name: str) -> str | None:
    """The value after `name` in an argv, or None."""
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


def container(deployment: Doc, name: str) -> Doc:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def mount_for(deployment: Doc, container_name: str, path: str) -> tuple[Doc, Doc] | None:
    """(volumeMount, volume) of the container's mount at exactly `path`, or None."""
    spec = deployment["spec"]["template"]["spec"]
    for mount in container(deployment, container_name).get("volumeMounts", []):
        if mount["mountPath"] == path:
            return mount, next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return None


class Files:
    """Everything the checks read, parsed afresh (tests mutate their own copy)."""

    def __init__(self) -> None:
        self.objects = base_objects()
        self.deployment = find(self.objects, "Deployment", "sam-fast")
        self.service = find(self.objects, "Service", "sam-fast")
        self.hpa = find(self.objects, "HorizontalPodAutoscaler", "sam-fast")
        self.kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
        self.configmaps = generated_configmaps()
        self.config = parse_properties(
            find(self.configmaps, "ConfigMap", "sam-fast-torchserve")["data"]["config.properties"]
        )
        self.gateway_conf = (KUBE / "gateway.conf").read_text()
        self.dockerfile = dockerfile_instructions(DOCKERFILE.read_text())
        self.secrets = yaml_docs(DEPLOY / "secrets.example.yaml")


@pytest.fixture
def files() -> Files:
    return Files()


# ---- the checks: each returns its problems ------------------------------------------------------


def port_problems(f: Files) -> list[str]:
    """Listeners on 0.0.0.0, the container's ports, the scrape annotations, the Service and the
    gateway's upstream all agree with config.properties."""
    problems = []
    torchserve = container(f.deployment, "torchserve")
    declared = {p["name"]: p["containerPort"] for p in torchserve.get("ports", [])}
    ports = {}
    for name, key in LISTENERS.items():
        if key not in f.config:
            problems.append(f"config.properties has no {key}")
            continue
        url = urlsplit(f.config[key])
        ports[name] = url.port
        if url.hostname != "0.0.0.0":
            problems.append(f"{key} binds {url.hostname}, not 0.0.0.0: unreachable from the rest of the pod")
        if declared.get(name) != url.port:
            problems.append(f"container port {name!r} is {declared.get(name)}, config.properties says {url.port}")
    if set(declared) != set(LISTENERS):
        problems.append(f"torchserve declares ports {sorted(declared)}, expected {sorted(LISTENERS)}")
    annotations = f.deployment["spec"]["template"]["metadata"].get("annotations", {})
    expected = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(ports.get("metrics")),
        "prometheus.io/path": "/metrics",
    }
    for key, value in expected.items():
        if annotations.get(key) != value:
            problems.append(f"pod annotation {key} is {annotations.get(key)!r}, expected {value!r}")
    targets = {p["name"]: p["targetPort"] for p in f.service["spec"]["ports"]}
    if targets.get("metrics") not in ("metrics", ports.get("metrics")):
        problems.append(f"Service port 'metrics' targets {targets.get('metrics')!r}")
    if targets.get("http") != "gateway":
        problems.append(f"Service port 'http' targets {targets.get('http')!r}, not the gateway")
    if f"server 127.0.0.1:{ports.get('inference')};" not in f.gateway_conf:
        problems.append("gateway.conf's upstream is not TorchServe's inference port")
    return problems


def token_problems(f: Files) -> list[str]:
    """Token authorization is on, nothing can turn it off, and the keys outlive the pod."""
    problems = []
    if f.config.get("disable_token_authorization", "false").lower() != "false":
        problems.append("config.properties sets disable_token_authorization")
    # With envvars config on, a TS_DISABLE_TOKEN_AUTHORIZATION variable would switch it off.
    if f.config.get("enable_envvars_config", "false").lower() != "false":
        problems.append("config.properties sets enable_envvars_config: the environment could disable tokens")
    argvs = [image_command(f.dockerfile)] + [
        c.get("command", []) + c.get("args", []) for c in f.deployment["spec"]["template"]["spec"]["containers"]
    ]
    if any("--disable-token-auth" in argv for argv in argvs):
        problems.append("a command line passes --disable-token-auth")
    for c in f.deployment["spec"]["template"]["spec"]["containers"]:
        if any(e["name"] == "TS_DISABLE_TOKEN_AUTHORIZATION" for e in c.get("env", [])):
            problems.append(f"container {c['name']} sets TS_DISABLE_TOKEN_AUTHORIZATION")
    try:
        minutes = float(f.config["token_expiration_min"])
    except (KeyError, ValueError):
        minutes = 60.0  # TorchServe's default
    if minutes < ONE_YEAR_MIN:
        problems.append(
            f"TorchServe's keys expire after {minutes:g} min: the probes and the gateway would then be refused"
        )
    return problems


def readiness_problems(f: Files) -> list[str]:
    """The readiness probe is `sam-fast-serve wait-ready` for the served model, with the key file
    TorchServe writes and its management port, and a probe timeout it can finish within."""
    torchserve = container(f.deployment, "torchserve")
    probe = torchserve.get("readinessProbe", {})
    command = probe.get("exec", {}).get("command", [])
    if command[:2] != ["sam-fast-serve", "wait-ready"]:
        return [f"readiness probe runs {command}, not sam-fast-serve wait-ready"]
    try:
        args = _parser().parse_args(command[1:])
    except SystemExit:
        return [f"sam-fast-serve does not accept {command[1:]}"]
    problems = []
    key_file = PurePosixPath(torchserve.get("workingDir", "/")) / "key_file.json"
    if PurePosixPath(str(args.key_file)) != key_file:
        problems.append(f"--key-file {args.key_file}, but TorchServe writes {key_file} (its working directory)")
    management = urlsplit(f.config.get("management_address", "")).port
    if args.management_url != f"http://127.0.0.1:{management}":
        problems.append(f"--management-url {args.management_url}, TorchServe's management port is {management}")
    models = option(image_command(f.dockerfile), "--models") or ""
    if args.model != models.partition("=")[0]:
        problems.append(f"--model {args.model}, the image serves {models}")
    if probe.get("timeoutSeconds", 1) < args.timeout + WAIT_READY_SLACK_S:
        problems.append(
            f"timeoutSeconds {probe.get('timeoutSeconds', 1)} < --timeout {args.timeout:g} + {WAIT_READY_SLACK_S}"
        )
    for kind in ("livenessProbe", "startupProbe"):
        # /ping needs the inference token in TorchServe 0.12: a plain httpGet would always fail.
        liveness = " ".join(torchserve.get(kind, {}).get("exec", {}).get("command", []))
        if (
            str(key_file) not in liveness
            or f"127.0.0.1:{urlsplit(f.config.get('inference_address', '')).port}/ping" not in liveness
        ):
            problems.append(f"{kind} does not ping TorchServe with the key from {key_file}")
    return problems


def entrypoint_problems(f: Files) -> list[str]:
    """The image starts TorchServe in the foreground with the config path the Deployment mounts the
    generated ConfigMap at, the model store the volume is mounted at, as the pod's user and directory."""
    problems = []
    argv = image_command(f.dockerfile)
    start = argv.index("torchserve") if "torchserve" in argv else None
    if start is None:
        return [f"the image runs {argv}, not torchserve"]
    for flag in ("--start", "--foreground", "--ncs"):
        if flag not in argv[start:]:
            problems.append(f"torchserve is started without {flag}")
    ts_config = PurePosixPath(option(argv, "--ts-config") or "")
    found = mount_for(f.deployment, "torchserve", str(ts_config.parent))
    generators = {g["name"]: [Path(p).name for p in g["files"]] for g in f.kustomization.get("configMapGenerator", [])}
    if found is None:
        problems.append(f"nothing is mounted at {ts_config.parent}, where the image reads {ts_config}")
    elif ts_config.name not in generators.get(found[1].get("configMap", {}).get("name"), []):
        problems.append(
            f"the volume mounted at {ts_config.parent} is not a generated ConfigMap holding {ts_config.name}"
        )
    copies = [args.split() for word, args in f.dockerfile if word == "COPY"]
    if ["deploy/kubernetes/config.properties", str(ts_config)] not in copies:
        problems.append(f"the image's default {ts_config} is not deploy/kubernetes/config.properties")
    store = f.config.get("model_store", "")
    found = mount_for(f.deployment, "torchserve", store)
    if found is None or "persistentVolumeClaim" not in found[1] or not found[0].get("readOnly"):
        problems.append(f"model_store {store!r} is not a volume mounted read-only from a PersistentVolumeClaim")
    models = option(argv, "--models") or ""
    if models != "sam-fast=sam-fast.tar.gz":
        problems.append(f"--models {models!r}")
    workdirs = [args for word, args in f.dockerfile if word == "WORKDIR"]
    torchserve = container(f.deployment, "torchserve")
    if not workdirs or torchserve.get("workingDir") != workdirs[-1]:
        problems.append(f"workingDir {torchserve.get('workingDir')} differs from the image's {workdirs[-1:]}")
    users = [args.partition(":")[0] for word, args in f.dockerfile if word == "USER"]
    run_as = f.deployment["spec"]["template"]["spec"].get("securityContext", {}).get("runAsUser")
    if not users or users[-1] in ("0", "root") or str(run_as) != users[-1]:
        problems.append(f"the image runs as {users[-1:]}, the pod as {run_as}: both must be the same non-root uid")
    return problems


def install_problems(f: Files) -> list[str]:
    """The image is installed by install_segment_anything_fast.sh on Python 3.11 with Java 17,
    and by nothing else."""
    problems = []
    runs = [args for word, args in f.dockerfile if word == "RUN"]
    if not any("bash install_segment_anything_fast.sh" in r for r in runs):
        problems.append("no RUN runs bash install_segment_anything_fast.sh")
    if any("pip install" in r or "pip3 install" in r for r in runs):
        problems.append("a RUN installs Python packages itself: the install steps must be the script's")
    froms = [args for word, args in f.dockerfile if word == "FROM"]
    if not froms or not froms[0].startswith("python:3.11"):
        problems.append(f"base image {froms[:1]} is not python:3.11")
    if not any("openjdk-17-jre-headless" in r for r in runs):
        problems.append("no Java 17 runtime is installed")
    return problems


def secret_problems(f: Files) -> list[str]:
    """Every Secret the manifests read is in secrets.example.yaml with that key and a placeholder
    value, and the gateway reads its token where the Secret is mounted."""
    problems = []
    examples = {s["metadata"]["name"]: s.get("stringData", {}) for s in f.secrets if s["kind"] == "Secret"}
    for name, values in examples.items():
        for key, value in values.items():
            if value != "CHANGE_ME":
                problems.append(f"secrets.example.yaml: {name}.{key} is not the placeholder CHANGE_ME")
    wanted = []
    for obj in f.objects:
        if obj["kind"] != "Deployment":
            continue
        spec = obj["spec"]["template"]["spec"]
        for c in spec["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    wanted.append((ref["name"], ref["key"]))
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                wanted.append((volume["secret"]["secretName"], None))
    for name, key in wanted:
        if name not in examples or (key is not None and key not in examples[name]):
            problems.append(f"Secret {name} (key {key}) is read but not in secrets.example.yaml")
    found = mount_for(f.deployment, "gateway", "/etc/sam-fast-token")
    if found is None or "set $client_token_file /etc/sam-fast-token/token;" not in f.gateway_conf:
        problems.append("the gateway does not read its token from the mounted Secret")
    elif "token" not in examples.get(found[1].get("secret", {}).get("secretName"), {}):
        problems.append("the Secret mounted at /etc/sam-fast-token has no key 'token'")
    return problems


def wiring_problems(f: Files) -> list[str]:
    """The Service and HPA point at the Deployment's pods, and every container has CPU requests
    (the HPA's utilization is of the requests)."""
    problems = []
    pod_labels = f.deployment["spec"]["template"]["metadata"]["labels"]
    if not f.service["spec"]["selector"].items() <= pod_labels.items():
        problems.append("the Service's selector does not match the pods")
    if f.deployment["spec"]["selector"]["matchLabels"].items() > pod_labels.items():
        problems.append("the Deployment's selector does not match its pods")
    target = f.hpa["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", f.deployment["metadata"]["name"]):
        problems.append(f"the HPA scales {target['kind']}/{target['name']}")
    for c in f.deployment["spec"]["template"]["spec"]["containers"]:
        if "cpu" not in c.get("resources", {}).get("requests", {}):
            problems.append(f"container {c['name']} has no CPU request")
    return problems


CHECKS = [
    port_problems,
    token_problems,
    readiness_problems,
    entrypoint_problems,
    install_problems,
    secret_problems,
    wiring_problems,
]


# ---- schemas ------------------------------------------------------------------------------------


def validate_strict(doc: Doc, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")


@pytest.mark.parametrize(
    ("path", "index"),
    [(p, i) for p in manifest_files() for i in range(len(yaml_docs(p)))],
    ids=lambda v: str(v.relative_to(DEPLOY)) if isinstance(v, Path) else str(v),
)
def test_manifest_matches_kubernetes_schema_strictly(path: Path, index: int) -> None:
    doc = yaml_docs(path)[index]
    validate_strict(doc, f"{path.relative_to(REPO)} #{index} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}")


def test_generated_configmaps_match_schema() -> None:
    for configmap in generated_configmaps():
        validate_strict(configmap, f"ConfigMap {configmap['metadata']['name']}")


def test_every_manifest_was_validated() -> None:
    # Guards the parametrization above: the deploy/ tree holds what this file expects to check.
    kinds = {doc["kind"] for p in manifest_files() for doc in yaml_docs(p)}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Secret"} <= kinds


MUTATIONS = {
    "unknown container field": lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),
    "unknown pod field": lambda d: d["spec"]["template"]["spec"].update(volumeMount=[]),
    "unknown probe field": lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"].update(exec_={}),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=str)
def test_strict_mode_rejects_an_unknown_field(tmp_path: Path, mutation: str) -> None:
    broken = tmp_path / "deployment.yaml"
    doc = yaml_docs(KUBE / "deployment.yaml")[0]
    MUTATIONS[mutation](doc)
    broken.write_text(yaml.safe_dump(doc))
    reloaded = yaml_docs(broken)[0]
    # The loose schemas accept the typo, which is why strict mode is used.
    kubernetes_validate.validate(reloaded, K8S_VERSION, strict=False)
    with pytest.raises(kubernetes_validate.ValidationError, match="Additional properties are not allowed"):
        kubernetes_validate.validate(reloaded, K8S_VERSION, strict=True)


def test_schema_rejects_a_wrong_type() -> None:
    doc = yaml_docs(KUBE / "deployment.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ---- kustomizations -----------------------------------------------------------------------------


def kustomization_problems(folder: Path) -> list[str]:
    """Every file in the folder is named once by its kustomization (YAML as resources, the rest as
    configMapGenerator files), every name exists, and every subfolder is a kustomization."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    problems = []
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != "kustomization.yaml"}
    resources = kustomization.get("resources", [])
    file_resources = [r for r in resources if (folder / r).is_file()]
    for r in resources:
        if not (folder / r).is_file() and not (folder / r / "kustomization.yaml").is_file():
            problems.append(f"resource {r} is neither a file nor a kustomization")
    generated = [f for g in kustomization.get("configMapGenerator", []) for f in g.get("files", [])]
    named = file_resources + generated
    for name in sorted(set(named)):
        if named.count(name) > 1:
            problems.append(f"{name} is named {named.count(name)} times")
    for name in sorted(present - set(named)):
        problems.append(f"{name} is in {folder.name}/ but not in its kustomization")
    for name in sorted(set(generated) - present):
        problems.append(f"configMapGenerator names {name}, which is not there")
    for name in sorted(p for p in present if p.endswith((".yaml", ".yml"))):
        if name not in file_resources:
            problems.append(f"manifest {name} is not in resources")
    for sub in folder.iterdir():
        if sub.is_dir() and not (sub / "kustomization.yaml").is_file():
            problems.append(f"{sub.name}/ has no kustomization.yaml")
    return problems


@pytest.mark.parametrize("path", kustomization_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomization_names_every_file(path: Path) -> None:
    assert kustomization_problems(path.parent) == []


def test_kustomization_check_catches_a_forgotten_file(tmp_path: Path) -> None:
    copy_of = tmp_path / "kubernetes"
    shutil.copytree(KUBE, copy_of)
    (copy_of / "networkpolicy.yaml").write_text("kind: NetworkPolicy\n")
    kustomization = yaml.safe_load((copy_of / "kustomization.yaml").read_text())
    kustomization["resources"].remove("hpa.yaml")
    kustomization["resources"].append("missing.yaml")
    (copy_of / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    problems = kustomization_problems(copy_of)
    assert any("networkpolicy.yaml" in p for p in problems)
    assert any("hpa.yaml" in p for p in problems)
    assert any("missing.yaml" in p for p in problems)


def apply_json_patch(doc: Doc, operations: list[Doc]) -> Doc:
    """The add and replace operations of an RFC 6902 patch (all the GPU overlay uses)."""
    doc = copy.deepcopy(doc)
    for op in operations:
        assert op["op"] in ("add", "replace"), f"unsupported patch op {op['op']}"
        *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list) and last == "-":
            target.append(op["value"])
        elif isinstance(target, list) and op["op"] == "add":
            target.insert(int(last), op["value"])
        elif isinstance(target, list):
            target[int(last)] = op["value"]
        else:
            assert op["op"] == "add" or last in target, f"replace of a missing {op['path']}"
            target[last] = op["value"]
    return doc


def test_gpu_overlay_gives_one_gpu_and_stays_valid() -> None:
    overlay = yaml.safe_load((KUBE / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    deployment = find(base_objects(), "Deployment", "sam-fast")
    for patch in overlay["patches"]:
        assert (patch["target"]["kind"], patch["target"]["name"]) == ("Deployment", "sam-fast")
        deployment = apply_json_patch(deployment, yaml.safe_load(patch["patch"]))
    validate_strict(deployment, "gpu overlay's Deployment")
    torchserve = deployment["spec"]["template"]["spec"]["containers"][0]
    assert torchserve["name"] == "torchserve"  # the patches address containers/0
    assert torchserve["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "CUDA_VISIBLE_DEVICES", "value": "0"} in torchserve["env"]


# ---- the cross-file checks ----------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_check_holds(files: Files, check) -> None:
    assert check(files) == []


def _set_config(f: Files, key: str, value: str) -> None:
    f.config[key] = value


def _torchserve(f: Files) -> Doc:
    return container(f.deployment, "torchserve")


# Per check: (a broken copy of the files, a phrase the check's problem must contain).
BREAKAGES: dict[str, list[tuple[Any, str]]] = {
    "port_problems": [
        (lambda f: _torchserve(f)["ports"][0].update(containerPort=9080), "container port 'inference' is 9080"),
        (lambda f: _set_config(f, "metrics_address", "http://127.0.0.1:8082"), "not 0.0.0.0"),
        (
            lambda f: f.deployment["spec"]["template"]["metadata"]["annotations"].update(
                {"prometheus.io/port": "8080"}
            ),
            "prometheus.io/port",
        ),
        (
            lambda f: setattr(f, "gateway_conf", f.gateway_conf.replace("127.0.0.1:8080", "127.0.0.1:9080")),
            "gateway.conf's upstream",
        ),
    ],
    "token_problems": [
        (lambda f: _set_config(f, "disable_token_authorization", "true"), "sets disable_token_authorization"),
        (lambda f: _set_config(f, "enable_envvars_config", "true"), "enable_envvars_config"),
        (lambda f: f.config.pop("token_expiration_min"), "expire after 60 min"),
        (lambda f: _torchserve(f).update(args=["--disable-token-auth"]), "passes --disable-token-auth"),
        (
            lambda f: _torchserve(f)["env"].append({"name": "TS_DISABLE_TOKEN_AUTHORIZATION", "value": "true"}),
            "sets TS_DISABLE_TOKEN_AUTHORIZATION",
        ),
    ],
    "readiness_problems": [
        (
            lambda f: _torchserve(f)["readinessProbe"].update(exec={"command": ["curl", "http://127.0.0.1:8080/ping"]}),
            "not sam-fast-serve wait-ready",
        ),
        (lambda f: _torchserve(f)["readinessProbe"]["exec"]["command"].append("--bogus"), "does not accept"),
        (lambda f: _torchserve(f).update(workingDir="/home/model-server"), "--key-file"),
        (lambda f: _torchserve(f)["readinessProbe"].update(timeoutSeconds=5), "timeoutSeconds 5"),
        (lambda f: _set_config(f, "management_address", "http://0.0.0.0:9081"), "--management-url"),
        (
            lambda f: f.dockerfile.append(("ENTRYPOINT", '["torchserve", "--models", "vit-h=vit-h.tar.gz"]')),
            "--model sam-fast",
        ),
        (
            lambda f: _torchserve(f).update(livenessProbe={"httpGet": {"path": "/ping", "port": 8080}}),
            "livenessProbe does not ping",
        ),
    ],
    "entrypoint_problems": [
        (
            lambda f: f.dockerfile.append(
                ("ENTRYPOINT", '["torchserve", "--start", "--ts-config", "/etc/ts.properties"]')
            ),
            "without --foreground",
        ),
        (lambda f: _torchserve(f)["volumeMounts"][0].update(mountPath="/etc/torchserve"), "nothing is mounted at"),
        (lambda f: _set_config(f, "model_store", "/models"), "model_store '/models'"),
        (lambda f: _torchserve(f)["volumeMounts"][1].pop("readOnly"), "mounted read-only"),
        (lambda f: f.dockerfile.append(("USER", "root")), "non-root uid"),
        (lambda f: f.dockerfile.append(("WORKDIR", "/srv")), "workingDir"),
    ],
    "install_problems": [
        (
            lambda f: f.dockerfile.__setitem__(
                slice(None), [(w, a) for w, a in f.dockerfile if "install_segment_anything_fast" not in a]
            ),
            "no RUN runs bash install_segment_anything_fast.sh",
        ),
        (lambda f: f.dockerfile.append(("RUN", "pip install torch")), "installs Python packages itself"),
        (lambda f: f.dockerfile.__setitem__(0, ("FROM", "python:3.12-slim")), "is not python:3.11"),
    ],
    "secret_problems": [
        (lambda f: f.secrets[0]["stringData"].update(token="s3cr3t-value-in-git"), "not the placeholder"),
        (lambda f: f.secrets.pop(1), "Secret sam-fast-redis (key password) is read"),
        (
            lambda f: setattr(f, "gateway_conf", f.gateway_conf.replace("/etc/sam-fast-token/token", "/etc/token")),
            "does not read its token",
        ),
    ],
    "wiring_problems": [
        (
            lambda f: f.service["spec"]["selector"].update({"app.kubernetes.io/component": "redis"}),
            "Service's selector",
        ),
        (lambda f: f.hpa["spec"]["scaleTargetRef"].update(name="sam-fast-redis"), "the HPA scales"),
        (lambda f: container(f.deployment, "gateway")["resources"].pop("requests"), "gateway has no CPU request"),
    ],
}


@pytest.mark.parametrize(
    ("check", "index"),
    [(c, i) for c in CHECKS for i in range(len(BREAKAGES[c.__name__]))],
    ids=lambda v: v.__name__ if callable(v) else str(v),
)
def test_check_catches_a_breakage(check, index: int) -> None:
    broken = Files()
    breakage, phrase = BREAKAGES[check.__name__][index]
    breakage(broken)
    problems = check(broken)
    assert any(phrase in p for p in problems), f"{check.__name__} missed breakage #{index}: {problems}"


def test_every_check_has_breakages() -> None:
    assert {c.__name__ for c in CHECKS} == set(BREAKAGES)


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", "logs", "model_store/*", "checkpoints", "out", ".pytest_cache", "key_file.json", "*.pth"):
        assert entry in ignored, entry


def test_pod_config_keeps_every_setting_of_the_shipped_config() -> None:
    """The in-pod config.properties differs from the repo's only where a pod must: its listeners
    (0.0.0.0) and model store path."""
    shipped = parse_properties((REPO / "config.properties").read_text())
    pod = parse_properties((KUBE / "config.properties").read_text())
    differ = set(LISTENERS.values()) | {"model_store"}
    assert {k: v for k, v in shipped.items() if k not in differ} == {k: v for k, v in pod.items() if k not in differ}


def test_image_tag_is_the_package_version() -> None:
    from sam_fast_serve import __version__

    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert [image["newTag"] for image in kustomization["images"]] == [__version__]
