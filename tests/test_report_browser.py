"""report.html in a real browser: headless Chromium from the system (Debian `chromium` + `chromium-driver`),
driven by selenium; no browser is downloaded. Skipped, with the reason, where either is missing."""

import json
import shutil

import pytest

from tasktune.cli import main
from test_cli import tiny_run_args

pytestmark = pytest.mark.browser


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("needs Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[browser]')")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def report_html(tiny_llama, tmp_path_factory):
    from tiny import write_sst2_tsv

    root = tmp_path_factory.mktemp("browser")
    data = write_sst2_tsv(root / "train.tsv")
    assert main(tiny_run_args(tiny_llama, data, root, "train.learning_rate=3e-3", "train.max_steps=12")) == 0
    return root / "t" / "report.html"


def test_report_opens_cleanly(browser, report_html):
    browser.get(report_html.as_uri())
    images = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
    assert len(images) >= 3 and all(done and width > 0 for done, width in images), images
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert not [url for url in fetched if not url.startswith("data:")], fetched
    headline = browser.find_element("css selector", ".headline").text
    report = json.loads((report_html.parent / "report.json").read_text())
    assert "accuracy" in headline and "→" in headline and f"n = {report['finetuned']['score']['n']}" in headline
    assert browser.find_elements("css selector", "ul > li")


def test_report_fits_a_phone_width(browser, report_html):
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        browser.get(report_html.as_uri())
        # A mobile browser widens its layout to fit wide content (innerWidth grows), so compare with 390 itself.
        widths = browser.execute_script(
            "return [document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]")
        assert max(widths) <= 390, widths
        # Every table sits in its own scrolling box no wider than the page.
        boxes = browser.execute_script(
            "return Array.from(document.querySelectorAll('table')).map(t => t.parentNode.getBoundingClientRect().right)")
        assert boxes and max(boxes) <= 391
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_changed_predictions_table_sorts_and_filters(browser, report_html):
    browser.get(report_html.as_uri())
    tables = browser.find_elements("css selector", "table.sortable")
    if not tables:
        pytest.skip("this tiny run changed no predictions")
    table = tables[0]

    def column(index):
        return [row.find_elements("tag name", "td")[index].text
                for row in table.find_elements("css selector", "tbody tr") if row.is_displayed()]

    texts = column(1)
    expected = browser.execute_script("return arguments[0].slice().sort((a, b) => a.localeCompare(b))", texts)
    table.find_elements("tag name", "th")[1].click()
    assert column(1) == expected and sorted(column(1)) == sorted(texts)
    table.find_elements("tag name", "th")[1].click()
    assert column(1) == expected[::-1]
    word = texts[-1].split()[0]
    browser.find_element("css selector", "input.filter").send_keys(word)
    visible = browser.execute_script(
        "return Array.from(arguments[0].tBodies[0].rows).map(r => [r.style.display !== 'none', r.textContent])", table)
    assert any(shown for shown, _ in visible)
    assert all(shown == (word.lower() in text.lower()) for shown, text in visible)
