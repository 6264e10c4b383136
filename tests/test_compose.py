"""compose.yaml and what it mounts, checked without Docker (CI has no Docker engine).

Every service has an image with a tag or our build, a command that exists
(our modules; config files the command names are mounted), ports the
service really listens on, and bind mounts of files that exist. Prometheus
scrapes services and ports that compose defines; Grafana's datasources
point at them; the provisioned dashboard JSON parses, uses only those
datasources, and its queries name only metrics the services export.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from observability.metrics import QUEUE_GAUGES, Metrics, observe_queue, prometheus_reader

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
GRAFANA = REPO / "observability" / "grafana"
# Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume entry (short syntax)."""
    out = []
    for entry in service.get("volumes") or []:
        source, target = entry.split(":")[:2]
        out.append((source, target))
    return out


def _listens(name: str, service: dict[str, Any]) -> set[int]:
    """The ports this service listens on, from its own configuration."""
    env = _env(service)
    command = [str(c) for c in service.get("command") or []]
    if name == "edge":
        return {int(env["ESCAPEMENT_PORT"])}
    if name in ("worker", "looks"):
        port = env.get("ESCAPEMENT_METRICS_PORT")
        return {int(port)} if port else set()
    if name == "nats":
        monitor = command[command.index("-m") + 1] if "-m" in command else None
        return {4222} | ({int(monitor)} if monitor else set())
    if name == "tempo":
        config = yaml.safe_load((REPO / "observability" / "tempo.yaml").read_text())
        receivers = config["distributor"]["receivers"]["otlp"]["protocols"]
        grpc = int(receivers["grpc"]["endpoint"].rsplit(":", 1)[1])
        return {int(config["server"]["http_listen_port"]), grpc}
    if name == "otel-collector":
        config = yaml.safe_load((REPO / "observability" / "otel-collector.yaml").read_text())
        endpoints = [p["endpoint"] for p in config["receivers"]["otlp"]["protocols"].values()]
        endpoints.append(config["exporters"]["prometheus"]["endpoint"])
        return {int(e.rsplit(":", 1)[1]) for e in endpoints}
    return {"prometheus": {9090}, "grafana": {3000}}[name]


def test_every_service_has_an_image_or_our_build(services):
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            assert (context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
        else:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


def test_commands_exist(services):
    for name, service in services.items():
        command = [str(c) for c in service.get("command") or []]
        if "build" in service:  # our image: python -m <module with a __main__>
            assert command[:2] == ["python", "-m"], name
            spec = importlib.util.find_spec(f"{command[2]}.__main__")
            assert spec is not None and spec.origin, f"{name}: no module {command[2]}"
            continue
        targets = [t for _, t in _mounts(service)]
        for arg in command:  # none: the image's own entrypoint
            path = arg.split("=", 1)[-1]
            if path.startswith("/etc/"):  # a config file the command names must be mounted
                assert path in targets, f"{name}: {path} is not mounted ({targets})"


def test_ports_are_ones_the_services_listen_on(services):
    published: set[int] = set()
    for name, service in services.items():
        listens = _listens(name, service)
        for entry in service.get("ports") or []:
            host, container = (int(p) for p in str(entry).split(":")[-2:])  # [ip:]host:container
            assert container in listens, f"{name}: publishes {container}, listens on {listens}"
            assert host not in published, f"{name}: host port {host} published twice"
            published.add(host)
        for entry in service.get("expose") or []:
            assert int(entry) in listens, f"{name}: exposes {entry}, listens on {listens}"


def test_mounted_files_and_volumes_exist(compose, services):
    named = set(compose.get("volumes") or {})
    for name, service in services.items():
        for source, _ in _mounts(service):
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
        for dep in service.get("depends_on") or []:
            assert dep in services, f"{name} depends on unknown {dep}"


def test_prometheus_scrapes_what_compose_runs(services):
    config = yaml.safe_load((REPO / "observability" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"escapement-edge", "escapement-worker"} <= set(jobs)
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                if host == "localhost":
                    continue
                assert host in services, f"{job['job_name']}: no service {host}"
                assert int(port) in _listens(host, services[host]), target
        for dns in job.get("dns_sd_configs", []):
            for host in dns["names"]:
                assert host in services and dns["port"] in _listens(host, services[host])
    mounted = dict((t, s) for s, t in _mounts(services["prometheus"]))
    assert mounted["/etc/prometheus/prometheus.yml"] == "./observability/prometheus.yml"


def _grafana_mounts(services) -> dict[str, Path]:
    return {t: REPO / s for s, t in _mounts(services["grafana"]) if s.startswith(".")}


def _datasources(services) -> dict[str, dict[str, Any]]:
    provisioning = _grafana_mounts(services)["/etc/grafana/provisioning"]
    sources = {}
    for path in (provisioning / "datasources").glob("*.yaml"):
        for ds in yaml.safe_load(path.read_text())["datasources"]:
            sources[ds["uid"]] = ds
    return sources


def test_grafana_datasources_point_at_compose_services(services):
    for uid, ds in _datasources(services).items():
        host, port = re.match(r"https?://([^:/]+):(\d+)", ds["url"]).groups()
        assert host in services and int(port) in _listens(host, services[host]), uid


def _dashboards(services) -> list[tuple[Path, dict[str, Any]]]:
    mounts = _grafana_mounts(services)
    provider_files = list((mounts["/etc/grafana/provisioning"] / "dashboards").glob("*.yaml"))
    assert provider_files, "no dashboard provider"
    found = []
    for provider_file in provider_files:
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            folder = mounts[provider["options"]["path"]]  # the provider reads a mounted folder
            found += [(p, json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]
    assert found, "no dashboard JSON"
    return found


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


_PROMQL_WORDS = {"by", "without", "and", "or", "unless", "bool", "offset", "on", "ignoring"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, labels or keywords)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group() in _PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


def test_metric_names_of_promql():
    assert metric_names(
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{job=~"x.*"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert metric_names("max(b) / 1000 + count(up == 1)") == {"b", "up"}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every series name our services can put on /metrics: each instrument of
    `Metrics` and every queue gauge recorded once, through the reader `/metrics`
    uses, plus the process collector, on a registry of this test's own."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    provider = MeterProvider(metric_readers=[prometheus_reader(registry)], shutdown_on_exit=False)
    try:
        meter = provider.get_meter("escapement")
        metrics = Metrics(meter)
        for name, instrument in vars(metrics).items():
            if hasattr(instrument, "add"):
                instrument.add(1, {"reason": "x"})
            elif hasattr(instrument, "record"):
                instrument.record(1.0)
            else:
                raise AssertionError(f"Metrics.{name}: not an instrument")
        observe_queue(lambda: {key: [(1.0, {"stream": "S"})] for key in QUEUE_GAUGES}, meter)
        text = generate_latest(registry).decode()
    finally:
        provider.shutdown()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_grafana_dashboard_uses_known_datasources_and_exported_metrics(services, exported):
    sources = _datasources(services)
    for path, dashboard in _dashboards(services):
        assert dashboard["uid"] and dashboard["title"], path
        panels = [p for p in _panels(dashboard) if p["type"] != "row"]
        assert panels, path
        kinds = {sources[p["datasource"]["uid"]]["type"] for p in panels}
        assert {"prometheus", "tempo"} <= kinds, "a metrics panel and a trace panel"
        for panel in panels:
            assert panel.get("description"), f"{panel['title']}: say what it answers"
            assert panel["datasource"]["uid"] in sources, panel["title"]
            for target in panel.get("targets", []):
                uid = (target.get("datasource") or panel["datasource"])["uid"]
                assert uid in sources, panel["title"]
                if sources[uid]["type"] != "prometheus":
                    continue
                unknown = metric_names(target["expr"]) - exported - PROMETHEUS_OWN
                assert not unknown, f"{panel['title']}: {sorted(unknown)} not exported"


def test_readme_says_compose_needs_docker():
    readme = (REPO / "README.md").read_text()
    assert "docker compose up" in readme and "Docker engine" in readme


_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def test_nats_wants_credentials_and_keeps_monitoring_inside(services):
    """NATS runs with the per-role users of observability/nats/nats.conf (tests/test_security.py
    checks that file against the embedded server's); every password comes from the environment,
    and neither monitoring nor NATS itself is published beyond this host."""
    nats_service = services["nats"]
    command = [str(c) for c in nats_service["command"]]
    assert command[command.index("-c") + 1] == "/etc/nats/nats.conf"
    assert "-m" not in command and "--http_port" not in command
    for entry in nats_service.get("ports") or []:
        assert str(entry).startswith("127.0.0.1:"), f"nats publishes {entry} beyond loopback"
    conf = (REPO / "observability" / "nats" / "nats.conf").read_text()
    wanted = set(re.findall(r"\$(NATS_\w+_PASSWORD)", conf))
    assert wanted == {"NATS_EDGE_PASSWORD", "NATS_WORKER_PASSWORD", "NATS_ADMIN_PASSWORD"}
    assert set(_env(nats_service)) >= wanted
    for name, user in (("edge", "edge"), ("worker", "worker")):
        env = _env(services[name])
        assert env["NATS_USER"] == user, name
        password = _DEFAULT.fullmatch(env["NATS_PASSWORD"])
        assert password and password.group(1) == f"NATS_{user.upper()}_PASSWORD", name
    for value in _env(nats_service).values():  # placeholders, overridable, never blank
        match = _DEFAULT.fullmatch(value)
        assert match and match.group(2).startswith("change-me"), value


def test_grafana_wants_a_login(services):
    env = _env(services["grafana"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_AUTH_DISABLE_LOGIN_FORM" not in env
    password = _DEFAULT.fullmatch(env["GF_SECURITY_ADMIN_PASSWORD"])
    assert password and password.group(1) == "GRAFANA_ADMIN_PASSWORD"
