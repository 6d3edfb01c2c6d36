"""`make ui-check`: start the real Dagster UI on a free port and screenshot the asset lineage.

Uses the instance and config of this checkout (run `make demo` first for a populated graph) and
Debian's headless Chromium (`apt-get install chromium`) driven by Playwright.
Writes docs/lineage.png.
"""

import contextlib
import os
import shutil
import sys

from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from mole_assets.instance import dagster_home
from mole_assets.webserver import REPO, free_port, webserver

PAGE = "/locations/mole/asset-groups/router/lineage"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def dismiss_dialogs(page: Page) -> None:
    """Dismiss the community dialog a first visit shows, so the page behind it is visible."""
    skip = page.get_by_role("button", name="Skip")
    with contextlib.suppress(PlaywrightTimeout):
        skip.click(timeout=10_000)


def main() -> int:
    """Screenshot the lineage page; exit non-zero if Chromium is missing or fails."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("ui-check needs Chromium: apt-get install -y chromium", file=sys.stderr)
        return 2
    dagster_home()
    target = REPO / "docs" / "lineage.png"
    target.parent.mkdir(exist_ok=True)
    with webserver(dict(os.environ), free_port()) as url, sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(url + PAGE)
        dismiss_dialogs(page)
        page.get_by_text("deployed_router").first.wait_for(timeout=60_000)
        page.wait_for_timeout(2_000)
        page.screenshot(path=str(target))
        browser.close()
    print(f"saved {target} ({target.stat().st_size} bytes) from {url + PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
