"""The web view (``GET /``, ``net/webview.py``, ``net/web/``) on a real
three-node cluster.

``TestWebRoutes`` checks with plain HTTP that the page and its files are
served through the node's middleware with their content types, no-cache and
security headers, and that the package data ships them; it runs everywhere.

``TestWebBrowser`` drives headless Chromium (Debian's ``chromium`` and
``chromium-driver``) with selenium: the token goes into node A's page, a sell
is placed through A's form, B's page shows it in its ladder, a crossing buy
placed through B's form shows in B's tape as provisional (while node C is
frozen, finality cannot advance) and then as final once C is thawed; A's page
cancels the rest.  Then C's page sees C stop and come back, and reconnects.
It skips with the reason when the browser, its driver or selenium is missing.
Every wait is bounded (``WebDriverWait`` with a timeout).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from net.webview import ASSETS, WEB_DIR
from tests.nodes import (
    ROOT,
    NodeProc,
    http,
    logs_on_failure,
    make_nodes,
    report,
    start_network,
    stop_all,
    wait_full_mesh,
)

# The tests of this module share its node processes (module-scoped fixtures): one test worker runs them all.
pytestmark = pytest.mark.xdist_group("test_web")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Bound on what the cluster does by itself (a loaded machine is slow).
SETTLE = 30.0
#: Bound on what the page shows after an action.
UI_WAIT = 30.0
#: Members are voted out only after this much silence: far longer than C is frozen here.
EVICT_AFTER = 120
#: A node name that would be markup if the page inserted it as HTML.
HOSTILE_NAME = "<b>bee</b> & <img src=x>"
HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProc]]:
    nodes = make_nodes(tmp_path_factory.mktemp("web"), ("a", "b", "c"))
    for n in nodes:
        n.extra_args = ["--evict-after", str(EVICT_AFTER)]
    nodes[1].extra_args += ["--name", HOSTILE_NAME]  # after start()'s own --name: this one counts
    try:
        start_network(nodes, timeout=SETTLE)
        yield nodes
    finally:
        stop_all(nodes)


# ---- plain HTTP ---------------------------------------------------------------------


class TestWebRoutes:
    def test_page_and_assets_are_served(self, request: pytest.FixtureRequest, trio: list[NodeProc]) -> None:
        a = trio[0]
        with logs_on_failure(request, trio):
            for path, (_, content_type) in ASSETS.items():
                r = http("GET", a.url + path)
                assert r.status == 200, (path, r)
                assert r.content_type == content_type, (path, r.content_type)
                head = http("HEAD", a.url + path)
                assert head.status == 200 and head.body == b"", (path, head)
            page = http("GET", a.url + "/")
            text = page.body.decode()
            assert "<title>p2pex node</title>" in text
            script = http("GET", a.url + "/web/vendor/lightweight-charts/lightweight-charts.standalone.production.js")
            assert script.status == 200 and script.content_type.startswith("text/javascript")
            assert b"TradingView Lightweight Charts" in script.body[:300] and len(script.body) > 100_000
            # everything the page refers to on this node is served
            refs = re.findall(r'(?:src|href)="(/[^"]*)"', text)
            assert len(refs) >= 4, refs
            for ref in refs:
                assert http("GET", a.url + ref).status == 200, ref

    def test_headers(self, trio: list[NodeProc]) -> None:
        import urllib.request

        a = trio[0]
        with urllib.request.urlopen(a.url + "/", timeout=5) as resp:
            page = resp.headers
        assert page["Cache-Control"] == "no-cache"
        assert page["X-Content-Type-Options"] == "nosniff"
        csp = page["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
        with urllib.request.urlopen(a.url + "/web/app.js", timeout=5) as resp:
            js = resp.headers
            etag = js["ETag"]
        assert js["Cache-Control"] == "no-cache" and js["X-Content-Type-Options"] == "nosniff"
        assert etag
        again = http("GET", a.url + "/web/app.js", headers={"If-None-Match": etag})
        assert again.status == 304, again  # revalidation is cheap

    def test_nothing_else_under_web(self, trio: list[NodeProc]) -> None:
        a = trio[0]
        for path in ("/web/", "/web/nope.js", "/web/vendor/lightweight-charts/VENDORED.md",
                     "/web/../cli.py", "/web/%2e%2e/cli.py", "/index.html"):
            r = http("GET", a.url + path)
            assert r.status == 404, (path, r)
            assert r.json()["error"] == "not_found", (path, r)
        r = http("POST", a.url + "/", b"{}", headers={"Content-Type": "application/json"})
        assert r.status == 405, r

    def test_package_data_ships_the_files(self) -> None:
        cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
        globs = cfg["tool"]["setuptools"]["package-data"]["net"]
        net_dir = WEB_DIR.parent
        for name, _ in ASSETS.values():
            file = WEB_DIR / name
            assert file.is_file(), file
            rel = file.relative_to(net_dir).as_posix()
            assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in package-data {globs}"
        assert (WEB_DIR / "vendor/lightweight-charts/LICENSE").read_text().startswith(" " * 33 + "Apache License")


# ---- a real browser ------------------------------------------------------------------


def browser_missing() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: apt-get install {pkg}"
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(UI_WAIT)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """One node's web view in one browser tab."""

    def __init__(self, driver: Any, node: NodeProc) -> None:
        self.d = driver
        self.node = node
        self.driver_window = driver.current_window_handle
        self.console: list[dict[str, Any]] = []

    def wait(self, pred: Callable[[Any], Any], what: str, timeout: float = UI_WAIT) -> Any:
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        self.focus()
        w = WebDriverWait(self.d, timeout, poll_frequency=0.1,
                          ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
        return w.until(pred, message=f"{self.node.name}'s page: {what}")

    def focus(self) -> None:
        if self.d.current_window_handle != self.driver_window:
            self.d.switch_to.window(self.driver_window)

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.d.find_elements(By.CSS_SELECTOR, css))

    def attr(self, css: str, name: str) -> str | None:
        value: str | None = self.find(css).get_attribute(name)
        return value

    def open(self) -> Page:
        self.focus()
        self.d.get(self.node.url + "/")
        self.wait(lambda d: self.attr("#conn", "data-state") == "live", "the stream live")
        return self

    def enter_token(self, token: str) -> None:
        box = self.find("#token")
        box.clear()
        box.send_keys(token)
        self.find("#token-save").click()
        self.wait(lambda d: "token set" in self.find("#token-state").text, "the token kept")

    def place(self, side: str, qty: int, price: int) -> str:
        """Place an order through the form; returns its id as the page shows it."""
        from selenium.webdriver.support.ui import Select

        before = self.attr("#order-msg", "data-order-id")
        Select(self.find("#order-side")).select_by_value(side)
        for css, value in (("#order-qty", qty), ("#order-price", price)):
            box = self.find(css)
            box.clear()
            box.send_keys(str(value))
        self.find("#order-submit").click()
        self.wait(lambda d: self.attr("#order-msg", "data-order-id") not in (None, before)
                  or self.attr("#order-msg", "data-kind") == "error", f"the {side} order answered")
        msg = self.find("#order-msg")
        assert msg.get_attribute("data-kind") == "ok", msg.text
        oid = str(msg.get_attribute("data-order-id"))
        assert HEX64.fullmatch(oid), oid
        return oid

    def level(self, side: str, price: int) -> int | None:
        rows = self.find_all(f'#{side}s tr[data-price="{price}"]')
        return int(rows[0].get_attribute("data-qty")) if rows else None

    def fill_rows(self, price: int, qty: int) -> list[Any]:
        return self.find_all(f'#tape-body tr.fill[data-price="{price}"][data-qty="{qty}"]')

    def collect_console(self) -> None:
        self.focus()
        self.console += self.d.get_log("browser")

    def screenshot(self, path: Path) -> Path:
        self.focus()
        assert self.d.save_screenshot(str(path)), path
        return path


class TestWebBrowser:
    def test_order_through_the_page_shows_on_another_node(self, request: pytest.FixtureRequest, trio: list[NodeProc],
                                                          browser: Any, tmp_path: Path) -> None:
        a, b, c = trio
        with logs_on_failure(request, trio):
            try:
                self._scenario(request, browser, a, b, c, tmp_path)
            finally:
                c.thaw()

    def _scenario(self, request: pytest.FixtureRequest, driver: Any, a: NodeProc, b: NodeProc, c: NodeProc,
                  tmp_path: Path) -> None:
        page_a = Page(driver, a).open()
        # the node's status: both peers up, a state hash
        page_a.wait(lambda d: len(page_a.find_all('#peers tr[data-state="up"]')) == 2, "two peers up")
        page_a.wait(lambda d: HEX64.fullmatch(page_a.find("#state-hash").text), "the state hash")
        assert page_a.find("#node-name").text == "a"
        # without a token the page refuses to send anything
        page_a.find("#order-submit").click()
        page_a.wait(lambda d: page_a.attr("#order-msg", "data-kind") == "error", "the missing token reported")
        assert "no token" in page_a.find("#order-msg").text
        # with it: a sell through A's form
        page_a.enter_token(a.token)
        assert driver.execute_script("return sessionStorage.getItem('p2pex.token')") == a.token
        assert driver.execute_script("return localStorage.length") == 0
        assert page_a.find("#token").get_attribute("value") == ""  # not left in the field
        sell = page_a.place("sell", 3, 105)
        page_a.wait(lambda d: page_a.level("ask", 105) == 3, "the sell in A's own ladder")
        page_a.wait(lambda d: page_a.attr(f'#my-orders tr[data-id="{sell}"]', "data-status") == "open",
                    "the sell among this tab's orders")
        page_a.collect_console()

        # node B's page, in another tab (another origin: its own sessionStorage)
        driver.switch_to.new_window("tab")
        page_b = Page(driver, b).open()
        page_b.wait(lambda d: page_b.level("ask", 105) == 3, "A's sell in B's ladder")
        name = page_b.find("#node-name")
        assert name.text == HOSTILE_NAME  # shown as text ...
        assert name.find_elements("css selector", "*") == []  # ... never as markup
        assert not page_b.find_all("header img, header b")
        assert driver.execute_script("return sessionStorage.getItem('p2pex.token')") is None
        page_b.enter_token(b.token)

        # a crossing buy at B while C is frozen: the fill is provisional until C acknowledges
        c.freeze()
        buy = page_b.place("buy", 2, 105)
        assert buy != sell
        page_b.wait(lambda d: any(r.get_attribute("data-final") == "false" for r in page_b.fill_rows(105, 2)),
                    "the provisional fill in B's tape")
        row = page_b.fill_rows(105, 2)[0]
        assert "provisional" in (row.get_attribute("class") or "").split()
        assert row.find_element("css selector", ".tag").text == "provisional"
        page_b.wait(lambda d: page_b.level("ask", 105) == 1, "the rest of the sell in B's ladder")
        shot_provisional = page_b.screenshot(tmp_path / "web-b-provisional.png")
        c.thaw()
        page_b.wait(lambda d: any(r.get_attribute("data-final") == "true" for r in page_b.fill_rows(105, 2)),
                    "the fill final in B's tape", timeout=SETTLE + UI_WAIT)
        row = page_b.fill_rows(105, 2)[0]
        assert "final" in (row.get_attribute("class") or "").split()
        assert row.find_element("css selector", ".tag").text == "final"
        assert len(page_b.fill_rows(105, 2)) == 1  # the same fill, now final, not a second row
        assert page_b.find_all("#price-chart canvas"), "the price chart did not draw"
        shot = page_b.screenshot(tmp_path / "web-b.png")
        page_b.collect_console()

        # back to A: cancel the rest of the sell from this tab's order list
        page_a.focus()
        page_a.wait(lambda d: page_a.level("ask", 105) == 1, "the partial fill in A's ladder")
        page_a.find(f'#my-orders button.cancel[data-id="{sell}"]').click()
        page_a.wait(lambda d: page_a.attr(f'#my-orders tr[data-id="{sell}"]', "data-status") == "cancelled",
                    "the sell cancelled")
        page_a.wait(lambda d: page_a.level("ask", 105) is None, "the ask gone from A's ladder")
        page_a.wait(lambda d: page_a.attr(f'#my-orders tr[data-id="{sell}"]', "data-final") == "true",
                    "the cancelled sell final in this tab's orders", timeout=SETTLE)
        shot_a = page_a.screenshot(tmp_path / "web-a.png")
        page_a.collect_console()
        page_b.wait(lambda d: page_b.level("ask", 105) is None, "the ask gone from B's ladder")
        page_b.collect_console()

        problems = [e for e in page_a.console + page_b.console if e.get("level") == "SEVERE"]
        assert not problems, problems
        report(request, f"\nweb view screenshots: {shot} (B, fill final), {shot_provisional} (B, fill provisional), "
                        f"{shot_a} (A, after the cancel)")

    def test_page_reconnects_after_a_restart(self, request: pytest.FixtureRequest, trio: list[NodeProc],
                                             browser: Any) -> None:
        c = trio[2]
        with logs_on_failure(request, trio):
            page = Page(browser, c).open()
            total = c.get("/v1/fills?since=0&limit=1")["total"]
            page.wait(lambda d: len(page.find_all("#tape-body tr.fill")) == min(total, 100), "the tape loaded")
            c.stop()
            page.wait(lambda d: page.attr("#conn", "data-state") == "reconnecting", "the stream lost")
            page.wait(lambda d: page.find("#status-msg").text.startswith("status:"), "the status poll failing")
            c.start()
            wait_full_mesh(trio)
            page.wait(lambda d: page.attr("#conn", "data-state") == "live", "the stream live again")
            page.wait(lambda d: page.find("#status-msg").text == "", "the status poll answered again")
            page.wait(lambda d: len(page.find_all('#peers tr[data-state="up"]')) == 2, "both peers up again")
            assert len(page.find_all("#tape-body tr.fill")) == min(total, 100)
