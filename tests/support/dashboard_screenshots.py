"""Take the README's screenshots of the dashboard (``docs/dashboard-*.png``): the jobs
``tests.support.dashboard.seed`` makes, on the stub broker in this process, served by uvicorn and
shot by the system's Chromium (Playwright). Run from the repository's root:

    python -m tests.support.dashboard_screenshots [OUT_DIR]    # default: docs/
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

import epq
from epq.dashboard import create_app
from epq.testing import HandlerRegistry, install
from tests.support.dashboard import CHROMIUM, seed, serving


def main(out: Path) -> list[Path]:
    broker = install("stub://")
    seeded = seed(broker, HandlerRegistry())
    svc = epq.QueueService(broker)
    svc.pause_queue("events")
    shots = {
        "queues": "/queues",
        "jobs": "/jobs",
        "job": f"/jobs/{seeded.dead[0]}",
        "dead": "/dead",
    }
    written = []
    with serving(create_app(svc)) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(base_url=base, viewport={"width": 1280, "height": 760})
        for name, path in shots.items():
            page.goto(path)
            target = out / f"dashboard-{name}.png"
            page.screenshot(path=str(target), full_page=True)
            written.append(target)
        browser.close()
    return written


if __name__ == "__main__":
    for path in main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs")):
        print(path)
