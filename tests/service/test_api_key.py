"""--api-key (vLLM's): /v1/* requires a Bearer key, probes stay open, /metrics only when protected."""

import pytest

from service.server import build_server
from service.settings import Settings
from tests.service.harness import CONFIG, ThreadServer, metric
from tests.service.test_settings import parse

KEYS = ("first-key", "second-key")


@pytest.fixture(scope="module")
def guarded():
    with ThreadServer(api_keys=KEYS) as s:
        yield s


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer("first-key-but-longer"),
        {"Authorization": "Basic first-key"},
        {"Authorization": "Bearer"},
    ],
)
def test_v1_routes_answer_401_without_a_valid_key(guarded, headers):
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("POST", "/v1/images/generations", {"prompt": 1}),
        ("POST", "/v1/generate", {"prompt": 1, "stream": True}),
    ):
        r = guarded.client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        assert error["code"] == 401 and "Authorization: Bearer" in error["message"]


def test_every_key_opens_the_v1_routes_and_probes_stay_open(guarded):
    for key in KEYS:
        assert guarded.client.get("/v1/models", headers=bearer(key)).status_code == 200
    r = guarded.client.post("/v1/images/generations", json={"prompt": 1, "seed": 0}, headers=bearer(KEYS[1]))
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    for path in ("/health", "/ready", "/metrics"):  # probes and scrapers need no key
        assert guarded.client.get(path).status_code == 200, path
    # refused requests are counted like any other answer
    assert metric(guarded.metrics(), "varserve_requests_total", route="/v1/models", status="401") >= 1
    # the OpenAPI document declares the key, so /docs offers "Authorize" and sends it
    spec = guarded.client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {"HTTPBearer": {"type": "http", "scheme": "bearer"}}
    for path in ("/v1/models", "/v1/images/generations", "/v1/generate"):
        operation = next(iter(spec["paths"][path].values()))
        assert operation["security"] == [{"HTTPBearer": []}], path
    assert "security" not in spec["paths"]["/health"]["get"]


def test_protect_metrics_puts_metrics_behind_the_key_too():
    with ThreadServer(api_keys=KEYS[:1], protect_metrics=True) as s:
        assert s.client.get("/metrics").status_code == 401
        assert s.client.get("/metrics", headers=bearer(KEYS[0])).status_code == 200
        assert s.client.get("/health").status_code == 200


def test_without_a_key_the_server_is_open_and_says_so_beyond_loopback(capfd):
    build_server(Settings(config=CONFIG, host="127.0.0.1", port=0))  # built, never started
    assert "no --api-key" not in capfd.readouterr().err  # loopback only: nothing to say
    build_server(Settings(config=CONFIG, host="0.0.0.0", port=0))
    assert "no --api-key: every /v1 route is open" in capfd.readouterr().err


def test_key_settings_from_flag_file_and_environment(tmp_path):
    assert parse("--api-key", "abc").api_keys == ("abc",)
    assert parse(env={"VARSERVE_API_KEY": "from-env"}).api_keys == ("from-env",)
    keys = tmp_path / "keys"
    keys.write_text("# team keys\none\n\n  two  \n")
    assert parse("--api-key", str(keys)).api_keys == ("one", "two")
    assert parse().api_keys is None and parse().protect_metrics is False
    assert parse("--protect-metrics").protect_metrics is True
    assert parse(env={"VARSERVE_PROTECT_METRICS": "1"}).protect_metrics is True
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="--api-key: .* holds no key"):
        parse("--api-key", str(empty))
    with pytest.raises(ValueError, match="--api-key: /run/secrets/keys: no such key file"):
        parse("--api-key", "/run/secrets/keys")
    with pytest.raises(ValueError, match="--api-key: a key is one non-empty word"):
        parse("--api-key", "two words")
    with pytest.raises(ValueError, match="VARSERVE_PROTECT_METRICS: 'maybe' is not one of"):
        parse(env={"VARSERVE_PROTECT_METRICS": "maybe"})
    assert "secret" not in repr(Settings(config=keys, api_keys=("secret",)))  # never printed
