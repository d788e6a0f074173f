"""The deployment files agree with each other and with the server (no Docker engine runs here;
CI lints the Dockerfile with hadolint)."""

import json
import re

import yaml

from service.metrics import Metrics
from service.settings import OPTIONS, env_name
from tests.conftest import REPO
from tests.service.harness import ThreadServer, parse_metrics

DASHBOARD = REPO / "deploy" / "grafana" / "varserve-dashboard.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def seconds(text: str) -> float:
    value, unit = re.fullmatch(r"(\d+)(s|m)", text).groups()
    return float(value) * (60 if unit == "m" else 1)


def test_compose_runs_varserve_on_a_gpu_with_prometheus_scraping_it():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    varserve, prometheus = compose["services"]["varserve"], compose["services"]["prometheus"]
    devices = varserve["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    (store,) = [v.split(":")[0] for v in varserve["volumes"] if v.endswith(":/models:ro")]
    # not the Python package ./models: its config would sit in the source tree, and a build would
    # copy the store's checkpoints into the image
    assert (REPO / store).resolve() != (REPO / "models").resolve()
    assert store.removeprefix("./") in (REPO / ".dockerignore").read_text().split()
    assert "/health" in " ".join(varserve["healthcheck"]["test"])
    drain = float(varserve["environment"]["VARSERVE_DRAIN_TIMEOUT_S"])
    assert seconds(varserve["stop_grace_period"]) > drain
    known = {env_name(f) for f in OPTIONS}
    for name in varserve["environment"]:
        assert name in known, name  # every variable is one the server reads
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])  # a pinned tag

    mounted = next(v for v in prometheus["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro"))
    config = yaml.safe_load((REPO / mounted.split(":")[0]).read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["varserve:8000"]


def test_dockerfile_serves_the_mounted_config_as_a_non_root_user():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+$", text, re.M)
    assert 'ENTRYPOINT ["varserve", "serve"]' in text
    assert 'CMD ["--config", "/models/models.toml", "--host", "0.0.0.0"]' in text
    assert re.search(r"^USER 10001", text, re.M) and "HEALTHCHECK" in text and "/health" in text
    assert "gcc" in text and "python3-dev" in text  # Triton's JIT needs them at run time


def test_compose_runs_grafana_on_the_prometheus_with_the_dashboard_provisioned():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana-oss:\d+\.\d+\.\d+", grafana["image"])  # a pinned tag
    assert "3000:3000" in grafana["ports"] and "prometheus" in grafana["depends_on"]
    mounts = {}
    for volume in grafana["volumes"]:
        host, container = volume.split(":")[:2]
        if host.startswith("./"):
            assert (REPO / host).exists(), host  # every mounted file or folder is in the repository
            mounts[container] = REPO / host
    sources = yaml.safe_load((mounts["/etc/grafana/provisioning/datasources"] / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    prometheus_port = compose["services"]["prometheus"]["ports"][0].split(":")[1]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{prometheus_port}"
    providers = yaml.safe_load((mounts["/etc/grafana/provisioning/dashboards"] / "varserve.yml").read_text())
    folder = providers["providers"][0]["options"]["path"]
    dashboards = [c for c in mounts if c.startswith(folder + "/")]
    assert [mounts[c] for c in dashboards] == [DASHBOARD]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in dashboards
    uids = {t["datasource"]["uid"] for p in panels(json.loads(DASHBOARD.read_text())) for t in p["targets"]}
    assert uids == {source["uid"]}


def panels(dashboard: dict) -> list[dict]:
    """The dashboard's query panels (those inside collapsed rows too)."""
    found = []
    for panel in dashboard["panels"]:
        found += [panel] if panel["type"] != "row" else panel.get("panels", [])
    return [p for p in found if "targets" in p]


def exported_names() -> set[str]:
    """Every sample name the server's registry can export (a labelled metric's samples appear once
    its first label set is used)."""
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }


def test_dashboard_queries_name_only_metrics_the_server_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in panels(dashboard) for t in p["targets"]]
    expressions += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    known = exported_names()
    used = set()
    for expr in expressions:
        names = set(re.findall(r"\bvarserve_\w+", expr))
        assert names and names <= known, (expr, names - known)
        used |= names
    for name in (
        "varserve_requests_total",
        "varserve_e2e_request_latency_seconds_bucket",
        "varserve_num_requests_waiting",
        "varserve_batch_size_images_count",
        "varserve_kv_cache_usage_bytes",
        "varserve_image_count_total",
        "varserve_image_pixels_total",
        "varserve_stage_gen_time_s_sum",
    ):
        assert name in used, name

    # the labels the queries select and group by, on a real server's samples after a generation
    with ThreadServer() as server:
        assert server.post({"prompt": 1, "seed": 0}).status_code == 200
        samples = parse_metrics(server.client.get("/metrics").text)
    labels: dict[str, set[str]] = {}
    for name, *pairs in samples:
        labels.setdefault(name, set()).update(label for label, _ in pairs)
    assert used - set(labels) <= {
        n for n in used if re.search(r"(rejected|cancelled|failures|splits|aborted)", n)
    }
    for expr in expressions:
        for name, selector in re.findall(r"(varserve_\w+)\{([^}]*)\}", expr):
            wanted = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
            assert wanted <= labels.get(name, wanted), (expr, name)
        present = set().union(*(labels.get(n, set()) for n in re.findall(r"\bvarserve_\w+", expr)))
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            wanted = {g.strip() for g in group.split(",")}
            assert not present or wanted <= present, (expr, wanted - present)
