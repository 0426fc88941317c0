"""Screenshots of `idx ui` on a real index, for docs/screenshots/: Search (an uploaded image),
Explain (its second hit), Clusters, Channels, Reconstruct (the second hit, `fast` schedule, with
its unguided comparison) and Index. Drives Debian's chromium with Playwright, as the browser test
does (tests/test_ui_browser.py, whose helpers it uses).

    .venv/bin/python scripts/ui_screenshots.py --store ~/.phisearch/store \\
        --image n03445777_10862 --out docs/screenshots

--image: an indexed key (its JPEG is read from the shards under ../shared/data) or a file path.
The store should be clustered (`idx cluster`) for the Clusters page to show something.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_ui_browser import ARGS, CHROMIUM, free_port, settle, shot  # noqa: E402

from phisearch.indexer.cli.common import default_store  # noqa: E402
from phisearch.indexer.sources.shards import read_shard  # noqa: E402

DATA = Path(os.environ.get("PHISEARCH_DATA", REPO.parent / "shared" / "data")) / "imagenette-64"


def image_file(spec: str, tmp: Path) -> Path:
    if Path(spec).is_file():
        return Path(spec)
    for shard in sorted(DATA.glob("*.tar")):
        for r in read_shard(str(shard)):
            if isinstance(r, dict) and r.get("__key__", "").endswith(spec):
                out = tmp / f"{spec.replace('/', '_')}.jpg"
                out.write_bytes(r["jpg"])
                return out
    raise SystemExit(f"{spec}: neither a file nor a key in {DATA}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=default_store())
    ap.add_argument("--image", required=True)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    image = image_file(args.image, tmp)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "phisearch.ui", "ui", "--store", args.store,
                             "--port", str(port), "--address", "127.0.0.1", "--device", "cpu"],
                            stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(300_000)
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_role("heading", name="Search").wait_for()
            page.locator('input[type="file"]').set_input_files(str(image))
            page.get_by_text("d = 0.000", exact=False).first.wait_for()
            settle(page)
            shot(page, args.out / "ui-search.png")
            page.get_by_role("button", name="Explain").nth(1).click()
            page.get_by_text("Channels that drive the distance").wait_for()
            settle(page)
            shot(page, args.out / "ui-explain.png")
            for name, wait in (("Clusters", "Clustered points"), ("Channels", "Channel")):
                page.get_by_role("link", name=name).click()
                page.get_by_role("heading", name=name).wait_for()
                page.get_by_text(wait).first.wait_for()
                settle(page)
                shot(page, args.out / f"ui-{name.lower()}.png")
            page.get_by_role("link", name="Reconstruct").click()
            page.get_by_role("heading", name="Reconstruct").wait_for()
            settle(page)
            page.get_by_text("Search hit").first.click()
            settle(page)
            page.get_by_role("button", name="Run reconstruction").click()
            page.get_by_text("Unguided samples (same sampler and seed, no target)").wait_for()
            settle(page)
            shot(page, args.out / "ui-reconstruct.png")
            page.get_by_role("link", name="Index").click()
            page.get_by_role("heading", name="Index").wait_for()
            page.get_by_text("Shards done").wait_for()
            settle(page)
            shot(page, args.out / "ui-index.png")
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    print("\n".join(str(p) for p in sorted(args.out.glob("ui-*.png"))))


if __name__ == "__main__":
    main()
