"""`GET /ui` in a real headless browser (Debian's chromium, driven by selenium):
the page loads with no external assets, asks for the token, and its counters,
flows and errors follow the requests the node answers."""

from __future__ import annotations

import re
import shutil
import time
import uuid

import pytest
import requests
from conftest import ROOT, RmProcess, write_config
from helpers import MqttProbe, free_port
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

TOKEN = "ui-token"
REALM = f"ui-{uuid.uuid4().hex[:6]}"
FLOWS = ("1\nTO component1 1\nPOST payload\n\nfail\nTO component1 fail\nGET\n\n"
         "guarded\nIF payload.n > 2\n  TO component1 1\n  POST BODY {\"n\": payload.n} RETRY 2\nEND\n")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def cell(driver, table: str, row: str, key: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, f'#{table} tbody tr[data-id="{row}"] td[data-key="{key}"]')
    return found[0].text if found else ""


def test_the_status_page_follows_the_node_live(tmp_path, broker, mock, processes, browser):
    port = free_port()
    components = {"component1": {"id": 1, "config": {"protocol": "http", "ip": "127.0.0.1", "port": mock.port,
                                                     "endpoints": {"1": "endpoint1", "fail": "fail"}}}}
    cfg = write_config(tmp_path / "cfg", mock.port, broker.port, rest_port=port, flows=FLOWS, components=components,
                       comm={"rest": {"token": TOKEN}}, lb={"policy": "local"},
                       runtime={"node_id": "7", "module_dir": str(ROOT / "runtimes"),
                                "orchestrator": {"realm": REALM, "reg_timeout_s": 0.5}})
    processes.append(RmProcess("serve", cfg).start())
    base = f"http://127.0.0.1:{port}"
    page = requests.get(f"{base}/ui", timeout=5)  # served without the token: it holds no data
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text and "<link" not in page.text  # no external assets
    assert requests.get(f"{base}/status", timeout=5).status_code == 401

    browser.get(f"{base}/ui")
    wait = WebDriverWait(browser, 15, ignored_exceptions=(NoAlertPresentException, WebDriverException))
    alert = wait.until(lambda d: d.switch_to.alert)  # the page asks for rest.token
    alert.send_keys(TOKEN)
    alert.accept()
    wait.until(lambda d: d.find_element(By.ID, "node").text == "7")
    assert browser.find_element(By.ID, "ready").text == "ready"
    assert browser.find_element(By.ID, "accepted").text == "0"

    auth = {"Authorization": f"Bearer {TOKEN}"}
    for i in range(5):
        assert requests.post(f"{base}/startrm", json={"id_flow": "1", "payload": i}, headers=auth, timeout=10).status_code == 200
    probe = MqttProbe(broker.port)
    try:
        assert probe.request("1", "over mqtt")["status"] == "ok"
    finally:
        probe.close()
    assert requests.post(f"{base}/startrm", json={"id_flow": "fail", "request_id": "r-fail"}, headers=auth,
                         timeout=10).status_code == 502
    assert requests.post(f"{base}/startrm", data=b"{not json", headers=auth, timeout=10).status_code == 400

    started = time.monotonic()
    wait.until(lambda d: d.find_element(By.ID, "accepted").text == "7")
    assert time.monotonic() - started < 5  # the page follows within its 1 s polling (and a margin)
    wait.until(lambda d: cell(d, "flows", "1", "requests") == "6")
    assert cell(browser, "flows", "1", "errors") == "0" and float(cell(browser, "flows", "1", "p99")) > 0
    assert cell(browser, "flows", "fail", "errors") == "1"
    wait.until(lambda d: d.find_element(By.ID, "bad_request").text == "1")  # a bad request is counted, not lost
    assert browser.find_element(By.ID, "by_entrypoint").text == "rest 7, mqtt 1"
    assert browser.find_element(By.ID, "mqtt").text.startswith("connected")
    errors = browser.find_element(By.ID, "errors").text
    assert "component_error" in errors and "fail" in errors and "bad_request" in errors
    # one clock on the page: 24-hour time, as the node writes the errors' times
    assert re.fullmatch(r"\d\d:\d\d:\d\d", browser.find_element(By.ID, "updated").text)
    times = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#errors tbody td:first-child")]
    assert times and all(re.fullmatch(r"\d\d:\d\d:\d\d", t) for t in times)
    # an orchestrator module, and whether it can move with its state
    runtime = requests.get(f"{base}/status", headers=auth, timeout=5).json()["orchestrator"]["runtime"]
    probe = MqttProbe(broker.port)
    try:
        probe.publish({"object_id": "1", "action": "create", "type": "req", "data": {
            "type": "module", "uuid": str(uuid.uuid4()), "name": "counter", "file": "counter.wat"}},
            topic=f"{REALM}/proc/control/{runtime}")
    finally:
        probe.close()
    wait.until(lambda d: cell(d, "modules", "counter", "moves") == "with its state")
    # each flow's plan, as `check --explain` prints it
    plan = browser.find_element(By.CSS_SELECTOR, '#plans details[data-flow="guarded"]')
    assert plan.find_element(By.TAG_NAME, "summary").text == "flow guarded (line 9): 1 request(s)"
    plan.find_element(By.TAG_NAME, "summary").click()
    shown = plan.find_element(By.TAG_NAME, "pre").text
    assert "IF payload.n > 2" in shown and "POST component1 1 (http://127.0.0.1:" in shown
    assert "retried up to 2 time(s)" in shown and 'body: {"n": payload.n}' in shown
    shot = tmp_path / "ui.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
