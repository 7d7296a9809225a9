"""deploy/: Dockerfile, compose, KubeRay/Kubernetes and `ray up` configs agree with each other
and with pyproject.toml (one image tag, one Python, one Ray version, SHARDGRAD_ settings)."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.helpers import require

yaml = require("yaml")

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_PIN = next(
    re.fullmatch(r"ray\[[^]]*\]==(\S+)", dep).group(1)
    for dep in PYPROJECT["project"]["dependencies"]
    if dep.startswith("ray[")
)
PYTHON = re.fullmatch(r">=(\d+\.\d+)", PYPROJECT["project"]["requires-python"]).group(1)
RAY_PORTS = {6379, 8265, 10001, 52365}
IMAGE = re.compile(r"(?:.+/)?shardgrad:(?P<tag>[^:/]+)")


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def k8s_docs() -> list[dict]:
    """The objects of deploy/k8s as written (tests/test_deploy_k8s.py checks them rendered)."""
    paths = sorted((DEPLOY / "k8s").rglob("*.yaml"))
    docs = [doc for path in paths if path.name != "kustomization.yaml" for doc in load_all(path)]
    return [doc for doc in docs if "kind" in doc and "metadata" in doc]


def kustomization(path: str = "base") -> dict:
    return load_all(DEPLOY / "k8s" / path / "kustomization.yaml")[0]


def k8s(kind: str, name: str | None = None) -> dict:
    found = [d for d in k8s_docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert found, f"no {kind} {name or ''} in deploy/k8s"
    return found[0]


def compose() -> dict:
    return load_all(DEPLOY / "compose.yaml")[0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def pod_containers() -> dict[str, dict]:
    """Every container of the RayCluster and the API Deployment, by name."""
    ray = k8s("RayCluster")
    templates = [ray["spec"]["headGroupSpec"]["template"]]
    templates += [group["template"] for group in ray["spec"]["workerGroupSpecs"]]
    templates.append(k8s("Deployment", "shardgrad-api")["spec"]["template"])
    return {c["name"]: c for t in templates for c in t["spec"]["containers"]}


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert match, f"deploy/Dockerfile has no ARG {name}=..."
    return match.group(1)


def test_every_yaml_file_parses():
    paths = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert {p.relative_to(DEPLOY).as_posix() for p in paths} >= {
        "compose.yaml",
        "ray-up.yaml",
        "k8s/base/raycluster.yaml",
        "k8s/base/api.yaml",
        "k8s/base/postgres.yaml",
        "k8s/secret.yaml",
        "k8s/overlays/ha/kustomization.yaml",
        "k8s/overlays/ingress/ingress.yaml",
    }
    for path in paths:
        docs = load_all(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_versions_match_pyproject():
    assert dockerfile_arg("RAY_VERSION") == RAY_PIN
    assert dockerfile_arg("PYTHON_VERSION") == PYTHON
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:${PYTHON_VERSION}-slim" in dockerfile
    # Ray comes from constraints.txt (tests/test_deploy_constraints.py); the image checks it.
    assert f"ray=={RAY_PIN}" in (REPO / "constraints.txt").read_text().splitlines()
    assert "assert ray.__version__ == '${RAY_VERSION}'" in dockerfile
    assert k8s("RayCluster")["spec"]["rayVersion"] == RAY_PIN
    setup = " ".join(load_all(DEPLOY / "ray-up.yaml")[0]["setup_commands"])
    assert f"ray.__version__ == '{RAY_PIN}'" in setup
    assert f"python{PYTHON} -m venv" in setup
    assert f"shardgrad-{VERSION}-py3-none-any.whl" in setup


def test_one_image_tag_everywhere():
    # deploy/k8s names the image `shardgrad`; kustomize's `images:` sets it in one place.
    assert {c["image"] for c in pod_containers().values()} == {"shardgrad"}
    (image,) = [i for i in kustomization()["images"] if i["name"] == "shardgrad"]
    images = [f"{image['newName']}:{image['newTag']}"] * len(pod_containers())
    services = compose()["services"]
    images += [s["image"] for s in services.values() if "shardgrad" in s.get("image", "")]
    assert len(images) == 3 + 3  # head, workers, API in k8s; ray-head, ray-worker, api in compose
    tags = {IMAGE.fullmatch(image).group("tag") for image in images}
    assert tags == {VERSION}, f"image tags {tags}; expected shardgrad:{VERSION} everywhere"
    for name in ("ray-head", "ray-worker", "api"):
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_compose_services():
    services = compose()["services"]
    assert set(services) == {"postgres", "ray-head", "ray-worker", "api"}
    assert services["postgres"]["image"] == "postgres:16"
    assert services["ray-worker"]["deploy"]["replicas"] == 2
    for name, service in services.items():
        assert "test" in service.get("healthcheck", {}), f"{name} has no health check"

    api = services["api"]
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "ray-head" in api["depends_on"]
    env = api["environment"]
    assert env["SHARDGRAD_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["SHARDGRAD_DATA_DIR"] == "/data"
    assert env["SHARDGRAD_API_TOKEN"].startswith("${SHARDGRAD_API_TOKEN")
    assert env["RAY_ADDRESS"] == "ray-head:6379"
    bad = [k for k in env if not k.startswith(("SHARDGRAD_", "RAY_"))]
    assert not bad, f"api settings must use the SHARDGRAD_ prefix: {bad}"

    # Token auth on in every Ray process, one token for all.
    for name in ("ray-head", "ray-worker", "api"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"
        assert services[name]["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN")

    # The checkpoint volume in the API only: the coordinators write every checkpoint.
    assert services["api"]["volumes"] == ["data:/data"]
    for name in ("ray-head", "ray-worker"):
        assert not services[name].get("volumes"), name


def _bytes(size: str | int) -> int:
    """A size as compose ("1gb", "4g") or Kubernetes ("1Gi", "805306368") writes it."""
    number, unit = re.fullmatch(r"(\d+)([kmg]i?b?)?", str(size), re.I).groups()
    return int(number) * 1024 ** ("kmg".index(unit[0].lower()) + 1 if unit else 0)


def test_compose_sizes_memory_like_kubernetes():
    """Object store < /dev/shm < memory limit, with the same numbers, role by role."""
    services = compose()["services"]
    ray = k8s("RayCluster")["spec"]
    api = k8s("Deployment", "shardgrad-api")["spec"]["template"]
    api_store = env_of(api["spec"]["containers"][0])["RAY_OBJECT_STORE_MEMORY"]["value"]
    head, workers = ray["headGroupSpec"], ray["workerGroupSpecs"][0]
    kube = {
        "ray-head": (head["rayStartParams"], head["template"]),
        "ray-worker": (workers["rayStartParams"], workers["template"]),
        "api": ({"object-store-memory": api_store}, api),
    }
    for name, (params, template) in kube.items():
        shm = next(v for v in template["spec"]["volumes"] if v["name"] == "dshm")
        container = template["spec"]["containers"][0]
        expected = (
            _bytes(params["object-store-memory"]),
            _bytes(shm["emptyDir"]["sizeLimit"]),
            _bytes(container["resources"]["limits"]["memory"]),
        )
        service = services[name]
        got = (
            _bytes(service["environment"]["RAY_OBJECT_STORE_MEMORY"]),
            _bytes(service["shm_size"]),
            _bytes(service["mem_limit"]),
        )
        assert got == expected, name
        assert got[0] < got[1] < got[2], name


def test_compose_publishes_only_the_api():
    services = compose()["services"]
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"api"}
    for spec in services["api"]["ports"]:
        container_port = int(str(spec).rsplit(":", 1)[-1].split("/")[0])
        assert container_port == 8000 and container_port not in RAY_PORTS
    for service in services.values():
        assert not service.get("expose") and service.get("network_mode") != "host"


def test_kubernetes_manifests():
    ray = k8s("RayCluster")
    assert ray["apiVersion"] == "ray.io/v1"
    assert ray["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert ray["spec"]["workerGroupSpecs"][0]["replicas"] >= 2

    # Every Secret key a manifest reads has its placeholder in secret.yaml.
    secrets = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "Secret"}
    assert "auth_token" in secrets[ray["spec"]["authOptions"]["secretName"]]["stringData"]
    for name, container in {**pod_containers(), "postgres": postgres_container()}.items():
        for entry in container.get("env", []):
            if ref := entry.get("valueFrom", {}).get("secretKeyRef"):
                assert ref["key"] in secrets[ref["name"]]["stringData"], (name, ref)

    env = env_of(pod_containers()["api"])
    assert env["RAY_ADDRESS"]["value"] == f"{ray['metadata']['name']}-head-svc:6379"
    assert env["SHARDGRAD_DATA_DIR"]["value"] == "/data"
    assert env["SHARDGRAD_DATABASE_URL"]["value"].startswith("postgresql+psycopg://")
    bad = [k for k in env if not k.startswith(("SHARDGRAD_", "RAY_"))]
    assert not bad, f"api settings must use the SHARDGRAD_ prefix: {bad}"

    service = k8s("Service", "shardgrad-api")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not any(
        d["kind"] == "Service" and d["spec"].get("type") in ("NodePort", "LoadBalancer")
        for d in k8s_docs()
    )
    ingress = k8s("Ingress")
    assert ingress["spec"]["tls"][0]["secretName"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "shardgrad-api"


def postgres_container() -> dict:
    return k8s("StatefulSet", "shardgrad-postgres")["spec"]["template"]["spec"]["containers"][0]


def test_kustomizations_list_the_manifests_but_not_the_secret_placeholders():
    base = DEPLOY / "k8s" / "base"
    assert set(kustomization()["resources"]) == {p.name for p in base.glob("*.yaml")} - {
        "kustomization.yaml"
    }
    assert kustomization(".")["resources"] == ["base"]
    for overlay in ("ha", "ingress"):
        assert "../../base" in kustomization(f"overlays/{overlay}")["resources"], overlay
    every = (DEPLOY / "k8s").rglob("kustomization.yaml")
    assert not any("secret.yaml" in path.read_text() for path in every)


def test_ray_up_config_is_valid_for_ray():
    config = load_all(DEPLOY / "ray-up.yaml")[0]
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert "~/.ray/auth_token" in config["file_mounts"]

    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))  # what `ray up` checks before it connects


def test_docker_build_context_holds_what_the_dockerfile_copies():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the context must start from nothing (no .venv, var/, runs/)"
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            assert set(sources) <= kept, f"{line!r} copies files the context leaves out"


def test_shell_scripts_parse():
    for script in ("local-cluster.sh", "docker-entrypoint.sh"):
        path = DEPLOY / script
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="needs the docker compose plugin")
def test_docker_compose_config(monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "SHARDGRAD_API_TOKEN", "POSTGRES_PASSWORD"):
        monkeypatch.setenv(name, "0" * 32)
    proc = subprocess.run(
        ["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
