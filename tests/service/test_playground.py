"""The playground page (`/`, `/playground`) and `/docs` in a real browser, headless Chromium driven by
Selenium, against a real server with the fixture VAR; and, with plain httpx, that the pages name no
other host (they must work offline). Without Chromium the browser tests skip, except under CI=true,
where a missing browser is a failure (.ci/run installs it)."""

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.service.harness import ThreadServer, bundled_model_config

CHROMIUM = Path("/usr/bin/chromium")  # Debian's packages: chromium, chromium-driver
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without the background-networking flags, Chromium on a machine with no outside network stalls.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)
WAIT_S = 60  # the bound on every wait; never reached when things work
KEY = "playground-key"
URL = re.compile(r"https?://[^\s\"'<>)]+")


@pytest.fixture(scope="module")
def server():
    with ThreadServer(max_batch_size=4, timeout_s=60) as s:
        yield s


def browser_missing() -> str | None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not missing:
        return None
    return (
        f"no browser for the playground tests: {', '.join(missing)} missing "
        "(apt-get install chromium chromium-driver; pip install -e '.[dev]')"
    )


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = browser_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # the driver's path given: Selenium Manager does not look for (or download) one
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
        condition, f"timed out waiting for {what}"
    )


def page_state(driver) -> dict:
    return driver.execute_script("return window.varservePlayground")


def fill(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def open_playground(driver, server, path: str = "/playground") -> None:
    from selenium.webdriver.common.by import By

    driver.get(server.url + path)
    wait(driver, lambda d: d.find_element(By.ID, "generate").is_enabled(), "the models to be listed")


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Saved to pytest's tmp_path, and also to $VARSERVE_SCREENSHOT_DIR when set."""
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    if os.environ.get("VARSERVE_SCREENSHOT_DIR"):
        target = Path(os.environ["VARSERVE_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def assert_only_local_resources(driver, server) -> None:
    """Everything the page loaded came from the server itself (or a data: URL)."""
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    foreign = [n for n in names if not (n.startswith(server.url + "/") or n.startswith("data:"))]
    assert not foreign, foreign


def test_pages_name_no_other_host(server):
    """Offline: the playground, its assets and the API docs pages reference no URL of another host,
    and the docs' assets are served by the server itself (what the browser loads is checked below)."""
    for path in ("/", "/playground", "/static/playground.js", "/static/playground.css", "/docs", "/redoc"):
        r = server.client.get(path)
        assert r.status_code == 200, path
        foreign = [u for u in URL.findall(r.text) if not u.startswith(server.url)]
        assert not foreign, (path, foreign)
    assert server.client.get("/").text == server.client.get("/playground").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', server.client.get("/docs").text)
    assert "/static-offline-docs/swagger-ui-bundle.js" in assets, assets
    for asset in assets:
        assert asset.startswith("/") and server.client.get(asset).status_code == 200, asset


def test_playground_lists_the_models_and_streams_an_image(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_playground(browser, server, "/")
    models = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options]
    assert models == ["var-fixture"]
    info = browser.find_element(By.ID, "model-info").text
    assert "VAR" in info and "10 classes" in info and "256×256" in info, info
    classes = Select(browser.find_element(By.ID, "class-select")).options
    assert [o.get_attribute("value") for o in classes[:10]] == [str(i) for i in range(10)]
    assert browser.find_element(By.ID, "top_p").get_attribute("value") == "0.96"  # the card's defaults
    assert browser.find_element(By.ID, "cfg_scale").get_attribute("value") == "1.5"
    assert browser.find_element(By.ID, "extra-options").is_displayed()  # the VAR card offers KV policies

    Select(browser.find_element(By.ID, "class-select")).select_by_value("3")
    fill(browser, "seed", "7")
    fill(browser, "n", "1")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: page_state(d)["status"] in ("done", "error"), "the generation to end")
    state = page_state(browser)
    assert state["status"] == "done", state["lastError"]
    run = state["run"]
    # the page drew a preview per scale, and the first one before the result had even arrived
    assert run["previews"] == 10 and run["total"] == 10, run
    assert run["startedAt"] < run["firstPreviewAt"] < run["resultReceivedAt"] <= run["resultShownAt"], run

    images = browser.find_elements(By.CSS_SELECTOR, "#gallery img[data-final='true']")
    assert len(images) == 1
    for image, seed in zip(images, (7,), strict=True):
        src = image.get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
        assert size == [256, 256]
        tile = image.find_element(By.XPATH, "ancestor::figure")
        assert f"seed {seed}" in tile.text
        download = tile.find_element(By.CSS_SELECTOR, "a.download")
        assert download.is_displayed() and download.get_attribute("href") == src
        assert download.get_attribute("download") == f"var-fixture-seed{seed}.png"

    usage = {
        dd.get_attribute("data-field"): dd.get_attribute("data-value")
        for dd in browser.find_elements(By.CSS_SELECTOR, "#usage dd[data-value]")
    }
    assert set(usage) == {
        "latency_ms",
        "queue_ms",
        "inference_ms",
        "forward_passes",
        "kv_bytes",
        "kv_bytes_full",
        "kv_bytes_working",
        "batch_images",
    }
    assert usage["forward_passes"] == "10" and usage["batch_images"] == "1"
    assert float(usage["latency_ms"]) >= float(usage["inference_ms"]) > 0
    assert browser.find_element(By.ID, "usage").is_displayed()
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert_only_local_resources(browser, server)
    screenshot(browser, tmp_path, "playground")


def test_the_pages_sse_parser_reads_events_split_anywhere(browser, server):
    """The page parses the stream itself (fetch, since EventSource cannot POST): events split at
    any byte, \r\n or \n line ends, several data lines, comments (pings) skipped."""
    open_playground(browser, server)
    stream = 'event: preview\r\ndata: {"step": 0}\r\n\r\n: ping\r\n\r\nevent: result\ndata: a\ndata: b\n\nevent: x\r\n'
    expected = [{"event": "preview", "data": '{"step": 0}'}, {"event": "result", "data": "a\nb"}]
    for cut in range(len(stream) + 1):
        events = browser.execute_script(
            """const push = window.varservePlayground.sseParser();
            return [...push(arguments[0]), ...push(arguments[1]), ...push("", true)];""",
            stream[:cut],
            stream[cut:],
        )
        assert events == expected, (cut, events)


def test_kv_options_show_from_the_var_card_and_reach_the_server(browser, server):
    """The VAR card offers kv_policies and kv_budget: the page renders them (no speculative option:
    the card does not offer one), a chosen policy and budget are sent, and a bad budget comes
    back as the server's message naming the field; a card without them hides the section."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_playground(browser, server)
    section = browser.find_element(By.ID, "extra-options")
    assert section.is_displayed()
    policies = Select(browser.find_element(By.ID, "extra-kv_policy"))
    assert [o.get_attribute("value") for o in policies.options] == [
        "",
        "full",
        "window",
        "snapkv",
        "hack",
        "scalekv",
        "heatkv",
        "valuekv",
    ]
    budget = browser.find_element(By.ID, "extra-kv_budget")
    assert budget.get_attribute("placeholder") == "1"
    assert not browser.find_elements(By.ID, "extra-speculative.method")
    policies.select_by_value("snapkv")
    budget.send_keys("0.1")
    browser.find_element(By.ID, "generate").click()
    wait(
        browser,
        lambda d: browser.execute_script("return window.varservePlayground.status") == "done",
        "the run",
    )
    usage = browser.find_element(By.ID, "usage").text
    assert "KV cache, stored" in usage, usage
    budget.clear()
    budget.send_keys("2")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait(browser, lambda d: error.is_displayed(), "the error to show")
    assert "kv_budget: Input should be less than or equal to 1" in error.text, error.text
    browser.execute_script(
        """const card = window.varservePlayground.models[0];
        delete card.kv_policies; delete card.kv_budget;
        document.getElementById("model").dispatchEvent(new Event("change"));"""
    )
    assert not section.is_displayed()


def test_speculative_options_render_from_a_next_token_card_and_are_sent_nested(browser, server):
    """A next-token card's speculative options (here put on the fixture VAR's card, which offers
    none) render as a method select and inputs with the card's defaults, and the request carries
    them as one `speculative` object: the VAR model answers 400 naming that field."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_playground(browser, server)
    browser.execute_script(
        """const card = window.varservePlayground.models[0];
        Object.assign(card, {speculative_methods: ["none", "sjd", "scd", "gsd"], speculative_window: "auto",
                             speculative_group: 7, speculative_p_threshold: 0.15, speculative_distance: 1.0});
        document.getElementById("model").dispatchEvent(new Event("change"));"""
    )
    method = Select(browser.find_element(By.ID, "extra-speculative.method"))
    assert [o.get_attribute("value") for o in method.options] == ["", "none", "sjd", "scd", "gsd"]
    window = browser.find_element(By.ID, "extra-speculative.window")
    assert window.get_attribute("placeholder") == "auto"
    assert browser.find_element(By.ID, "extra-speculative.group").get_attribute("placeholder") == "7"
    method.select_by_value("gsd")
    window.send_keys("8")
    browser.find_element(By.ID, "extra-speculative.group").send_keys("2")
    body = browser.execute_script(
        "return JSON.parse(window.varservePlayground.requestBody(window.varservePlayground.models[0]).text)"
    )
    assert body["speculative"] == {"method": "gsd", "window": 8, "group": 2}, body
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait(browser, lambda d: error.is_displayed(), "the error to show")
    assert "speculative" in error.text and "next-scale" in error.text, error.text


@pytest.mark.parametrize(
    "field, value, status, message",
    [
        ("seed", "-1", 422, "seed: Input should be greater than or equal to 0"),
        ("temperature", "0", 422, "temperature: Input should be greater than 0"),
        ("class-name", "golden retriever", 400, "1000-class (ImageNet) models and models with class_names"),
    ],
)
def test_playground_shows_the_servers_error_message(browser, server, tmp_path, field, value, status, message):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_playground(browser, server)
    if field == "class-name":
        Select(browser.find_element(By.ID, "class-select")).select_by_value("__custom__")
    fill(browser, field, value)
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait(browser, lambda d: error.is_displayed(), "the error to show")
    assert message in error.text, error.text
    title = browser.find_element(By.ID, "error-title").get_attribute("textContent")
    assert title == f"Error {status} · invalid_request_error", title
    assert page_state(browser)["status"] == "error"
    assert browser.find_element(By.ID, field).get_attribute("aria-invalid") == "true"  # the field named
    assert browser.find_element(By.ID, "generate").is_enabled()
    screenshot(browser, tmp_path, f"playground-error-{field}")


def test_playground_asks_for_the_api_key_and_sends_it(browser, tmp_path):
    from selenium.webdriver.common.by import By

    with ThreadServer(api_keys=(KEY,)) as guarded:
        browser.get(guarded.url + "/playground")
        key_form = browser.find_element(By.ID, "key-form")
        wait(browser, lambda d: key_form.is_displayed(), "the key field")
        assert "needs an API key" in browser.find_element(By.ID, "error").text
        assert not browser.find_element(By.ID, "generate").is_enabled()
        screenshot(browser, tmp_path, "playground-key")
        fill(browser, "api-key", KEY)
        browser.find_element(By.CSS_SELECTOR, "#key-form button[type='submit']").click()
        wait(browser, lambda d: d.find_element(By.ID, "generate").is_enabled(), "the models, with the key")
        assert not browser.find_element(By.ID, "error").is_displayed()
        # kept in localStorage: a fresh load lists the models at once
        assert browser.execute_script("return localStorage.getItem('varserve.apiKey')") == KEY
        open_playground(browser, guarded)
        assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY


def test_docs_render_offline_and_list_the_operations(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/docs")
    paths = wait(
        browser,
        lambda d: [
            e.text.replace("\u200b", "")
            for e in d.find_elements(By.CSS_SELECTOR, ".opblock .opblock-summary-path")
        ],
        "Swagger UI to list the operations",
    )
    assert {"/v1/images/generations", "/v1/generate", "/v1/models"} <= set(paths), paths
    assert "/playground" not in paths
    assert_only_local_resources(browser, server)
    screenshot(browser, tmp_path, "docs")


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    config = bundled_model_config("llamagen-shapes-t2i", tmp_path_factory.mktemp("t2i"))
    with ThreadServer(config=config, max_batch_size=4, timeout_s=60) as s:
        yield s


def test_playground_sends_a_text_models_negative_prompt_and_guidance_interval(browser, text_server, tmp_path):
    from selenium.webdriver.common.by import By

    open_playground(browser, text_server)
    assert browser.find_element(By.ID, "negative_prompt").is_displayed()
    assert browser.find_element(By.ID, "cfg_interval").is_displayed()  # a next-token model's knob
    fill(browser, "prompt", "a green star")
    fill(browser, "negative_prompt", "a red star")
    fill(browser, "seed", "12")
    fill(browser, "cfg_scale", "1")  # no guidance: the server refuses the negative prompt
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait(browser, lambda d: error.is_displayed(), "the error to show")
    assert "negative_prompt needs guidance" in error.text, error.text
    assert browser.find_element(By.ID, "negative_prompt").get_attribute("aria-invalid") == "true"

    fill(browser, "cfg_scale", "3")
    fill(browser, "cfg_interval", "100")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: page_state(d)["status"] in ("done", "error"), "the generation to end")
    state = page_state(browser)
    assert state["status"] == "done", state["lastError"]
    assert state["run"]["previews"] == 16  # a preview per token row
    src = browser.find_element(By.CSS_SELECTOR, "#gallery img[data-final='true']").get_attribute("src")
    body = {
        "prompt": "a green star",
        "negative_prompt": "a red star",
        "seed": 12,
        "cfg_scale": 3,
        "cfg_interval": 100,
    }
    same = text_server.post(body, path="/v1/generate").json()["data"][0]["b64_json"]
    assert src == f"data:image/png;base64,{same}"  # what the page sent is what it showed
    screenshot(browser, tmp_path, "playground-text")
