"""Open a page in headless Chromium (Debian's package, driven by Playwright; no browser download)
with the network cut off, and report what rendered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.system import require

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """The Chromium binary; CI must have it (.ci/run installs it), elsewhere the test is skipped."""
    return require("chromium", "chromium-browser", package="chromium")


def render(page_path: Path) -> dict[str, Any]:
    """Load `page_path` offline; return its images, tables, text and every request that tried the network."""
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()

            def route(r: Any) -> None:
                url = r.request.url
                if url.startswith(("file:", "data:")):
                    r.continue_()
                else:
                    blocked.append(url)
                    r.abort()

            page.route("**/*", route)
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            images = page.evaluate("[...document.images].map(i => ({name: i.dataset.name, complete: i.complete, "
                                   "width: i.naturalWidth, height: i.naturalHeight}))")
            tables = page.evaluate("[...document.querySelectorAll('table')].map(t => t.rows.length)")
            text = page.inner_text("body")
        finally:
            browser.close()
    return {"images": images, "tables": tables, "text": text, "blocked": blocked}
