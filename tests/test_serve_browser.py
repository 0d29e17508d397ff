"""The page in a real browser: headless Chromium driven by Selenium against a real `transformer-serve`.

It translates a sentence from the keyboard, checks the translation shown is `transformer-translate`'s,
explores the attention (cross-attention, a layer, a head, the mean, a chosen row) against the API's
weights, checks that no request left 127.0.0.1 and that the page fits a phone's width, and saves a
screenshot. Chromium and its driver come from Debian (`apt-get install chromium chromium-driver`;
.ci/run installs them): without them the test is skipped, except under CI=true, where it fails.
"""

import io
import json
import os
import shutil
import sys

import pytest
from helpers import TIMEOUT, process_state_kept, serving

from transformer.commands import translate as translate_command

SENTENCE = "ein mann spielt im park mit einem ball"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def missing(reason: str) -> None:
    """Skip on a user's machine; fail in CI, which installs the browser."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the browser test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed (pip install -e '.[test]')")
    binary = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        missing("no Chromium with its chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1600", "--no-first-run", "--disable-extensions", "--disable-sync",
                     "--disable-background-networking", "--disable-component-update", "--disable-default-apps"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving(["--checkpoint", str(tiny_run / "checkpoints" / "step_1.pt"), "--threads", "1"], log) as url:
        yield url


@pytest.fixture(scope="module")
def expected(tiny_run, tmp_path_factory) -> str:
    """`transformer-translate`'s translation of SENTENCE (its entry point, in this process)."""
    path = tmp_path_factory.mktemp("cli") / "input.de"
    path.write_text(SENTENCE + "\n", encoding="utf-8")
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    stdout, sys.stdout = sys.stdout, out
    try:
        with process_state_kept():
            translate_command.main(["--checkpoint", str(tiny_run / "checkpoints" / "step_1.pt"), "--input", str(path)])
    finally:
        sys.stdout = stdout
    out.flush()
    return out.buffer.getvalue().decode("utf-8").split("\n")[0]


def test_the_page_translates_and_explores_attention_with_nothing_leaving_the_machine(browser, server, expected,
                                                                                       tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, TIMEOUT)
    by_id = lambda name: browser.find_element(By.ID, name)  # noqa: E731
    browser.get(server)
    wait.until(lambda _: "parameters" in by_id("model-info").text)
    assert "German" in by_id("source-language").text

    # Keyboard: the label focuses the text area, Ctrl+Enter translates, Tab reaches the button.
    browser.find_element(By.CSS_SELECTOR, "label[for=source]").click()
    assert browser.switch_to.active_element == by_id("source")
    by_id("source").send_keys(SENTENCE)
    by_id("source").send_keys(Keys.CONTROL, Keys.ENTER)
    wait.until(lambda _: by_id("work-section").is_displayed())
    assert by_id("translation").text == expected
    by_id("source").send_keys(Keys.TAB)
    assert browser.switch_to.active_element == by_id("translate-button")
    candidates = browser.find_elements(By.CSS_SELECTOR, "#nbest li")
    assert len(candidates) == 2 and candidates[0].text.startswith(expected)

    api = httpx.post(server + "attention", json={"text": SENTENCE}, timeout=TIMEOUT).json()
    S, T = len(api["source_pieces"]), len(api["target_pieces"])
    Select(by_id("kind")).select_by_value("cross")
    Select(by_id("layer")).select_by_value("0")
    Select(by_id("head")).select_by_value("1")
    rows = browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr")
    assert len(rows) == T
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")) == S * T
    assert [r.find_element(By.TAG_NAME, "button").text for r in rows] == [p.strip() for p in api["output_pieces"]]
    columns = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#heatmap thead th")]
    assert columns == [p.strip() for p in api["source_pieces"]]
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#heatmap tbody tr')].map("
        "r => [...r.querySelectorAll('td.cell')].map(c => Number(c.dataset.value)))")
    assert len(shown) == T and all(len(row) == S for row in shown)
    assert sum(shown, []) == pytest.approx(sum(api["attention"]["cross"][0][1], []), abs=1e-9)
    assert "→" in rows[0].find_element(By.CSS_SELECTOR, "td.cell").get_attribute("title")

    rows[1].find_element(By.TAG_NAME, "button").click()
    assert "chosen" in browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr")[1].get_attribute("class")
    strip = browser.find_elements(By.CSS_SELECTOR, "#focus-strip .piece")
    assert [s.text for s in strip] == [p.strip() for p in api["source_pieces"]]

    Select(by_id("head")).select_by_value("mean")
    mean = browser.execute_script(
        "return [...document.querySelectorAll('#heatmap td.cell')].map(c => Number(c.dataset.value))")
    heads = api["attention"]["cross"][0]
    assert mean == pytest.approx([sum(h[i][j] for h in heads) / len(heads) for i in range(T) for j in range(S)],
                                 abs=1e-9)
    Select(by_id("kind")).select_by_value("encoder")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")) == S * S
    work_rows = browser.find_elements(By.CSS_SELECTOR, "#work-table tbody tr")
    assert len(work_rows) == 14 and "FLOPs" in by_id("work-summary").text

    # Every request the page made went to this server.
    requests = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
    assert {u for u in urls if not u.startswith(server)} <= {"data:,"}
    assert {server, server + "app.js", server + "style.css", server + "models", server + "translate",
            server + "attention", server + "work"} <= set(urls)
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith(server) for name in resources)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    browser.set_window_size(390, 900)
    width, viewport = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= viewport, "the page is wider than a phone's screen: only the tables may scroll sideways"
    browser.save_screenshot(str(tmp_path / "phone.png"))
