"""What operators deploy (Dockerfile, docker-compose.yml, .env.example, ops/k8s) agrees with
the code: the grace period covers a task's hard limit, the probes are the documented ones,
Redis never evicts, KEDA watches the real queue, stream and group, every FISCAL_* variable is
a real setting, no secret sits in a ConfigMap and the operator console always asks for a
login. Static reads of the files; ops/validate runs
the schema validators (hadolint, compose, kubernetes-validate, check-jsonschema, yamllint)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from worker import app, health, keys
from worker.settings import ENV_PREFIX, Settings


def _yaml_module() -> Any:
    """PyYAML: required once pyproject.toml's [test] extra names it, until then a skip."""
    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    wanted = extras["project"]["optional-dependencies"].get("test", [])
    if any(re.match(r"(?i)pyyaml\b", spec) for spec in wanted):
        import yaml

        return yaml
    return pytest.importorskip("yaml", reason="PyYAML is not installed (not in [test] yet)")


yaml = _yaml_module()

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "ops" / "k8s"
BASE = K8S / "base"
EXAMPLE = K8S / "overlays" / "example"
HEALTH_LIVE = ["python", "-m", "worker.health", "live"]
HEALTH_READY = ["python", "-m", "worker.health", "ready"]
EXPORTER_ARGS = ["metrics", "--serve", "9808", "--host", "0.0.0.0"]  # noqa: S104
FLOWER = ["celery", "-A", "worker.app", "flower", "--port=5555"]
# The operator console: on every address of its container, so it needs credentials.
WEB_PORT = 9810
WEB = ["fiscal-worker", "web", "--host", "0.0.0.0", "--port", str(WEB_PORT)]  # noqa: S104
WEB_HEALTH = "/healthz"
NO_AUTH = "--no-auth"  # allowed on loopback only: never in a deployment
# Settings that carry a secret: never in a ConfigMap or a plain value.
SECRET_SETTINGS = {"FISCAL_REDIS_URL", "FISCAL_WEB_PASSWORD"}


# --- reading the files -------------------------------------------------------------------


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def kustomization(folder: Path) -> dict[str, Any]:
    return load_all(folder / "kustomization.yaml")[0]


def base_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for name in kustomization(BASE)["resources"]:
        objects += load_all(BASE / name)
    return objects


def the(kind: str, name: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [
        obj
        for obj in (base_objects() if objects is None else objects)
        if obj["kind"] == kind and obj["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def deployments() -> list[dict[str, Any]]:
    return [obj for obj in base_objects() if obj["kind"] == "Deployment"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def worker_deployment() -> dict[str, Any]:
    return the("Deployment", "fiscal-worker")


def web_deployment() -> dict[str, Any]:
    return the("Deployment", "fiscal-worker-web")


def secret_file(deployment: dict[str, Any], variable: str) -> tuple[dict[str, Any], str]:
    """The Secret volume holding the file that `variable` names, and that file's path."""
    box = container(deployment)
    path = {e["name"]: e for e in box["env"]}[variable]["value"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for mount in box["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        for item in secret.get("items", []):
            if f"{mount['mountPath']}/{item['path']}" == path:
                assert mount.get("readOnly") is True, f"{mount['name']} is writable"
                return secret, path
    raise AssertionError(f"{variable}={path}: no Secret mounted there")


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (kustomize env files, .env.example); `# KEY=VALUE` lines are left out."""
    pairs: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def documented_env(path: Path) -> set[str]:
    """Every variable .env.example names, set (`KEY=`) or shown with its default (`# KEY=`)."""
    text = path.read_text(encoding="utf-8")
    return set(re.findall(r"^(?:# )?([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))


def compose() -> dict[str, Any]:
    return load_all(ROOT / "docker-compose.yml")[0]


def compose_settings() -> dict[str, str]:
    return compose()["x-settings"]


def is_setting(variable: str) -> bool:
    name = variable.removeprefix(ENV_PREFIX).lower()
    return variable.startswith(ENV_PREFIX) and name in Settings.model_fields


def configmap_settings() -> dict[str, str]:
    """The fiscal-worker-settings ConfigMap as the example overlay renders it (base + merge)."""
    (base,) = kustomization(BASE)["configMapGenerator"]
    (merge,) = kustomization(EXAMPLE)["configMapGenerator"]
    assert base["name"] == merge["name"] == "fiscal-worker-settings"
    assert merge["behavior"] == "merge"
    values: dict[str, str] = {}
    for folder, generator in ((BASE, base), (EXAMPLE, merge)):
        for name in generator["envs"]:
            values |= env_file(folder / name)
    return values


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), one list per stage."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(" ".join(line.split()))
    return stages


def seconds(text: str | int) -> float:
    """A Compose duration (200s, 3m20s) in seconds."""
    if isinstance(text, int):
        return float(text)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts is not None and text, f"not a duration: {text!r}"
    hours, minutes, secs = (int(p or 0) for p in parts.groups())
    return hours * 3600.0 + minutes * 60.0 + secs


# --- the worker pods: stopping, probes -------------------------------------------------------


def test_the_grace_period_covers_a_tasks_hard_time_limit() -> None:
    spec = worker_deployment()["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    # The README's figure: the warm shutdown waits for a running task, up to its hard limit.
    assert grace == 200
    assert grace >= app.TASK_TIME_LIMIT_SECONDS + 10
    # The liveness probe still passes for a worker in its warm shutdown that long.
    assert grace <= health.STOPPING_SECONDS
    # Compose stops a worker the same way.
    assert seconds(compose()["services"]["worker"]["stop_grace_period"]) == grace


def test_no_prestop_hook_delays_the_warm_shutdown() -> None:
    # SIGTERM must reach celery at once (ops/k8s/base/worker.yaml says why none is needed).
    assert "lifecycle" not in container(worker_deployment())


def test_the_probes_run_the_documented_health_commands() -> None:
    worker = container(worker_deployment())
    assert worker["livenessProbe"]["exec"]["command"] == HEALTH_LIVE
    assert worker["startupProbe"]["exec"]["command"] == HEALTH_LIVE
    assert worker["readinessProbe"]["exec"]["command"] == HEALTH_READY
    # A probe that fails only after the health file's own staleness bound, never before.
    live = worker["livenessProbe"]
    assert live["timeoutSeconds"] >= 5
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_the_images_healthcheck_is_the_liveness_command() -> None:
    runtime = dockerfile_stages()[-1]
    (check,) = [line for line in runtime if line.startswith("HEALTHCHECK")]
    assert check.endswith('CMD ["python", "-m", "worker.health", "live"]')


def test_the_health_file_lies_in_the_writable_tmp() -> None:
    worker = container(worker_deployment())
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in worker_deployment()["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert configmap_settings()["FISCAL_HEALTH_FILE"].startswith("/tmp/")
    assert health.DEFAULT_FILE.startswith("/tmp/")


def test_celery_concurrency_is_set_explicitly() -> None:
    # Unset, Celery starts one process per CPU of the node, not of the pod's limit.
    args = container(worker_deployment())["args"]
    assert "--concurrency" in args and int(args[args.index("--concurrency") + 1]) >= 1


# --- security --------------------------------------------------------------------------------


def test_every_pod_runs_as_the_images_non_root_user_read_only_without_capabilities() -> None:
    (user,) = [line for line in dockerfile_stages()[-1] if line.startswith("USER ")]
    uid = int(user.split()[1].split(":")[0])
    assert uid >= 10000
    for deployment in deployments():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False
        context = container(deployment)["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        tmp = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp, f"{deployment['metadata']['name']}: no writable /tmp"


def test_the_redis_url_the_flower_password_and_every_secret_setting_come_from_secrets() -> None:
    for deployment in deployments():
        env = {e["name"]: e for e in container(deployment).get("env", [])}
        assert env["FISCAL_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "fiscal-worker-redis",
            "key": "url",
        }
        for name in SECRET_SETTINGS & set(env):
            assert "value" not in env[name], f"{deployment['metadata']['name']}: plain {name}"
            assert "secretKeyRef" in env[name]["valueFrom"], name
    flower = container(the("Deployment", "fiscal-worker-flower"))
    env = {e["name"]: e for e in flower["env"]}
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == "fiscal-worker-flower"
    # Flower reads it from its environment: never on the command line (`ps` shows it).
    assert not any("basic-auth" in arg for arg in flower["command"] + flower["args"])
    assert (flower["command"] + flower["args"])[: len(FLOWER)] == FLOWER


def test_the_credentials_file_setting_names_the_mounted_secret() -> None:
    pod = worker_deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container(worker_deployment())["volumeMounts"] if m.get("readOnly")]
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "fiscal-worker-clopos"
    (item,) = secret["items"]
    path = f"{mount['mountPath']}/{item['path']}"
    assert configmap_settings()["FISCAL_CLOPOS_CREDENTIALS_FILE"] == path
    assert secret["defaultMode"] & 0o007 == 0  # not readable by other users


def test_the_consoles_users_file_is_the_mounted_web_secret() -> None:
    web = web_deployment()
    secret, _ = secret_file(web, "FISCAL_WEB_USERS_FILE")
    assert secret["secretName"] == "fiscal-worker-web"
    assert secret["defaultMode"] & 0o007 == 0  # not readable by other users
    # 0440 is read through the group: the pod's fsGroup is the group the console runs as.
    pod = web["spec"]["template"]["spec"]
    context = pod["securityContext"]
    assert secret["defaultMode"] & 0o040 and context["fsGroup"] == context["runAsGroup"]
    # The users file, not one shared password; and no Clopos credentials in the console.
    env = {e["name"] for e in container(web)["env"]}
    assert "FISCAL_WEB_PASSWORD" not in env
    assert {v.get("secret", {}).get("secretName") for v in pod["volumes"]} == {
        None,
        "fiscal-worker-web",
    }


def test_the_example_web_secret_is_a_users_file_of_placeholders() -> None:
    (web_secret,) = [
        g for g in kustomization(EXAMPLE)["secretGenerator"] if g["name"] == "fiscal-worker-web"
    ]
    (entry,) = web_secret["files"]
    key, _, name = entry.partition("=")
    secret, _ = secret_file(web_deployment(), "FISCAL_WEB_USERS_FILE")
    assert [item["key"] for item in secret["items"]] == [key]
    users = yaml.safe_load((EXAMPLE / name).read_text(encoding="utf-8"))
    assert users and all(set(user) == {"password_hash", "role"} for user in users.values())
    assert all(user["password_hash"].startswith("scrypt$") for user in users.values())
    assert all(user["role"] in {"viewer", "operator"} for user in users.values())


def test_no_secret_in_the_configmap() -> None:
    settings = configmap_settings()
    assert not SECRET_SETTINGS & set(settings)
    for name, value in settings.items():
        assert not re.search(r"(?i)password|secret|token", name), name
        assert not re.search(r"://[^/@\s]*@", value), f"{name} carries credentials in a URL"


def test_the_example_secrets_are_placeholders() -> None:
    for path in sorted((EXAMPLE / "secrets").iterdir()):
        text = path.read_text(encoding="utf-8")
        assert "CHANGE-ME" in text, f"{path.name} looks like a real secret"


# --- settings: every FISCAL_* variable is real -----------------------------------------------


def test_every_fiscal_variable_of_the_deployment_files_is_a_real_setting() -> None:
    named = set(configmap_settings()) | set(compose_settings())
    named |= {v for v in documented_env(ROOT / ".env.example") if v.startswith(ENV_PREFIX)}
    named |= documented_env(EXAMPLE / "settings.env")  # also the ones shown commented out
    for deployment in deployments():
        named |= {e["name"] for e in container(deployment).get("env", [])}
    for service in compose()["services"].values():
        if isinstance(service.get("environment"), dict):
            named |= set(service["environment"])
    fiscal = {v for v in named if v.startswith(ENV_PREFIX)}
    assert {"FISCAL_REDIS_URL", "FISCAL_CLOPOS_CREDENTIALS_FILE", "FISCAL_WEB_USERS_FILE"} <= fiscal
    assert sorted(v for v in fiscal if not is_setting(v)) == []


def test_compose_defaults_are_the_settings_own_defaults() -> None:
    checked = 0
    for variable, value in compose_settings().items():
        match = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", str(value))
        if match is None:
            continue
        assert match[1] == variable
        field = Settings.model_fields[variable.removeprefix(ENV_PREFIX).lower()]
        assert TypeAdapter(field.annotation).validate_python(match[2]) == field.default, variable
        checked += 1
    assert checked >= 5


def test_the_configmap_stream_is_the_default_ingest_stream() -> None:
    default = Settings.model_fields["ingest_stream"].default
    assert configmap_settings()["FISCAL_INGEST_STREAM"] == default


# --- KEDA --------------------------------------------------------------------------------------


def triggers() -> dict[str, dict[str, Any]]:
    scaled = the("ScaledObject", "fiscal-worker")
    return {trigger["type"]: trigger for trigger in scaled["spec"]["triggers"]}


def test_keda_watches_the_celery_queue_the_app_publishes_to() -> None:
    metadata = triggers()["redis"]["metadata"]
    assert metadata["listName"] == keys.CELERY_QUEUE == app.QUEUE
    assert app.app.conf.task_default_queue == metadata["listName"]
    # The queue length is honest only while no worker hoards messages.
    assert app.app.conf.worker_prefetch_multiplier == 1


def test_keda_watches_the_ingest_stream_and_the_workers_group() -> None:
    metadata = triggers()["redis-streams"]["metadata"]
    assert metadata["stream"] == Settings.model_fields["ingest_stream"].default
    assert metadata["stream"] == configmap_settings()["FISCAL_INGEST_STREAM"]
    assert metadata["consumerGroup"] == keys.INGEST_GROUP
    assert "streamLength" in metadata  # settled entries are deleted: its length is what waits


def test_keda_watches_the_due_results_metric_the_exporter_serves() -> None:
    metadata = triggers()["prometheus"]["metadata"]
    assert metadata["query"] == "sum(fiscal_results_due)"
    assert '"fiscal_results_due"' in (ROOT / "worker" / "metrics.py").read_text()


def test_keda_scales_the_worker_deployment_and_never_to_zero() -> None:
    scaled = the("ScaledObject", "fiscal-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == worker_deployment()["metadata"]["name"]
    # The workers are the stream's consumers and the dispatcher: with none, nothing is queued.
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    # KEDA's CRD types metadata as a map of strings.
    for trigger in scaled["triggers"]:
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["type"]
    # The Deployment leaves its replica count to KEDA.
    assert "replicas" not in worker_deployment()["spec"]


def test_both_redis_triggers_authenticate_from_the_redis_secret() -> None:
    auth = the("TriggerAuthentication", "fiscal-worker-redis")
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"address", "password"}
    assert {ref["name"] for ref in refs.values()} == {"fiscal-worker-redis"}
    for kind in ("redis", "redis-streams"):
        assert triggers()[kind]["authenticationRef"]["name"] == "fiscal-worker-redis"


def test_the_example_redis_secret_has_every_key_the_base_uses() -> None:
    (redis_secret,) = [
        g for g in kustomization(EXAMPLE)["secretGenerator"] if g["name"] == "fiscal-worker-redis"
    ]
    values = env_file(EXAMPLE / redis_secret["envs"][0])
    assert set(values) == {"url", "address", "password"}
    assert f":{values['password']}@" in values["url"]


# --- the rest of the base ----------------------------------------------------------------------


def test_the_pdb_covers_the_worker_pods() -> None:
    pdb = the("PodDisruptionBudget", "fiscal-worker")["spec"]
    assert pdb["selector"] == worker_deployment()["spec"]["selector"]
    assert pdb["maxUnavailable"] == 1


def test_the_pods_spread_over_zones_and_nodes() -> None:
    spec = worker_deployment()["spec"]
    keys_ = {c["topologyKey"] for c in spec["template"]["spec"]["topologySpreadConstraints"]}
    assert keys_ == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in spec["template"]["spec"]["topologySpreadConstraints"]:
        assert constraint["labelSelector"] == spec["selector"]


@pytest.mark.parametrize(
    ("monitor", "service", "deployment"),
    [
        ("fiscal-worker-metrics", "fiscal-worker-metrics", "fiscal-worker-metrics"),
        ("fiscal-worker-flower", "fiscal-worker-flower", "fiscal-worker-flower"),
    ],
)
def test_each_servicemonitor_reaches_a_container_port(
    monitor: str, service: str, deployment: str
) -> None:
    sm = the("ServiceMonitor", monitor)["spec"]
    svc = the("Service", service)
    pod = the("Deployment", deployment)["spec"]["template"]
    assert sm["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = sm["endpoints"]
    (port,) = [p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"]]
    names = {p["name"]: p["containerPort"] for p in container({"spec": {"template": pod}})["ports"]}
    assert port["targetPort"] in names


def test_one_exporter_serves_the_documented_port() -> None:
    exporter = the("Deployment", "fiscal-worker-metrics")
    assert exporter["spec"]["replicas"] == 1
    assert exporter["spec"]["strategy"]["type"] == "Recreate"  # never two scraped at once
    box = container(exporter)
    assert box["command"] == ["fiscal-worker"]
    assert box["args"] == EXPORTER_ARGS
    assert box["ports"] == [{"name": "metrics", "containerPort": 9808}]


def test_the_console_serves_port_9810_probed_on_healthz_through_a_clusterip_service() -> None:
    web = web_deployment()
    box = container(web)
    assert box["command"] + box["args"] == WEB
    assert box["ports"] == [{"name": "http", "containerPort": WEB_PORT}]
    for probe in ("livenessProbe", "readinessProbe"):
        check = box[probe]["httpGet"]
        assert check["path"] == WEB_HEALTH, probe
        assert check["port"] in ("http", WEB_PORT), probe
    # Liveness outlasts a Redis restart (/healthz fails while Redis does not answer).
    live = box["livenessProbe"]
    assert live["periodSeconds"] * live.get("failureThreshold", 3) >= 60
    svc = the("Service", "fiscal-worker-web")
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert svc["spec"]["selector"].items() <= web["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"] == web["spec"]["selector"]["matchLabels"]
    (port,) = svc["spec"]["ports"]
    assert port["port"] == WEB_PORT and port["targetPort"] in ("http", WEB_PORT)
    # Behind an ingress the overlay must name its proxies: by default only loopback is trusted.
    assert Settings.model_fields["web_forwarded_allow_ips"].default == "127.0.0.1"
    # Stateless (sessions in Redis): more than one replica, rolled one at a time.
    assert web["spec"]["replicas"] >= 2
    assert web["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_no_deployment_runs_the_console_without_auth() -> None:
    for deployment in deployments():
        box = container(deployment)
        assert NO_AUTH not in box.get("command", []) + box.get("args", []), deployment
    for name, service in compose()["services"].items():
        argv = list(service.get("entrypoint", [])) + list(service.get("command", []))
        assert NO_AUTH not in argv, name
    # Nor added by an overlay's patch.
    for overlay in sorted((K8S / "overlays").iterdir()):
        for patch in kustomization(overlay).get("patches", []):
            assert NO_AUTH not in str(patch.get("patch", "")), overlay.name


def test_every_file_the_kustomizations_name_exists() -> None:
    folders = [BASE, EXAMPLE, K8S / "components" / "redis"]
    for folder in folders:
        spec = kustomization(folder)
        paths = list(spec.get("resources", [])) + list(spec.get("components", []))
        paths += list(spec.get("configurations", []))
        for generator in spec.get("configMapGenerator", []) + spec.get("secretGenerator", []):
            paths += generator.get("envs", [])
            paths += [f.partition("=")[2] or f for f in generator.get("files", [])]
        for path in paths:
            assert (folder / path).exists(), f"{folder.relative_to(ROOT)}: {path} is missing"


def test_the_example_redis_never_evicts_and_keeps_an_aof() -> None:
    (redis_set,) = load_all(K8S / "components" / "redis" / "redis.yaml")[1:]
    args = container({"spec": redis_set["spec"]})["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"


# --- docker-compose.yml and .env.example --------------------------------------------------------


def test_compose_redis_keeps_an_aof_never_evicts_and_wants_a_password() -> None:
    redis = compose()["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--maxmemory") + 1].startswith("${REDIS_MAXMEMORY")
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test
    assert " -a" not in test  # the password comes from REDISCLI_AUTH, not argv (`ps`)
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")


def test_compose_workers_scale_and_start_once_redis_is_healthy() -> None:
    services = compose()["services"]
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["secrets"] == ["clopos_credentials"]
    settings = compose_settings()
    assert settings["FISCAL_CLOPOS_CREDENTIALS_FILE"] == "/run/secrets/clopos_credentials"
    assert "${REDIS_PASSWORD:?" in settings["FISCAL_REDIS_URL"]
    assert settings["FISCAL_REDIS_URL"].endswith("@redis:6379/0")
    for name in ("exporter", "flower", "web"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_runs_the_exporter_flower_and_the_demo_as_documented() -> None:
    services = compose()["services"]
    exporter = services["exporter"]
    assert exporter["entrypoint"] + exporter["command"] == ["fiscal-worker", *EXPORTER_ARGS]
    flower = services["flower"]
    assert (flower["entrypoint"] + flower["command"])[: len(FLOWER)] == FLOWER
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert "FISCAL_REDIS_URL" in flower["environment"]  # the shared settings merged in
    assert not any("basic-auth" in arg for arg in flower["command"])
    assert services["fake-clopos"]["profiles"] == ["demo"]
    assert services["adapter-sim"]["profiles"] == ["demo"]
    assert services["adapter-sim"]["command"][0] == "adapter-sim"
    fake_url = "http://fake-clopos:8080"
    assert services["adapter-sim"]["command"][-2:] == ["--fake-clopos", fake_url]
    assert env_file(ROOT / ".env.example")["FISCAL_CLOPOS_BASE_URL"] == fake_url
    # The demo services need the [demo] extra, the others only [ops].
    assert "demo" in services["fake-clopos"]["build"]["args"]["EXTRAS"]
    assert services["worker"]["build"]["args"]["EXTRAS"] == "ops"


def test_compose_runs_the_console_with_a_users_file_on_the_hosts_loopback_only() -> None:
    services = compose()["services"]
    web = services["web"]
    assert web["entrypoint"] + web["command"] == WEB
    assert web["ports"] == [f"127.0.0.1:{WEB_PORT}:{WEB_PORT}"]
    assert "FISCAL_REDIS_URL" in web["environment"]  # the shared settings merged in
    # Its users file is a secret; the console needs no Clopos credentials.
    assert web["secrets"] == ["web_users"]
    assert web["environment"]["FISCAL_WEB_USERS_FILE"] == "/run/secrets/web_users"
    assert "FISCAL_WEB_PASSWORD" not in web["environment"]
    users = compose()["secrets"]["web_users"]["file"]
    folder = (ROOT / users).parent
    ignored = (folder / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert Path(users).name in ignored, f"{users} is not ignored by git"
    # The image's healthcheck is the worker's: replaced by the console's /healthz.
    test = " ".join(web["healthcheck"]["test"])
    assert f"http://127.0.0.1:{WEB_PORT}{WEB_HEALTH}" in test and test.startswith("CMD python")


def test_compose_publishes_ports_on_the_hosts_loopback_only() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_every_variable_compose_reads_is_in_env_example_and_no_other() -> None:
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    read = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    read |= {s["environment"] for s in compose()["secrets"].values() if "environment" in s}
    documented = documented_env(ROOT / ".env.example")
    assert sorted(read - documented) == []
    assert sorted(documented - read) == []


def test_env_example_holds_no_real_secret() -> None:
    values = env_file(ROOT / ".env.example")
    for name in ("REDIS_PASSWORD", "FLOWER_BASIC_AUTH"):
        assert "change-me" in values[name]
    # The credentials are the fake Clopos API's demo brand, nothing else.
    credentials = yaml.safe_load(values["CLOPOS_CREDENTIALS_JSON"].strip("'"))
    assert credentials == {
        "openapitest": {"client_id": "demo-client", "client_secret": "demo-secret"}
    }


# --- the Dockerfile ----------------------------------------------------------------------------


def test_the_image_is_multi_stage_with_no_build_tools_in_the_last() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    runtime = " ".join(stages[-1])
    assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", runtime)
    assert "COPY --from=builder" in runtime
    builder = " ".join(stages[0])
    assert re.search(r"pip install [^&]*-c requirements\.lock", builder)
    assert "ARG EXTRAS=ops" in builder and '".[${EXTRAS}]"' in builder


def test_the_image_runs_the_worker_unbuffered_without_bytecode_writes() -> None:
    runtime = dockerfile_stages()[-1]
    env = " ".join(line for line in runtime if line.startswith("ENV "))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    (entrypoint,) = [line for line in runtime if line.startswith("ENTRYPOINT")]
    assert entrypoint == 'ENTRYPOINT ["celery", "-A", "worker.app", "worker"]'
    (cmd,) = [line for line in runtime if line.startswith("CMD")]
    assert cmd == 'CMD ["--loglevel", "INFO"]'


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied: set[str] = set()
    for stage in dockerfile_stages():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                copied |= {p.rstrip("/").removeprefix("./") for p in line.split()[1:-1]}
    assert copied and copied <= allowed
    assert all((ROOT / path).exists() for path in copied)


# --- hygiene ----------------------------------------------------------------------------------


def ops_files() -> list[Path]:
    files = [ROOT / name for name in ("Dockerfile", ".dockerignore", "docker-compose.yml")]
    files += [ROOT / ".env.example", ROOT / ".yamllint"]
    files += sorted(p for p in (ROOT / "ops" / "k8s").rglob("*") if p.is_file())
    files += sorted(p for p in (ROOT / "ops" / "schemas").rglob("*") if p.is_file())
    files += [ROOT / "ops" / "validate", ROOT / "ops" / "requirements.txt"]
    files += sorted(p for p in (ROOT / "ops" / "compose").rglob("*") if p.is_file())
    files += [ROOT / "ops" / "DEPLOY.md", ROOT / "ops" / "RUNBOOK.md"]
    return [p for p in files if "__pycache__" not in p.parts]


# Split so that this file does not name them itself.
MACHINE_PATHS = ("/wo" + "rk/", "/tmp/" + "fw", "../sh" + "ared")


def test_no_file_names_a_path_of_the_build_machine() -> None:
    machine = re.compile("|".join(re.escape(p) for p in MACHINE_PATHS))
    for path in ops_files():
        assert not machine.search(path.read_text(encoding="utf-8")), path.relative_to(ROOT)


def test_ops_validate_is_an_executable_strict_bash_script() -> None:
    script = ROOT / "ops" / "validate"
    assert script.stat().st_mode & 0o111
    lines = script.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
