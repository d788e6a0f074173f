"""The deployment files agree with each other and with the server (no Docker engine runs here;
CI lints the Dockerfile with hadolint)."""

import re

import yaml

from service.settings import OPTIONS, env_name
from tests.conftest import REPO


def seconds(text: str) -> float:
    value, unit = re.fullmatch(r"(\d+)(s|m)", text).groups()
    return float(value) * (60 if unit == "m" else 1)


def test_compose_runs_varserve_on_a_gpu_with_prometheus_scraping_it():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    varserve, prometheus = compose["services"]["varserve"], compose["services"]["prometheus"]
    devices = varserve["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert any(v.endswith(":/models:ro") for v in varserve["volumes"])
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
