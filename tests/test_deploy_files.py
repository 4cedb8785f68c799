"""The Kubernetes and AWS deployment files under deployments/, validated offline in seconds.

Nothing here reaches a cluster, an AWS account or the network: the kustomize overlay is
rendered by `kubectl kustomize` and every resource is checked against the Kubernetes JSON
schemas that kubernetes-validate bundles (strict: unknown fields fail) or, for custom
resources, against the CRD schemas vendored in deployments/k8s/crds-schemas. The Prefect work pool
templates go through Prefect's own template check and templating; the ECS task definition
through botocore's request model; the Ray launcher config through Ray's own validation; the
IAM policies through structural rules and parliament. Cross-file checks keep names, ports,
images, rules and dashboards from drifting apart. A missing tool fails with its name.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deployments"
K8S = DEPLOY / "k8s"
OVERLAY = K8S / "overlays" / "cluster"
CRD_SCHEMAS = K8S / "crds-schemas"
K8S_POOL = K8S / "prefect" / "kubernetes-work-pool.json"
AWS = DEPLOY / "aws"
ECS_POOL = AWS / "ecs-work-pool.json"
RAY_LAUNCHER = AWS / "ray-cluster.yaml"
BUCKET_POLICY = AWS / "s3-bucket-policy.json"
IDENTITY_POLICIES = sorted(AWS.glob("iam-*.json"))
README = DEPLOY / "README.md"

# kubernetes-validate 1.37.0 bundles the schemas of Kubernetes 1.25 to 1.37. Pinned to 1.32,
# the kubectl this machine has; the rendered overlay also validates against 1.37.
KUBERNETES_VERSION = "1.32.0"
NAMESPACE = "flywheel"
SECRET_NAME = "flywheel-secrets"
SETTINGS_CONFIGMAP = "flywheel-settings"
HOME_CLAIM = "flywheel-home"
CUSTOM_KINDS = {  # kind -> (apiVersion, vendored openAPIV3Schema of that version)
    "RayCluster": ("ray.io/v1", "raycluster-ray.io-v1.json"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitor-monitoring.coreos.com-v1.json"),
    "PrometheusRule": ("monitoring.coreos.com/v1", "prometheusrule-monitoring.coreos.com-v1.json"),
}
EXPECTED_KINDS = {
    "Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service",
    "PersistentVolumeClaim", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
    *CUSTOM_KINDS,
}
# Sample values for the placeholders deployments/README.md lists, to check the files as filled in.
SAMPLES = {
    "ACCOUNT_ID": "111122223333", "REGION": "eu-west-1", "BUCKET": "flywheel-example-bucket",
    "IMAGE_TAG": "2026.11.1", "EFS_ID": "fs-0123456789abcdef0", "VPC_ID": "vpc-0123456789abcdef0",
    "SUBNET_ID": "subnet-0123456789abcdef0", "SECURITY_GROUP_ID": "sg-0123456789abcdef0",
    "MLFLOW_HOST": "mlflow.internal.example", "RAY_HEAD_HOST": "10.0.1.10",
}


# ---------------------------------------------------------------- helpers


def need_module(name: str, pip_spec: str) -> types.ModuleType:
    """Import a validator the tests depend on, or fail saying what to install."""
    try:
        return __import__(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        pytest.fail(f"{pip_spec} is not installed (a dev dependency): pip install '{pip_spec}'")


def fill_placeholders(text: str) -> str:
    for name, value in SAMPLES.items():
        text = re.sub(rf"\b{name}\b", value, text)
    return text


def find(resources: list[dict], kind: str, name: str) -> dict:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name} in the rendered overlay, found {len(matches)}"
    return matches[0]


def pod_templates(resources: list[dict]) -> dict[str, dict]:
    """Every pod spec the overlay and the Kubernetes work pool create, by a readable name."""
    pods: dict[str, dict] = {}
    for r in resources:
        name = f"{r['kind']}/{r['metadata']['name']}"
        if r["kind"] == "Deployment":
            pods[name] = r["spec"]["template"]
        elif r["kind"] == "RayCluster":
            pods[f"{name} head"] = r["spec"]["headGroupSpec"]["template"]
            for group in r["spec"]["workerGroupSpecs"]:
                pods[f"{name} {group['groupName']} workers"] = group["template"]
    pods["work pool flywheel-k8s Job"] = kubernetes_job()["spec"]["template"]
    return pods


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def configmap_data(resources: list[dict], name: str) -> dict[str, str]:
    return find(resources, "ConfigMap", name).get("data", {})


def effective_env(resources: list[dict], container: dict) -> dict[str, str]:
    """The literal environment a container starts with: envFrom ConfigMaps, then env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmap_data(resources, source["configMapRef"]["name"]))
    env.update({n: item["value"] for n, item in env_of(container).items() if "value" in item})
    return env


def named_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in ports, f"container {container['name']} has no port named {port!r}: {ports}"
    return ports[port]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def settings_field_exists(variable: str) -> bool:
    """Whether FLYWHEEL_A__B names a field of core.settings.Settings (a typo is silently
    ignored by pydantic-settings, so the manifests must not rely on it)."""
    from pydantic import BaseModel

    from core.settings import Settings

    model: type[BaseModel] = Settings
    parts = variable.removeprefix("FLYWHEEL_").lower().split("__")
    for index, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if index < len(parts) - 1:
            if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
                return False
            model = field.annotation
    return True


def flywheel_variables_not_settings(names: set[str]) -> set[str]:
    from serving.auth import ADMIN_TOKEN_ENV

    # FLYWHEEL_REPO is read by the pull step of deployments/prefect.yaml, the admin token by
    # serving/auth.py; every other FLYWHEEL_* variable must be a settings field.
    known = {"FLYWHEEL_REPO", ADMIN_TOKEN_ENV}
    return {n for n in names if n.startswith("FLYWHEEL_") and n not in known and not settings_field_exists(n)}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """core.settings.Settings as a process with exactly this FLYWHEEL_* environment sees it."""
    from core.settings import Settings

    for name in [n for n in os.environ if n.startswith("FLYWHEEL_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("FLYWHEEL_"):
            monkeypatch.setenv(name, value)
    return Settings()


def readme_text() -> str:
    assert README.exists(), "deployments/README.md is missing"
    return README.read_text()


def documented_placeholders() -> set[str]:
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", readme_text(), flags=re.MULTILINE))


def documented_secret_keys() -> set[str]:
    """The keys deployments/README.md's `kubectl create secret` command creates."""
    return set(re.findall(r"--from-literal=([a-z0-9-]+)=", readme_text()))


# ---------------------------------------------------------------- rendering and schemas


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    """The cluster overlay as `kubectl apply -k` would send it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: the kustomize overlay cannot be rendered "
                    "(`kubectl kustomize` works offline, no cluster needed)")
    done = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {OVERLAY} failed:\n{done.stderr}"
    resources = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert resources, "the overlay rendered no resources"
    return resources


@cache
def crd_validator(filename: str) -> jsonschema.protocols.Validator:
    """A CRD's openAPIV3Schema made strict as `kubectl apply` (server-side field validation,
    Strict since Kubernetes 1.27) treats it: a field the schema does not declare is an error
    unless the schema preserves unknown fields."""

    def strict(node: Any) -> Any:
        if isinstance(node, list):
            return [strict(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: strict(value) for key, value in node.items()}
        if isinstance(out.get("pattern"), str) and "(?i)" in out["pattern"][1:]:
            # Go's regexp takes an inline flag anywhere; Python's only at the start.
            out["pattern"] = "(?i)" + out["pattern"].replace("(?i)", "")
        if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out

    schema = strict(json.loads((CRD_SCHEMAS / filename).read_text()))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@cache
def object_meta_validator() -> jsonschema.protocols.Validator:
    """Kubernetes' ObjectMeta schema (strict) from kubernetes-validate's bundle: CRD schemas
    leave `metadata` to the API server, which checks it against this."""
    need_module("kubernetes_validate", "kubernetes-validate==1.37.0")
    from referencing import Registry, Resource

    folder = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
              / f"v{KUBERNETES_VERSION}-local-strict")
    schema = json.loads((folder / "objectmeta-meta-v1.json").read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_builtin(resource: dict) -> None:
    kubernetes_validate = need_module("kubernetes_validate", "kubernetes-validate==1.37.0")
    metadata = resource["metadata"]
    name = f"{resource['kind']}/{metadata.get('name') or metadata.get('generateName')}"
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as error:
        pytest.fail(f"{name}: no Kubernetes {KUBERNETES_VERSION} schema: {error.message}")
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        pytest.fail(f"{name} is not a valid {resource['apiVersion']} {resource['kind']} "
                    f"(Kubernetes {KUBERNETES_VERSION}) at {path or '<root>'}: {error.message}")


def test_overlay_renders_the_expected_resources(rendered):
    kinds = {r["kind"] for r in rendered}
    assert kinds == EXPECTED_KINDS, f"missing {EXPECTED_KINDS - kinds}, unexpected {kinds - EXPECTED_KINDS}"
    namespaced = [r for r in rendered if r["kind"] != "Namespace"]
    assert {r["metadata"].get("namespace") for r in namespaced} == {NAMESPACE}
    assert not [r for r in rendered if r["kind"] in ("ClusterRole", "ClusterRoleBinding", "Secret")]


def test_builtin_resources_match_the_kubernetes_schemas(rendered):
    builtins = [r for r in rendered if r["kind"] not in CUSTOM_KINDS]
    assert len(builtins) >= 15
    for resource in builtins:
        validate_builtin(resource)


def test_custom_resources_match_their_crd_schemas(rendered):
    for kind, (api_version, filename) in CUSTOM_KINDS.items():
        objects = [r for r in rendered if r["kind"] == kind]
        assert objects, f"no {kind} rendered"
        for resource in objects:
            name = f"{kind}/{resource['metadata']['name']}"
            assert resource["apiVersion"] == api_version, f"{name}: apiVersion {resource['apiVersion']}"
            errors = sorted(crd_validator(filename).iter_errors(resource), key=lambda e: list(e.path))
            errors += list(object_meta_validator().iter_errors(resource["metadata"]))
            assert not errors, f"{name} does not match its CRD schema ({filename}):\n" + "\n".join(
                f"  {'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:10])


def test_vendored_crd_schemas_are_recorded():
    notes = (CRD_SCHEMAS / "README.md").read_text()
    for _, filename in CUSTOM_KINDS.values():
        assert filename in notes, f"crds-schemas/README.md does not say where {filename} comes from"
    assert re.search(r"\b[0-9a-f]{40}\b", notes), "crds-schemas/README.md records no commit"


# ---------------------------------------------------------------- monitoring stays in step


def test_prometheus_rule_is_monitoring_rules(rendered):
    # prometheus.yml loads rules/*.yml; the PrometheusRule carries their groups in that order.
    files = sorted((REPO / "monitoring" / "prometheus" / "rules").glob("*.yml"))
    source = [group for path in files for group in yaml.safe_load(path.read_text())["groups"]]
    assert source, "monitoring/prometheus/rules has no rule groups"
    rule = find(rendered, "PrometheusRule", "flywheel")

    def names(groups: list[dict]) -> list[str]:
        return [r.get("alert") or r.get("record") for g in groups for r in g["rules"]]

    assert names(rule["spec"]["groups"]) == names(source), (
        "the PrometheusRule's rules differ from monitoring/prometheus/rules; copy their groups")
    assert rule["spec"]["groups"] == source, (
        "same rule names, but expressions, labels or annotations differ from monitoring/prometheus/rules")


def test_each_dashboard_exists_once_and_every_stack_reads_that_copy(rendered):
    """One copy of each Grafana dashboard, under the kustomization (kustomize reads no file
    outside it): the Kubernetes ConfigMap is built from it and compose mounts it."""
    folder = K8S / "base" / "monitoring" / "dashboards"
    boards = {p.name: p.read_bytes() for p in sorted(folder.glob("*.json"))}
    assert boards, f"{folder} has no dashboards"
    copies = [p for p in REPO.rglob("*.json") if ".venv" not in p.parts and p.parent != folder
              and p.read_bytes() in boards.values()]
    assert not copies, f"dashboards copied elsewhere: {copies}"
    configmap = find(rendered, "ConfigMap", "flywheel-grafana-dashboards")
    assert configmap["metadata"]["labels"].get("grafana_dashboard") == "1"
    assert {k: v.encode() for k, v in configmap["data"].items()} == boards
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = [v for service in compose["services"].values() for v in service.get("volumes", [])]
    assert "./k8s/base/monitoring/dashboards:/var/lib/grafana/dashboards/flywheel:ro" in mounts


def test_the_dashboards_filter_every_query_by_their_model_variable():
    """The serving and drift dashboards offer a `model` variable (All by default, which also
    matches series without the label, as a ServiceMonitor's) and every query selects by it. The
    serving board lists the `model` label of the targets prometheus.yml discovers for its
    serving job (the files serving.control writes); tests/test_serving.py runs the queries."""
    folder = K8S / "base" / "monitoring" / "dashboards"
    scrape = {job["job_name"]: job for job in
              yaml.safe_load((REPO / "monitoring" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}
    assert scrape["flywheel-serving"]["file_sd_configs"], "the services are found through their target files"
    for name, definition in [("serving.json", 'label_values(up{job="flywheel-serving"}, model)'),
                             ("drift.json", "label_values(flywheel_monitor_last_run_timestamp_seconds, model_name)")]:
        board = json.loads((folder / name).read_text())
        (variable,) = [v for v in board["templating"]["list"] if v["name"] == "model"]
        assert variable["definition"] == variable["query"] == definition, name
        assert variable["includeAll"] and variable["allValue"] == ".*", name
        unfiltered = [target["expr"] for panel in board["panels"] for target in panel["targets"]
                      if '=~"$model"' not in target["expr"]]
        assert not unfiltered, f"{name}: queries that ignore $model: {unfiltered}"


def test_service_monitors_scrape_what_prometheus_yml_scrapes(rendered):
    scrape = {job["job_name"]: job for job in
              yaml.safe_load((REPO / "monitoring" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}
    for monitor_name, service_name, job_name in [("flywheel-serving", "flywheel-serving", "flywheel-serving"),
                                                 ("flywheel-pushgateway", "flywheel-pushgateway", "pushgateway")]:
        monitor = find(rendered, "ServiceMonitor", monitor_name)
        service = find(rendered, "Service", service_name)
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]), (
            f"ServiceMonitor/{monitor_name} does not select Service/{service_name}")
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == scrape[job_name].get("metrics_path", "/metrics")
        assert endpoint.get("honorLabels", False) == scrape[job_name].get("honor_labels", False)


# ---------------------------------------------------------------- serving


def serving(rendered) -> tuple[dict, dict]:
    deployment = find(rendered, "Deployment", "flywheel-serving")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def test_service_hpa_and_pdb_target_the_serving_pods(rendered):
    deployment, container = serving(rendered)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)

    service = find(rendered, "Service", "flywheel-serving")
    assert selects(service["spec"]["selector"], pod_labels), "the Service selects no serving pod"
    (port,) = service["spec"]["ports"]
    assert named_port(container, port["targetPort"]) == named_port(container, "http")

    hpa = find(rendered, "HorizontalPodAutoscaler", "flywheel-serving")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "flywheel-serving")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; `replicas` would reset it"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for resource in ("cpu", "memory"):  # utilisation targets need requests; OOM needs limits
        assert resource in container["resources"]["requests"] and resource in container["resources"]["limits"]

    pdb = find(rendered, "PodDisruptionBudget", "flywheel-serving")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels), "the PDB selects no serving pod"
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB would block every drain"


def test_serving_listens_and_probes_as_configured(rendered, monkeypatch):
    _, container = serving(rendered)
    env = effective_env(rendered, container)
    assert not flywheel_variables_not_settings(set(env) | set(env_of(container))), "unknown FLYWHEEL_* names"
    settings = settings_from(env, monkeypatch)
    # The service binds settings.serving.host:port (serving/service.py); in a pod that must be
    # every interface and the port the Service and the probes use.
    assert settings.serving.host == "0.0.0.0"
    assert settings.serving.port == named_port(container, "http")
    bentofile = yaml.safe_load((REPO / "serving" / "bentofile.yaml").read_text())
    assert {"name": "FLYWHEEL_SERVING__HOST", "value": "0.0.0.0"} in bentofile["envs"]

    # The probes use BentoML's own health routes: /livez (process up) and /readyz (the
    # service's __is_ready__: models and lookups loaded).
    bentoml_spec = importlib.util.find_spec("bentoml")
    assert bentoml_spec is not None and bentoml_spec.submodule_search_locations
    base_app = Path(next(iter(bentoml_spec.submodule_search_locations))) / "_internal" / "server" / "base_app.py"
    routes = set(re.findall(r'join_paths\(path_prefix, "(/\w+)"\)', base_app.read_text()))
    assert {"/livez", "/readyz"} <= routes, f"BentoML's health routes are now {routes}"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/livez"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert named_port(container, container[probe]["httpGet"]["port"]) == settings.serving.port

    # Where models and the lake come from: the tracking server and S3, never the local defaults.
    assert settings.train.tracking_uri and settings.train.tracking_uri.startswith("http")
    assert settings.lake.startswith("s3://") and settings.lake.endswith("/flywheel/lake")
    assert settings.storage_options.get("aws_server_side_encryption") in bucket_policy_encryptions()


# ---------------------------------------------------------------- training and the work pool


def test_ray_cluster_is_reachable_and_matches_the_driver(rendered, monkeypatch):
    cluster = find(rendered, "RayCluster", "flywheel-ray")
    spec = cluster["spec"]
    assert spec["rayVersion"] == importlib.metadata.version("ray"), (
        "the RayCluster's rayVersion must be the Ray of requirements.lock (the driver's)")
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    settings = settings_from(configmap_data(rendered, SETTINGS_CONFIGMAP), monkeypatch)
    address = re.fullmatch(r"ray://([a-z0-9.-]+):(\d+)", settings.ray.address or "")
    assert address, f"ray.address {settings.ray.address!r} is not a ray:// address"
    host, port = address.groups()
    # KubeRay names the head's Service <cluster>-head-svc.
    assert host in (f"{cluster['metadata']['name']}-head-svc",
                    f"{cluster['metadata']['name']}-head-svc.{NAMESPACE}.svc.cluster.local")
    assert int(port) == named_port(head, "client")
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "trials belong on workers"

    job = kubernetes_job()
    job_image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    images = {head["image"], job_image}
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1, f"driver, head and workers must run one flow-runner image: {images}"

    # Trials checkpoint under FLYWHEEL_HOME/ray: flow runs, head and workers share that path.
    claim = find(rendered, "PersistentVolumeClaim", HOME_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, template in pod_templates(rendered).items():
        if where.startswith("RayCluster") or where.startswith("work pool"):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            (container, *_) = template["spec"]["containers"]
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert str(settings.home) in mounts, f"{where} does not mount FLYWHEEL_HOME"
            claim_name = volumes[mounts[str(settings.home)]].get("persistentVolumeClaim", {}).get("claimName")
            assert claim_name == HOME_CLAIM, f"{where}: FLYWHEEL_HOME is not the shared claim"


def test_pushgateway_setting_points_at_the_pushgateway(rendered, monkeypatch):
    settings = settings_from(configmap_data(rendered, SETTINGS_CONFIGMAP), monkeypatch)
    host, port = (settings.monitor.pushgateway or "").rsplit(":", 1)
    service = find(rendered, "Service", "flywheel-pushgateway")
    assert host.split(".")[0] == service["metadata"]["name"]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_worker_has_least_privilege_and_polls_the_pool(rendered):
    worker = find(rendered, "Deployment", "flywheel-prefect-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:3] == ["prefect", "worker", "start"]
    assert args[args.index("--pool") + 1] == "flywheel-k8s"
    assert args[args.index("--type") + 1] == "kubernetes"
    tag = container["image"].rsplit(":", 1)[1]
    assert tag.split("-")[0] == importlib.metadata.version("prefect"), "worker and lock run different Prefects"
    assert env_of(container)["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["value"] == NAMESPACE
    assert container["livenessProbe"]["httpGet"]["path"] == "/health" and "--with-healthcheck" in args

    account = pod["serviceAccountName"]
    binding = find(rendered, "RoleBinding", "flywheel-prefect-worker")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert binding["roleRef"]["kind"] == "Role"
    role = find(rendered, "Role", binding["roleRef"]["name"])
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    expected = ({("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
                | {("", "pods", v) for v in ("get", "list", "watch")} | {("", "pods/log", "get")})
    assert granted == expected, f"the worker's Role grants {granted - expected} more or {expected - granted} less"
    # Nobody else talks to the API.
    for r in rendered:
        if r["kind"] == "ServiceAccount" and r["metadata"]["name"] != account:
            assert r.get("automountServiceAccountToken") is False, r["metadata"]["name"]


@cache
def kubernetes_pool_template() -> dict:
    return json.loads(K8S_POOL.read_text())


def variable_defaults(template: dict) -> dict[str, Any]:
    return {name: prop["default"] for name, prop in template["variables"]["properties"].items() if "default" in prop}


def check_pool_template(template: dict, pool_type: str) -> None:
    """The checks `prefect work-pool create` and the API apply to a base job template."""
    from prefect.server.schemas.actions import WorkPoolCreate

    assert set(template) == {"job_configuration", "variables"}
    WorkPoolCreate(name=f"flywheel-{pool_type}", type=pool_type, base_job_template=template)
    variables = template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    jsonschema.Draft7Validator(variables).validate(variable_defaults(template))


@cache
def kubernetes_job() -> dict:
    """The Job the worker submits for a flow run, from the pool's template with sample values:
    Prefect's templating, then what prefect-kubernetes does to it (the command split into
    args, as KubernetesWorkerJobConfiguration._populate_command_if_not_present)."""
    from prefect.utilities.templating import apply_values

    template = kubernetes_pool_template()
    values = {**variable_defaults(template), "name": "flywheel-train", "command": "prefect flow-run execute",
              "env": {"PREFECT__FLOW_RUN_ID": str(uuid.uuid4())}, "annotations": {},
              "labels": {"prefect.io/flow-run-id": str(uuid.uuid4())}}
    configuration = apply_values(copy.deepcopy(template["job_configuration"]), values)
    job = configuration["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    if isinstance(container.get("args"), str):
        container["args"] = shlex.split(container["args"])
    return job


def test_kubernetes_work_pool_template_makes_a_valid_job(rendered):
    template = kubernetes_pool_template()
    check_pool_template(template, "kubernetes")
    job = copy.deepcopy(kubernetes_job())
    pod = job["spec"]["template"]["spec"]
    # prefect-kubernetes refuses a template without these two in the pod spec
    # (worker._get_base_job_manifest); the API server drops them with a warning. The rest of
    # the Job is validated strictly.
    assert (pod.pop("parallelism"), pod.pop("completions"), pod["restartPolicy"]) == (1, 1, "Never")
    assert pod["containers"][0]["name"] == "prefect-job"
    validate_builtin(job)

    assert job["metadata"]["namespace"] == NAMESPACE
    accounts = {r["metadata"]["name"] for r in rendered if r["kind"] == "ServiceAccount"}
    assert pod["serviceAccountName"] in accounts and pod["serviceAccountName"] != "flywheel-prefect-worker"
    (container,) = pod["containers"]
    assert {s["configMapRef"]["name"] for s in container["envFrom"]} == {SETTINGS_CONFIGMAP}
    # deployments/prefect.yaml's pull step changes into $FLYWHEEL_REPO.
    assert "$FLYWHEEL_REPO" in (REPO / "deployments" / "prefect.yaml").read_text()
    assert env_of(container)["FLYWHEEL_REPO"]["value"].startswith("/")
    assert not flywheel_variables_not_settings(set(env_of(container)))
    for resource in ("cpu", "memory"):
        assert resource in container["resources"]["requests"] and resource in container["resources"]["limits"]


def test_prefect_yaml_moves_to_the_kubernetes_pool_as_the_readme_says():
    """deployments/README.md switches deployments/prefect.yaml to the flywheel-k8s pool by renaming
    its one pool anchor (`prefect deploy --all` ignores --pool)."""
    text = (REPO / "deployments" / "prefect.yaml").read_text()
    assert "sed 's/name: flywheel-local/name: flywheel-k8s/'" in readme_text()
    assert text.count("name: flywheel-local") == 1
    moved = yaml.safe_load(text.replace("name: flywheel-local", "name: flywheel-k8s"))
    assert moved["deployments"]
    assert {d["work_pool"]["name"] for d in moved["deployments"]} == {"flywheel-k8s"}


# ---------------------------------------------------------------- pods, secrets, credentials

ALLOWED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                        "persistentVolumeClaim", "projected", "secret"}


def test_every_pod_meets_the_restricted_pod_security_standard(rendered):
    namespace = find(rendered, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    problems = []
    for where, template in pod_templates(rendered).items():
        pod = template["spec"]
        pod_context = pod.get("securityContext", {})
        problems += [f"{where}: {key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
        problems += [f"{where}: volume {v['name']} is {sorted(set(v) - {'name'})}"
                     for v in pod.get("volumes", []) if not set(v) - {"name"} <= ALLOWED_VOLUME_TYPES]
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container.get("securityContext", {})
            at = f"{where} container {container['name']}"

            def setting(key: str, context: dict = context, pod_context: dict = pod_context) -> Any:
                return context.get(key, pod_context.get(key))  # the container's wins

            if setting("runAsNonRoot") is not True or setting("runAsUser") == 0:
                problems.append(f"{at}: may run as root")
            if context.get("allowPrivilegeEscalation") is not False or context.get("privileged"):
                problems.append(f"{at}: allowPrivilegeEscalation must be false")
            if "ALL" not in context.get("capabilities", {}).get("drop", []):
                problems.append(f"{at}: must drop ALL capabilities")
            if set(context.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
                problems.append(f"{at}: adds capabilities")
            if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{at}: needs a RuntimeDefault seccomp profile")
            resources = container.get("resources", {})
            if not all(r in resources.get(kind, {}) for kind in ("requests", "limits") for r in ("cpu", "memory")):
                problems.append(f"{at}: needs cpu and memory requests and limits")
    assert not problems, "\n".join(problems)


def test_secrets_are_referenced_never_written(rendered):
    containers = [c for t in pod_templates(rendered).values() for c in t["spec"]["containers"]]
    documented = documented_secret_keys()
    configmaps = {r["metadata"]["name"]: r.get("data", {}) for r in rendered if r["kind"] == "ConfigMap"}
    referenced = set()
    for container in containers:
        for source in container.get("envFrom", []):
            assert "secretRef" not in source, "load secrets by key, not whole"
            assert source["configMapRef"]["name"] in configmaps
        for name, item in env_of(container).items():
            ref = item.get("valueFrom", {})
            if "secretKeyRef" in ref:
                assert ref["secretKeyRef"]["name"] == SECRET_NAME, f"{name} reads another Secret"
                referenced.add(ref["secretKeyRef"]["key"])
            elif "configMapKeyRef" in ref:
                key_ref = ref["configMapKeyRef"]
                assert key_ref["key"] in configmaps.get(key_ref["name"], {}), f"{name}: no {key_ref}"
            elif looks_secret(name):
                pytest.fail(f"{name} is set to a literal value in {container['name']}; use a secretKeyRef")
    assert referenced, "no container reads the Secret"
    assert referenced <= documented, f"deployments/README.md's kubectl create secret lacks {referenced - documented}"


def looks_secret(name: str) -> bool:
    from core.secrets import is_secret_name

    return is_secret_name(name) or bool(re.search(r"(?i)access_key|password|secret", name))


CREDENTIAL_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b"),
    "an AWS secret access key": re.compile(r"(?i)secret_?access_?key[\"']?[ \t]*[:=][ \t]*[\"']?[A-Za-z0-9/+]{30,}"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # A secret-sounding name given a literal value; a ${VAR}, $(command), {{ placeholder }},
    # <...>, ***, a boolean or an empty value is not one. `:secret:` in an ARN is a resource type.
    "a password, token, secret or API key with a value": re.compile(
        r"(?i)(?<!:)(?:pass(?:word|wd)?|token|secret|api[_-]?key)[\"']?[ \t]*[:=][ \t]*[\"']?"
        r"(?![\"'{\[$<*\s]|(?:true|false|null)\b)[^\s\"',}]{3,}"),
    "a bearer token": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]{20,}=*"),
    "a real AWS account number": re.compile(r"arn:aws[a-z-]*:[a-z0-9-]*:[a-z0-9-]*:\d{12}:|\b\d{12}\.dkr\.ecr\."),
}


def _without_interpolations(text: str) -> str:
    """Compose's ``${VAR:?message}`` names a variable, it holds no value (its ``:?`` read as a
    value before)."""
    return re.sub(r"\$\{[^}]*\}", "${}", text)


def test_no_literal_credentials_in_deploy_files():
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    assert len(files) > 10
    found = [f"{path.relative_to(REPO)}: {what}" for path in files for what, pattern in CREDENTIAL_PATTERNS.items()
             if pattern.search(_without_interpolations(path.read_text(errors="replace")))]
    assert not found, "credentials (or credential-shaped values) in deployments/:\n" + "\n".join(found)


# ---------------------------------------------------------------- AWS


def load_policy(path: Path) -> dict:
    return json.loads(path.read_text())


def statements(policy: dict) -> list[dict]:
    listed = policy["Statement"]
    return listed if isinstance(listed, list) else [listed]


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


@pytest.mark.parametrize("path", [*IDENTITY_POLICIES, BUCKET_POLICY], ids=lambda p: p.name)
def test_policy_structure(path: Path):
    policy = load_policy(path)
    assert policy["Version"] == "2012-10-17"
    assert statements(policy)
    for statement in statements(policy):
        sid = statement.get("Sid", statement)
        assert statement.get("Effect") in ("Allow", "Deny"), sid
        assert "Action" in statement and "Resource" in statement, f"{sid}: Action and Resource are required"
        assert "NotAction" not in statement and "NotResource" not in statement, sid
        assert ("Principal" in statement) == (path == BUCKET_POLICY), f"{sid}: Principal only in the bucket policy"
        if statement["Effect"] != "Allow":
            continue
        actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
        assert not {"*", "*:*", "s3:*", "iam:*"} & set(actions), f"{sid}: allows every action of a service"
        assert not any(a.endswith(":*") for a in actions), f"{sid}: allows a service wildcard"
        if "*" in resources:
            # The only action AWS offers on "*" alone: an ECR login token.
            assert actions == ["ecr:GetAuthorizationToken"], f"{sid}: {actions} on every resource"
        for resource in resources:
            if resource.startswith("arn:aws:s3:::") and "/" in resource:
                assert re.fullmatch(r"arn:aws:s3:::BUCKET/flywheel/(lake|mlflow)/\*", resource), (
                    f"{sid}: object access outside the lake and MLflow prefixes: {resource}")
            elif resource.startswith("arn:aws:s3:::"):
                assert resource == "arn:aws:s3:::BUCKET"
                assert statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix"), (
                    f"{sid}: listing the bucket must be limited to the Flywheel prefixes")


@cache
def parliament_module() -> types.ModuleType:
    """parliament 1.6.4 reads its bundled data files with pkg_resources, which setuptools 81
    removed. Where it is missing, a stand-in with the one function parliament calls
    (resource_filename, answered by importlib.resources) is present while parliament
    imports; parliament's analysis itself is unchanged."""
    try:
        import parliament
    except ModuleNotFoundError as error:
        if error.name == "parliament":
            need_module("parliament", "parliament==1.6.4")
        if error.name != "pkg_resources":
            raise
        stand_in = types.ModuleType("pkg_resources")
        stand_in.resource_filename = lambda package, name: str(importlib.resources.files(package) / name)  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stand_in
        try:
            import parliament
        finally:
            del sys.modules["pkg_resources"]
    override = Path(parliament.__file__).parent / "community_auditors" / "config_override.yaml"
    parliament.override_config(str(override))
    return parliament


# Findings reviewed and accepted, with the reason.
ACCEPTED_FINDINGS = {
    # ECS must fetch an ECR login token to pull the image; that token is the credential.
    ("iam-flow-runner-execution-policy.json", "CREDENTIALS_EXPOSURE"),
}


@pytest.mark.parametrize("path", [*IDENTITY_POLICIES, BUCKET_POLICY], ids=lambda p: p.name)
def test_parliament_finds_nothing_to_fix(path: Path):
    parliament = parliament_module()
    analysed = parliament.analyze_policy_string(fill_placeholders(path.read_text()), filepath=path.name,
                                                include_community_auditors=True)
    findings = []
    for finding in analysed.findings:
        parliament.enhance_finding(finding)
        findings.append((finding.issue, finding.severity, finding.detail, finding.location))
    high = [f for f in findings if f[1] in ("HIGH", "CRITICAL")]
    assert not high, f"parliament: {high}"
    unreviewed = [f for f in findings if (path.name, f[0]) not in ACCEPTED_FINDINGS]
    assert not unreviewed, f"parliament: {unreviewed}"


def bucket_policy_encryptions() -> list[str]:
    for statement in statements(load_policy(BUCKET_POLICY)):
        encryption = statement.get("Condition", {}).get("StringNotEquals", {}).get("s3:x-amz-server-side-encryption")
        if statement["Effect"] == "Deny" and encryption:
            return as_list(encryption)
    pytest.fail("the bucket policy does not limit server-side encryption to known algorithms")


def flywheel_roles() -> set[str]:
    """The roles the bucket policy lets at the Flywheel prefixes (and denies everyone else)."""
    denied_to_others = allowed = None
    for statement in statements(load_policy(BUCKET_POLICY)):
        condition = statement.get("Condition", {}).get("ArnNotEquals", {}).get("aws:PrincipalArn")
        if statement["Effect"] == "Deny" and condition:
            denied_to_others = set(as_list(condition))
            assert as_list(statement["Resource"]) == ["arn:aws:s3:::BUCKET/flywheel/*"]
        if statement["Effect"] == "Allow":
            allowed = set(as_list(statement["Principal"]["AWS"]))
    assert denied_to_others and denied_to_others == allowed, "deny others, allow exactly the Flywheel roles"
    return denied_to_others


def test_bucket_policy_requires_tls_encryption_and_the_flywheel_roles():
    found = {"tls": False, "missing header": False}
    for statement in statements(load_policy(BUCKET_POLICY)):
        condition = statement.get("Condition", {})
        if statement["Effect"] != "Deny" or statement["Principal"] != "*":
            continue
        if condition.get("Bool", {}).get("aws:SecureTransport") == "false":
            found["tls"] = as_list(statement["Action"]) == ["s3:*"] and set(as_list(statement["Resource"])) == {
                "arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"}
        if condition.get("Null", {}).get("s3:x-amz-server-side-encryption") == "true":
            found["missing header"] = as_list(statement["Action"]) == ["s3:PutObject"]
    assert found == {"tls": True, "missing header": True}, found
    assert set(bucket_policy_encryptions()) <= {"AES256", "aws:kms", "aws:kms:dsse"}
    assert flywheel_roles() == {"arn:aws:iam::ACCOUNT_ID:role/flywheel",
                                "arn:aws:iam::ACCOUNT_ID:role/flywheel-flow-runner"}


@cache
def ecs_pool_template() -> dict:
    return json.loads(ECS_POOL.read_text())


def ecs_job_configuration() -> dict:
    """The ECS job configuration a flow run gets with the pool's defaults, placeholders filled."""
    from prefect.utilities.templating import apply_values

    template = json.loads(fill_placeholders(ECS_POOL.read_text()))
    values = {**variable_defaults(template), "name": "flywheel-train",
              "env": {"PREFECT__FLOW_RUN_ID": str(uuid.uuid4())}, "labels": {"prefect.io/flow-run-id": "x"}}
    return apply_values(copy.deepcopy(template["job_configuration"]), values)


FARGATE_MEMORY = {256: range(512, 2049, 512), 512: range(1024, 4097, 1024), 1024: range(2048, 8193, 1024),
                  2048: range(4096, 16385, 1024), 4096: range(8192, 30721, 1024),
                  8192: range(16384, 61441, 4096), 16384: range(32768, 122881, 8192)}


def test_ecs_work_pool_template_registers_a_fargate_task_definition(monkeypatch):
    template = ecs_pool_template()
    check_pool_template(template, "ecs")
    configuration = ecs_job_configuration()
    task_definition = copy.deepcopy(configuration["task_definition"])
    # prefect-aws sends cpu and memory as strings (ECSWorker._prepare_task_definition).
    task_definition["cpu"], task_definition["memory"] = str(task_definition["cpu"]), str(task_definition["memory"])
    import botocore.session
    from botocore.validate import ParamValidator

    ecs = botocore.session.get_session().get_service_model("ecs")
    report = ParamValidator().validate(task_definition, ecs.operation_model("RegisterTaskDefinition").input_shape)
    assert not report.has_errors(), report.generate_report()

    assert task_definition["requiresCompatibilities"] == ["FARGATE"]
    assert task_definition["networkMode"] == "awsvpc"
    assert int(task_definition["memory"]) in FARGATE_MEMORY[int(task_definition["cpu"])], "not a Fargate size"
    (container,) = task_definition["containerDefinitions"]
    assert container["essential"] and container["user"].split(":")[0] != "0"
    assert container["name"] == configuration["container_name"]
    network = configuration["network_configuration"]
    report = ParamValidator().validate(network, ecs.shape_for("AwsVpcConfiguration"))
    assert not report.has_errors(), report.generate_report()
    assert network["assignPublicIp"] == "DISABLED" and configuration["vpc_id"]
    assert configuration["task_run_request"]["launchType"] == "FARGATE"
    assert configuration["task_run_request"]["overrides"]["taskRoleArn"] == task_definition["taskRoleArn"]

    # Roles: the task role is one the bucket policy lets in; its log permission is its group.
    roles = {fill_placeholders(r) for r in flywheel_roles()}
    assert task_definition["taskRoleArn"] in roles
    assert task_definition["executionRoleArn"] not in roles, "the execution role needs no data access"
    log_group = container["logConfiguration"]["options"]["awslogs-group"]
    for name in ("iam-flow-runner-task-policy.json", "iam-flow-runner-execution-policy.json"):
        log_statements = [s for s in statements(load_policy(AWS / name)) if "logs:PutLogEvents" in as_list(s["Action"])]
        assert [as_list(s["Resource"]) for s in log_statements] == [
            [f"arn:aws:logs:REGION:ACCOUNT_ID:log-group:{log_group}:*"]], name

    # The flow run's settings: real fields, the S3 lake, the tracking server, the Ray cluster.
    env = {item["name"]: item["value"] for item in container["environment"]}
    assert not flywheel_variables_not_settings(set(env))
    assert not [n for n in env if looks_secret(n)], "secrets belong in Secrets Manager, not the task definition"
    settings = settings_from(env, monkeypatch)
    assert settings.lake == f"s3://{SAMPLES['BUCKET']}/flywheel/lake"
    assert settings.storage_options.get("aws_server_side_encryption") in bucket_policy_encryptions()
    launcher = yaml.safe_load(fill_placeholders(RAY_LAUNCHER.read_text()))
    client_port = re.search(r"--ray-client-server-port=(\d+)", " ".join(launcher["head_start_ray_commands"]))
    assert client_port and settings.ray.address == f"ray://{SAMPLES['RAY_HEAD_HOST']}:{client_port.group(1)}"
    assert container["image"] == launcher["docker"]["image"], "flow runs and Ray nodes must run one image"
    mounts = {m["containerPath"]: m["sourceVolume"] for m in container["mountPoints"]}
    volumes = {v["name"]: v for v in task_definition["volumes"]}
    assert "efsVolumeConfiguration" in volumes[mounts[str(settings.home)]], "FLYWHEEL_HOME must be the shared EFS"


def test_ray_launcher_config_passes_rays_validation():
    config = yaml.safe_load(RAY_LAUNCHER.read_text())
    assert config["provider"]["type"] == "aws" and config["provider"]["region"] == "REGION"
    assert config["head_node_type"] in config["available_node_types"]
    # Ray's own checks (`ray up` runs them after filling in its AWS defaults; no AWS call).
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(copy.deepcopy(config)))
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "trials belong on workers"
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)
    # Workers read the lake as the role `flywheel`; the head only launches workers.
    roles = {arn.rsplit("/", 1)[1] for arn in flywheel_roles()}
    for node_type in workers:
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1] in roles
    assert head["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1] not in roles


def test_placeholders_are_documented_and_filled_consistently(rendered):
    placeholders = documented_placeholders()
    assert placeholders == set(SAMPLES), f"deployments/README.md documents {placeholders}, the test fills {set(SAMPLES)}"
    texts = {p: p.read_text() for p in DEPLOY.rglob("*") if p.is_file() and p != README and CRD_SCHEMAS not in p.parents}
    for name in placeholders:
        assert any(re.search(rf"\b{name}\b", t) for t in texts.values()), f"{name} is documented but unused"
    # Filled in, every ARN and ECR image is well formed: an undocumented placeholder inside
    # one would be left unfilled and fail here.
    for path, text in texts.items():
        filled = fill_placeholders(text)
        for arn in re.findall(r"arn:aws:[^\s\"',]+", filled):
            assert re.fullmatch(r"arn:aws:[a-z0-9-]+:([a-z]{2}-[a-z]+-\d)?:(\d{12})?:[A-Za-z0-9_./:*+=,@-]+", arn), (
                f"{path.name}: {arn}")
        for image in re.findall(r"[\w.-]+\.dkr\.ecr\.[\w.-]+/[\w./-]+:[\w.-]+", filled):
            assert re.fullmatch(r"\d{12}\.dkr\.ecr\.[a-z]{2}-[a-z]+-\d\.amazonaws\.com/flywheel-[a-z-]+:[\w.-]+",
                                image), f"{path.name}: {image}"
    # The cluster overlay, the Kubernetes pool and the ECS pool name the same images.
    runner = kubernetes_pool_template()["variables"]["properties"]["image"]["default"]
    assert runner == ecs_pool_template()["variables"]["properties"]["image"]["default"]
    assert runner == find(rendered, "RayCluster", "flywheel-ray")["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"]
