"""The built book in a real browser: every page loads offline, with its images and links.

Builds the HTML from the committed notebook outputs (no execution), serves it on
127.0.0.1 and opens every page in headless Chromium, driven through the Chrome
DevTools Protocol so that every network request the page makes is observed. A page
fails if it requests anything outside 127.0.0.1 (a CDN, fonts, analytics), if a
local request fails, if a script throws, if an image is missing, empty or
undecodable, or if an internal link points at a missing page or anchor.

Screenshots of every page go to _build/screenshots/<page>.png (1280 x 2000), and one of a results CSV
downloaded through a chapter page to _build/screenshots/download__<file>.png.
Select with ``-m browser``; skipped when Chromium is absent, except under CI=true.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "_build" / "screenshots"
WINDOW = (1280, 2000)
PAGE_TIMEOUT = 60.0  # seconds for a page to fire its load event
QUIET_PERIOD = 0.75  # seconds without network activity that count as "done loading"
LOCAL_SCHEMES = {"data", "blob", "about"}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--mute-audio",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
    # Belt and braces: even if a page asks for another host, no packet leaves the machine.
    # The request is still seen (and failed) through the DevTools Network events.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-port=0",
]


def _require(condition: bool, reason: str) -> None:
    """Skip when something the test needs is missing; under CI it must run, so fail."""
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: scripts/setup.sh should have installed it)")
    pytest.skip(reason)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    _require(path is not None, "Chromium is not installed (apt-get install -y chromium)")
    return path


# ------------------------------------------------------------------ build and serve


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The book built from committed outputs into a temporary folder; its html/ folder."""
    _chromium()  # skip before spending time on a build
    out = tmp_path_factory.mktemp("book-build")
    result = subprocess.run(
        [sys.executable, "-m", "mechbook", "--root", str(ROOT), "build", "--path-output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        log = result.stdout + result.stderr
        warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
        pytest.fail(
            "jupyter-book build . -W -n failed (warnings are errors). For 'stderr was found': fix the "
            "warning at its source, then python -m mechbook refresh (or tag the cell remove-stderr)\n"
            + "\n".join(warnings or [log[-6000:]]),
            pytrace=False,
        )
    html = out / "_build" / "html"
    assert (html / "index.html").is_file(), f"no index.html in {html}"
    return html


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serve(directory: Path):
    """An HTTP server for ``directory`` on 127.0.0.1 and a free port; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server(site: Path):
    with _serve(site) as base:
        yield base


# ------------------------------------------------------------------- DevTools client


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self._ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self._next_id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        self._ws.close()

    def _receive(self, timeout: float) -> dict | None:
        import websocket

        self._ws.settimeout(max(timeout, 0.01))
        try:
            message = json.loads(self._ws.recv())
        except websocket.WebSocketTimeoutException:
            return None
        if "method" in message:
            self.events.append(message)
        return message

    def send(self, method: str, timeout: float = 30.0, **params: object) -> dict:
        self._next_id += 1
        call_id = self._next_id
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._receive(deadline - time.monotonic())
            if message is not None and message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})
        raise TimeoutError(f"no answer to {method} within {timeout} s")

    def wait_for(self, method: str, timeout: float) -> bool:
        """Read events until one named ``method`` has arrived (since events were last cleared)."""
        deadline = time.monotonic() + timeout
        while not any(event["method"] == method for event in self.events):
            if time.monotonic() >= deadline:
                return False
            self._receive(deadline - time.monotonic())
        return True

    def wait_until_quiet(self, quiet: float, timeout: float) -> None:
        """Read events until no request has been in flight for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        last_activity = time.monotonic()
        while time.monotonic() < deadline:
            in_flight = self._in_flight()
            if not in_flight and time.monotonic() - last_activity >= quiet:
                return
            if self._receive(min(quiet, deadline - time.monotonic())) is not None:
                last_activity = time.monotonic()

    def _in_flight(self) -> set[str]:
        started, ended = set(), set()
        for event in self.events:
            if event["method"] == "Network.requestWillBeSent":
                started.add(event["params"]["requestId"])
            elif event["method"] in ("Network.loadingFinished", "Network.loadingFailed"):
                ended.add(event["params"]["requestId"])
        return started - ended


@dataclass
class PageVisit:
    """What the browser saw on one page."""

    page: str
    url: str
    loaded: bool
    status: int | None
    requests: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


DOM_PROBE = """
JSON.stringify({
  images: Array.from(document.images).map(i => ({
    src: i.currentSrc || i.src, complete: i.complete, width: i.naturalWidth})),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id)
    .concat(Array.from(document.querySelectorAll('a[name]')).map(a => a.name)),
})
"""


def _visit(devtools: DevTools, base: str, page: str) -> PageVisit:
    devtools.events.clear()
    url = f"{base}/{page}"
    devtools.send("Page.navigate", url=url)
    loaded = devtools.wait_for("Page.loadEventFired", PAGE_TIMEOUT)
    devtools.wait_until_quiet(QUIET_PERIOD, timeout=PAGE_TIMEOUT)
    probe = json.loads(devtools.send("Runtime.evaluate", expression=DOM_PROBE, returnByValue=True)["result"]["value"])

    visit = PageVisit(page=page, url=url, loaded=loaded, status=None, **probe)
    urls = {}
    for event in devtools.events:
        method, params = event["method"], event["params"]
        if method == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
            visit.requests.append(params["request"]["url"])
        elif method == "Network.webSocketCreated":
            visit.requests.append(params["url"])
        elif method == "Network.responseReceived":
            response = params["response"]
            if params.get("type") == "Document" and response["url"].split("#")[0] == url:
                visit.status = response["status"]
            if response["status"] >= 400 and not response["url"].endswith("/favicon.ico"):
                visit.failures.append(f"HTTP {response['status']} for {response['url']}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            visit.failures.append(f"{params['errorText']} for {urls.get(params['requestId'], '?')}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            visit.errors.append(text.splitlines()[0] if text else "uncaught exception")
    return visit


def _page_name(page: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", page.removesuffix(".html"))


@pytest.fixture(scope="module")
def devtools():
    """Headless Chromium with a fresh profile, driven through DevTools; network events on."""
    chromium = _chromium()
    try:
        import websocket  # noqa: F401  (websocket-client, from the test extra)
    except ImportError:
        _require(False, "websocket-client is not installed (pip install -e '.[test]')")
    profile = tempfile.mkdtemp(prefix="mechbook-chromium-")
    browser = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = None
    try:
        client = DevTools(_page_websocket(Path(profile), browser))
        client.send("Page.enable")
        client.send("Network.enable")
        client.send("Runtime.enable")
        client.send("Network.setCacheDisabled", cacheDisabled=True)
        client.send(
            "Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1, mobile=False
        )
        yield client
    finally:
        if client is not None:
            client.close()
        browser.terminate()
        try:
            browser.wait(timeout=15)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def visits(site: Path, server: str, devtools: DevTools) -> dict[str, PageVisit]:
    """Open every HTML page of the book, screenshot it, record what it did."""
    pages = sorted(
        p.relative_to(site).as_posix()
        for p in site.rglob("*.html")
        if p.relative_to(site).parts[0] not in {"_static", "_sources", "_images"}
    )
    assert pages, f"no HTML pages in {site}"
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    SCREENSHOTS.mkdir(parents=True)
    results = {}
    for page in pages:
        results[page] = _visit(devtools, server, page)
        shot = devtools.send("Page.captureScreenshot", format="png")
        (SCREENSHOTS / f"{_page_name(page)}.png").write_bytes(base64.b64decode(shot["data"]))
    return results


def _page_websocket(profile: Path, browser: subprocess.Popen) -> str:
    """The DevTools websocket of the browser's first tab (the port is in DevToolsActivePort)."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if browser.poll() is not None:
            raise RuntimeError(f"Chromium exited with code {browser.returncode} before opening DevTools")
        if port_file.is_file() and port_file.read_text().strip():
            port = int(port_file.read_text().splitlines()[0])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as answer:
                    targets = json.load(answer)
            except OSError:
                targets = []
            for target in targets:
                if target.get("type") == "page" and "webSocketDebuggerUrl" in target:
                    return target["webSocketDebuggerUrl"]
        time.sleep(0.1)
    raise TimeoutError("Chromium did not open its DevTools port within 60 s")


# -------------------------------------------------------------------------- checks


def _local_file(site: Path, base: str, url: str) -> Path | None:
    """The file in the built site that a same-origin URL serves, or None for other origins."""
    if not url.startswith(base + "/") and url != base:
        return None
    path = unquote(urlsplit(url).path).lstrip("/")
    target = site / path
    return target / "index.html" if (not path or target.is_dir()) else target


def _ids_in(file: Path, cache: dict[Path, set[str]]) -> set[str]:
    if file not in cache:
        text = file.read_text(encoding="utf-8", errors="replace")
        cache[file] = set(re.findall(r'\b(?:id|name)="([^"]+)"', text))
    return cache[file]


def test_every_chapter_has_a_page(site: Path) -> None:
    expected = [p.relative_to(ROOT).with_suffix(".html") for p in (ROOT / "book").glob("*") if p.suffix in {".md", ".ipynb"}]
    missing = [str(p) for p in expected if not (site / p).is_file()]
    assert not missing, f"chapters without an HTML page (are they in _toc.yml?): {missing}"


def test_pages_load(visits: dict[str, PageVisit]) -> None:
    problems = []
    for visit in visits.values():
        if not visit.loaded:
            problems.append(f"{visit.page}: no load event within {PAGE_TIMEOUT:.0f} s")
        if visit.status not in (200, 304):
            problems.append(f"{visit.page}: document status {visit.status}")
        problems += [f"{visit.page}: {failure}" for failure in visit.failures]
        problems += [f"{visit.page}: script error: {error}" for error in visit.errors]
    assert not problems, "pages that did not load cleanly:\n" + "\n".join(problems)


def test_no_requests_leave_localhost(visits: dict[str, PageVisit]) -> None:
    outside = set()
    for visit in visits.values():
        for url in visit.requests:
            parts = urlsplit(url)
            if parts.scheme in LOCAL_SCHEMES:
                continue
            if parts.hostname != "127.0.0.1":
                outside.add(f"{visit.page}: {url}")
    assert not outside, "the book must work offline, but pages requested:\n" + "\n".join(sorted(outside))


def test_images_exist_and_are_not_empty(site: Path, server: str, visits: dict[str, PageVisit]) -> None:
    problems = []
    for visit in visits.values():
        for image in visit.images:
            src = image["src"]
            if urlsplit(src).scheme == "data":
                continue
            file = _local_file(site, server, src)
            if file is None:
                problems.append(f"{visit.page}: image from another host: {src}")
            elif not file.is_file() or file.stat().st_size == 0:
                problems.append(f"{visit.page}: image missing or empty: {src}")
            elif image["complete"] and image["width"] == 0 and not file.suffix == ".svg":
                problems.append(f"{visit.page}: image does not decode: {src}")
    assert not problems, "\n".join(problems)


def test_internal_links_resolve(site: Path, server: str, visits: dict[str, PageVisit]) -> None:
    problems = []
    id_cache: dict[Path, set[str]] = {}
    for visit in visits.values():
        for href in visit.links:
            file = _local_file(site, server, href.split("#")[0])
            if file is None:
                continue  # external links are allowed; only requests must stay local
            if not file.is_file():
                problems.append(f"{visit.page}: link to missing {href}")
                continue
            fragment = unquote(urlsplit(href).fragment)
            if not fragment:
                continue
            same_page = href.split("#")[0] == visit.url
            known = set(visit.ids) if same_page else _ids_in(file, id_cache)
            if fragment not in known:
                problems.append(f"{visit.page}: link to missing anchor {href}")
    assert not problems, "broken internal links:\n" + "\n".join(sorted(set(problems)))


def test_screenshots_written(visits: dict[str, PageVisit]) -> None:
    for page in visits:
        shot = SCREENSHOTS / f"{_page_name(page)}.png"
        assert shot.is_file() and shot.stat().st_size > 1000, f"no screenshot for {page}"


def test_the_checks_see_a_bad_page(devtools: DevTools, visits: dict[str, PageVisit], tmp_path: Path) -> None:
    """The browser really reports outside requests, missing files and script errors.

    Guards the checks above against passing vacuously (say, if network events stopped
    arriving). The outside host never resolves: Chromium maps every name to NOTFOUND.
    """
    (tmp_path / "bad.html").write_text(
        "<html><body><h1>bad</h1>"
        '<img src="https://cdn.example.invalid/plot.png">'
        '<img src="missing.png">'
        "<script>throw new Error('boom')</script>"
        "</body></html>"
    )
    with _serve(tmp_path) as base:
        visit = _visit(devtools, base, "bad.html")
    assert visit.loaded and visit.status == 200
    assert "https://cdn.example.invalid/plot.png" in visit.requests
    assert any("missing.png" in failure and "404" in failure for failure in visit.failures), visit.failures
    assert any("boom" in error for error in visit.errors), visit.errors


# ------------------------------------------------------------- references, provenance, downloads


def _chapter_pages(visits: dict[str, PageVisit]) -> dict[str, PageVisit]:
    return {page: visit for page, visit in visits.items() if re.match(r"^book/[abc]\d+_", page)}


def test_chapters_cite_and_list_their_references(visits: dict[str, PageVisit]) -> None:
    chapters = _chapter_pages(visits)
    assert chapters, "no chapter pages (book/a*.html, b*, c*) were visited"
    problems = []
    for page, visit in chapters.items():
        if not any(urlsplit(href).path.endswith("/book/references.html") for href in visit.links):
            problems.append(f"{page}: cites nothing (add {{cite:p}}`key` where a claim or number comes from)")
        if "references" not in visit.ids:
            problems.append(f"{page}: no References section at its end (the closing markdown cell)")
        if "how-this-page-was-made" not in visit.ids and "how-these-results-were-made" not in visit.ids:
            problems.append(f"{page}: no provenance section at its end (the closing cells)")
    assert not problems, "\n".join(problems)


def _results_links(site: Path, server: str, visit: PageVisit) -> list[tuple[str, Path | None]]:
    links = []
    for href in visit.links:
        url = href.split("#")[0]
        if "/results/" in urlsplit(url).path:
            links.append((url, _local_file(site, server, url)))
    return links


def test_results_links_resolve(site: Path, server: str, visits: dict[str, PageVisit]) -> None:
    """Every link into the results copy serves the saved file; a chapter whose box ran links its results."""
    problems = []
    for page, visit in _chapter_pages(visits).items():
        links = _results_links(site, server, visit)
        notebook = ROOT / page.replace(".html", ".ipynb")
        box_ran = notebook.is_file() and any(
            cell.get("id") == "provenance" and cell.get("outputs") for cell in json.loads(notebook.read_text())["cells"])
        if box_ran and not links:
            problems.append(f"{page}: its provenance box ran but links no saved results")
        for url, file in links:
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = answer.read()
            if file is None or not file.is_file() or body != file.read_bytes() or not body:
                problems.append(f"{page}: {url} does not serve the saved file")
    assert not problems, "\n".join(problems)


def test_a_results_csv_downloads_in_chromium(site: Path, server: str, devtools: DevTools,
                                             visits: dict[str, PageVisit], tmp_path: Path) -> None:
    """A reader's click on a results link saves the CSV; it is the file the chapter wrote (screenshot of its text)."""
    copied = sorted((site / "results").rglob("*.csv"))
    assert copied, f"no results CSV in {site / 'results'}: mechbook.book.site_results did not copy results/"
    pages = [(page, link) for page, visit in sorted(_chapter_pages(visits).items())
             for link, _ in _results_links(site, server, visit) if link.endswith(".csv")]
    if pages:
        page, url = pages[0]
    else:  # no executed box links one yet: a link as the box writes it, from a chapter page
        page = "book/" + sorted(p.name for p in (site / "book").glob("a*.html"))[0]
        url = f"{server}/{copied[0].relative_to(site).as_posix()}"
    expected = _local_file(site, server, url).read_bytes()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    _visit(devtools, server, page)
    devtools.send("Page.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
    devtools.send("Runtime.evaluate", expression=(
        f"(() => {{ const a = document.createElement('a'); a.href = {json.dumps(url)}; a.download = ''; "
        "document.body.appendChild(a); a.click(); })()"))
    name = unquote(urlsplit(url).path).rsplit("/", 1)[-1]
    deadline = time.monotonic() + 30
    while not (downloads / name).is_file() and time.monotonic() < deadline:
        devtools._receive(0.2)
    assert (downloads / name).is_file(), f"Chromium did not download {url} into {downloads}"
    assert (downloads / name).read_bytes() == expected, f"the downloaded {name} differs from the site's copy"
    text = (downloads / name).read_text(encoding="utf-8", errors="replace")
    assert "," in text.splitlines()[0], f"{name} is not a CSV table"
    show = json.dumps(f"Downloaded from {url}\n\n" + "\n".join(text.splitlines()[:60]))
    devtools.send("Runtime.evaluate", expression=(
        f"document.open(); document.write('<pre style=\"font-size:13px\"></pre>'); document.close(); "
        f"document.querySelector('pre').textContent = {show};"))
    shot = devtools.send("Page.captureScreenshot", format="png")
    (SCREENSHOTS / f"download__{_page_name(name)}.png").write_bytes(base64.b64decode(shot["data"]))

