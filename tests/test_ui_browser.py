"""Real browser sessions against `idx ui`: Debian's chromium driven by Playwright uploads an
image on the Search page, waits for the hits, explains one, searches by key, opens the Index
page; then opens the Clusters page, reconstructs a cluster's centre with its unguided
comparison, cancels a long run, leaves the page during another, and makes a second tab wait
for the first; with a screenshot of each page (PHISEARCH_SCREENSHOTS, default tmp_path).

Needs /usr/bin/chromium (`apt-get install -y chromium`, done by scripts/install.sh as root) and
the playwright package (the dev extra). Never `playwright install`: it downloads a browser."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_ui_apptest import build_store, first_jpeg

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
WAIT_MS = 180_000      # a first page load imports torch and loads the model on a busy 2-core CPU
MAX_PNG = 300_000      # screenshots kept small enough for docs/


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sync_playwright():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/install.sh "
                    "does it when run as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]' (never run "
                    "`playwright install`)")
    return sync_playwright


@dataclass(frozen=True)
class Server:
    url: str
    pid: int      # the leader of its process group (idx ui, exec'd into streamlit)


@pytest.fixture(scope="module")
def server(sync_playwright, tmp_path_factory, mini_store):
    from phisearch.indexer.manage.cluster import ClusterConfig, cluster

    root = tmp_path_factory.mktemp("ui-browser")
    cfg = build_store(root, mini_store)
    cluster(cfg, ClusterConfig(method="kmeans", k=3))   # 3 clusters, no noise
    port = free_port()
    env = dict(os.environ, PHISEARCH_NO_PROGRESS="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "phisearch.ui", "ui", "--store", cfg.path, "--port", str(port),
             "--address", "127.0.0.1", "--device", "cpu", "--hold", "2"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"idx ui exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"idx ui did not answer in 120 s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield Server(url, proc.pid)
    finally:   # always: the server is in its own session, so its group is ours to end
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


@pytest.fixture
def shots(tmp_path) -> Path:
    d = Path(os.environ.get("PHISEARCH_SCREENSHOTS") or tmp_path / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def shot(page, path: Path) -> Path:
    """The whole page (Streamlit scrolls inside its own container, so the viewport is made as
    tall as the content, up to 2400 px), palette-reduced when over MAX_PNG bytes."""
    from PIL import Image

    size = page.viewport_size
    tall = page.evaluate("""() => Math.max(...Array.from(document.querySelectorAll(
        '[data-testid="stMain"], [data-testid="stMainBlockContainer"]')).map(e => e.scrollHeight),
        0)""")
    page.set_viewport_size({"width": size["width"], "height": min(max(tall + 40, 600), 2400)})
    page.wait_for_timeout(1500)   # charts draw after the resize
    settle(page)
    data = page.screenshot()
    page.set_viewport_size(size)
    if len(data) > MAX_PNG:
        im = Image.open(io.BytesIO(data)).convert("RGB").quantize(256)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
    path.write_bytes(data)
    return path


def settle(page, timeout_s: float = 120) -> None:
    """Wait until the app has finished rerunning: no "Running..." widget, no stale element."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count()
        stale = page.locator('[data-stale="true"], [data-testid="stSkeleton"]').count()
        quiet = quiet + 1 if not running and not stale else 0
        if quiet >= 4:
            return
        page.wait_for_timeout(250)
    raise AssertionError("the app kept running")


def no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.content()[-3000:]


def open_app(browser, url: str):
    """A new tab on the app, waited for: its first page's heading is there."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("heading").first.wait_for()
    return page


def search_by_key_then_more_like_this(page, key: str) -> None:
    """Search page: the key typed in the box finds its image first, marked as the query; "More
    like this" under the second hit makes that hit the query."""
    page.get_by_role("link", name="Search").click()
    page.get_by_role("heading", name="Search").wait_for()
    settle(page)
    page.get_by_text("Indexed key", exact=True).first.click()
    settle(page)
    box = page.get_by_role("textbox", name="Indexed key")
    box.fill(key)
    box.press("Enter")
    page.get_by_text(f"indexed: {key}").wait_for()
    settle(page)
    no_exception(page)
    keys = page.locator('[data-testid="stMain"] [data-testid="stCaptionContainer"] code')
    assert keys.nth(0).inner_text() == key
    assert page.get_by_text("(the query image)").count() == 1
    second = keys.nth(1).inner_text()
    page.get_by_role("button", name="More like this").nth(1).click()
    page.get_by_text(f"indexed: {second}").wait_for()
    settle(page)
    no_exception(page)
    assert keys.nth(0).inner_text() == second
    assert page.get_by_text("(the query image)").count() == 1


def test_search_explain_reconstruct_in_chromium(server, sync_playwright, mini_shard, shots,
                                                tmp_path):
    key, jpg = first_jpeg(mini_shard)
    image = tmp_path / "query.jpg"
    image.write_bytes(jpg)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = open_app(browser, server.url)
            page.get_by_role("heading", name="Search").wait_for()
            page.get_by_text("Upload an image, type an indexed key or pick a random indexed "
                             "image.").wait_for()
            page.locator('input[type="file"]').set_input_files(str(image))
            # the image itself comes back first, at distance 0, with its label
            page.get_by_text("d = 0.000", exact=False).first.wait_for()
            settle(page)
            no_exception(page)
            assert page.get_by_text(re.compile(r" · cluster \d")).count() >= 10
            shot(page, shots / "ui-search.png")

            page.get_by_role("button", name="Explain").nth(1).click()
            page.get_by_role("heading", name="Explain a match").wait_for()
            page.get_by_text("Channels that drive the distance").wait_for()
            settle(page)
            no_exception(page)
            shot(page, shots / "ui-explain.png")

            page.get_by_role("link", name="Index").click()
            page.get_by_role("heading", name="Index").wait_for()
            page.get_by_text("Shards done").wait_for()
            settle(page)
            no_exception(page)
            shot(page, shots / "ui-index.png")

            search_by_key_then_more_like_this(page, key)
        finally:
            browser.close()
    for name in ("ui-search.png", "ui-explain.png", "ui-index.png"):
        assert 10_000 < (shots / name).stat().st_size <= MAX_PNG + 200_000


def set_number(page, label: str, value: str) -> None:
    box = page.get_by_label(label)
    box.fill(value)
    box.press("Enter")
    settle(page)


def start_long_run(page) -> None:
    """A reconstruction that would take hours; returns once it is under way (it holds the
    server's compute lock: no other run is)."""
    set_number(page, "Levels (blank: the preset's)", "100000")
    page.get_by_role("button", name="Run reconstruction").click()
    page.get_by_text(re.compile(r"guided samples: level \d+/100000")).wait_for()


def level_passes(page, level: int) -> None:
    """Wait until the long run's progress shows `level` or a later one: the run is working."""
    later = "|".join([rf"[{level}-9]"] * (level <= 9) + [r"\d{2,}"])
    page.get_by_text(re.compile(rf"guided samples: level ({later})/100000")).wait_for()


@pytest.mark.slow   # PHISEARCH_SLOW=1 and CI run it
def test_clusters_reconstruct_cancel_and_leave_in_chromium(server, sync_playwright, shots):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = open_app(browser, server.url)
            page.get_by_role("heading", name="Search").wait_for()
            # Clusters: the k-means clustering, "Open" shows a cluster's members
            page.get_by_role("link", name="Clusters").click()
            page.get_by_role("heading", name="Clusters").wait_for()
            page.get_by_text("Clustered points").wait_for()
            settle(page)
            no_exception(page)
            page.get_by_role("button", name="Open").nth(1).click()
            page.get_by_text(re.compile(r"^\d+ members of cluster 1; showing")).wait_for()
            settle(page)
            shot(page, shots / "ui-clusters.png")

            # its centre, reconstructed: the exemplars beside it, guided and unguided samples
            page.get_by_role("button", name="Reconstruct centre").nth(1).click()
            page.get_by_role("heading", name="Reconstruct").wait_for()
            page.get_by_text("target: centre of cluster 1", exact=False).first.wait_for()
            page.get_by_text("The cluster's exemplars").wait_for()
            settle(page)
            set_number(page, "Levels (blank: the preset's)", "2")
            set_number(page, "Guidance steps per level (blank: the preset's)", "2")
            assert page.get_by_text("Estimated time: up to").count() == 1
            page.get_by_role("button", name="Run reconstruction").click()
            page.get_by_text("Unguided samples (same sampler and seed, no target)").wait_for()
            settle(page)
            no_exception(page)
            assert page.get_by_text(re.compile(r"^#\d+ · error \d")).count() == 8   # 4 + 4
            assert page.get_by_text("φ error, guided (median)").count() == 1
            shot(page, shots / "ui-reconstruct.png")

            # Cancel: the run stops. A run holds the server's compute lock for its 100,000
            # levels (hours), so the next run getting under way shows that this one let go.
            start_long_run(page)
            level_passes(page, 2)                              # it is working
            page.get_by_role("button", name="Cancel").click()
            page.get_by_text("Cancelled after").wait_for()
            settle(page)

            # leaving the page stops a run too; the page says so when you come back
            start_long_run(page)                               # the cancelled run let go
            page.get_by_role("link", name="Index").click()
            page.get_by_role("heading", name="Index").wait_for()
            settle(page)
            page.get_by_role("link", name="Reconstruct").click()
            page.get_by_text("The last run stopped when the page was left").wait_for()
            # the settings survived the page switches
            assert page.get_by_label("Levels (blank: the preset's)").input_value() == "100000"
            settle(page)

            # a second tab waits for the first tab's run, and runs when it is cancelled
            start_long_run(page)                               # the left run let go
            other = open_app(browser, f"{server.url}/reconstruct")
            other.get_by_role("heading", name="Reconstruct").wait_for()
            other.get_by_text("Search hit").first.wait_for()
            settle(other)
            other.get_by_text("Cluster centre").first.click()
            settle(other)
            set_number(other, "Levels (blank: the preset's)", "2")
            other.get_by_role("button", name="Run reconstruction").click()
            other.get_by_text("Waiting for another reconstruction to finish").wait_for()
            page.get_by_role("button", name="Cancel").click()
            other.get_by_text("φ error, guided (median)").wait_for()
            settle(other)
            no_exception(other)
            no_exception(page)
        finally:
            browser.close()
    for name in ("ui-clusters.png", "ui-reconstruct.png"):
        assert 10_000 < (shots / name).stat().st_size <= MAX_PNG + 200_000
