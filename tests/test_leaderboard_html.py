"""index.html in a real headless Chromium (Debian's chromium, driven over the DevTools protocol).

The page must load with no console error or uncaught exception, show one row per run, and re-order
its rows when a column header is clicked (a real mouse event at the header's position).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fare_analysis import html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
websocket = pytest.importorskip("websocket", reason="websocket-client drives Chromium (pip install 'fare-moe[dev]')")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (CI installs Debian's chromium)")


class Browser:
    """Headless Chromium with one page, spoken to over the Chrome DevTools Protocol (CDP)."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        from urllib.request import urlopen

        targets = json.load(urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.events:
                if msg.get("method") == event:
                    return msg
            self.ws.settimeout(max(deadline - time.monotonic(), 0.1))
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(event)

    def js(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(res["exceptionDetails"])
        return res["result"].get("value")

    def click(self, selector: str) -> None:
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      " e.scrollIntoView({block: 'center', inline: 'center'}); const r = e.getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def errors(self) -> list[str]:
        out = []
        for msg in self.events:
            m, p = msg.get("method"), msg.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(str(d.get("exception", {}).get("description") or d.get("text"))[:300])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p.get("args"))[:300])
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", "")[:300])
        return out

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def leaderboard_dir(tmp_path_factory) -> Path:
    from test_leaderboard import build_study

    return build_study(tmp_path_factory.mktemp("html"))


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "chromium-profile")
    yield b
    b.close()


def _open(browser: Browser, page: Path) -> None:
    for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
        browser.send(domain)
    browser.send("Page.navigate", url=page.resolve().as_uri())
    browser.wait_for("Page.loadEventFired")


def _column(browser: Browser, index: int) -> list[str]:
    return browser.js(f"Array.from(document.querySelectorAll('#leaderboard tbody tr'))"
                      f".map(r => r.cells[{index}].getAttribute('data-value'))")


def test_sorting_script_on_a_hand_made_table(browser, tmp_path):
    """Numbers sort numerically (10 after 9), empty cells last, a second click reverses."""
    cols = [html.Column("name"), html.Column("score", "number")]
    rows = [[html.Cell(n, n), html.number_cell(v)] for n, v in (("a", 9.0), ("b", None), ("c", 10.0), ("d", -1.5))]
    page = tmp_path / "t.html"
    page.write_text(html.render("t", "", [html.Table("leaderboard", "t", cols, rows)], []))
    _open(browser, page)
    browser.click("#leaderboard th:nth-child(2)")
    assert _column(browser, 0) == ["d", "a", "c", "b"]
    browser.click("#leaderboard th:nth-child(2)")
    assert _column(browser, 0) == ["c", "a", "d", "b"]
    browser.click("#leaderboard th:nth-child(1)")
    assert _column(browser, 0) == ["a", "b", "c", "d"]
    assert browser.errors() == []


def test_console_errors_are_caught(browser, tmp_path):
    """Negative control: the error collector sees console.error and an uncaught exception."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><script>console.error('boom'); notDefined();</script></body></html>")
    _open(browser, page)
    errors = browser.errors()
    assert len(errors) == 2 and "boom" in errors[0] and "notDefined" in errors[1]


def test_leaderboard_page_loads_has_one_row_per_run_and_sorts(browser, leaderboard_dir):
    out = leaderboard_dir
    page = out / "index.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: no external resource
    assert text.count('src="data:image/png;base64,') >= 3

    with open(out / "leaderboard.csv", newline="") as fh:
        runs = list(csv.DictReader(fh))
    _open(browser, page)
    assert browser.js("document.querySelectorAll('#leaderboard tbody tr').length") == len(runs)
    assert browser.js("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    # hover text carries the CI
    assert "95% CI" in browser.js("document.querySelector('#leaderboard td[title*=\"CI\"]').title")
    # colour scale by the metric's direction, strongest at the column's largest |Δ| (run_d in both columns):
    # a lower stereotype preference is better (blue), more over-refusal is worse (red)
    def colour(metric: str) -> list[int]:
        heads = browser.js("Array.from(document.querySelectorAll('#leaderboard th')).map(h => h.textContent)")
        i = heads.index(metric)
        css = browser.js(f"(() => {{ const cells = Array.from(document.querySelectorAll('#leaderboard tbody tr'))"
                         f".map(r => r.cells[{i}]).filter(c => c.dataset.value !== '');"
                         f" const top = cells.reduce((a, b) => Math.abs(+b.dataset.value) > Math.abs(+a.dataset.value) ? b : a);"
                         f" return getComputedStyle(top).backgroundColor; }})()")
        return [int(x) for x in css[css.index("(") + 1:css.index(")")].split(",")[:3]]

    r, _, b = colour("fare_crows_pairs/stereotype_preference")
    assert b > r + 60
    r, _, b = colour("fare_xstest/over_refusal")
    assert r > b + 60

    headers = browser.js("Array.from(document.querySelectorAll('#leaderboard th')).map(h => h.textContent)")
    col = headers.index("fare_crows_pairs/stereotype_preference")
    before = _column(browser, col)
    browser.click(f"#leaderboard th:nth-child({col + 1})")
    after = _column(browser, col)
    numbers = [float(v) for v in after if v != ""]
    assert numbers == sorted(numbers) and after[len(numbers):] == [""] * (len(after) - len(numbers))
    assert after != before  # the fixture's rows are not in that order to begin with
    browser.click(f"#leaderboard th:nth-child({col + 1})")
    again = [float(v) for v in _column(browser, col) if v != ""]
    assert again == sorted(numbers, reverse=True)
    assert browser.errors() == []
