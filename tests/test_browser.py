"""A real browser (Debian's headless Chromium, driven by Playwright) materializes
dissolved_regions from the Dagster UI of a real `dagster dev`."""

import os
import shutil
import time
from pathlib import Path

import geopandas
import pytest

from geoiso_dagster.paths import output_path
from tests.harness.live import FAST_INBOX, REPO, DagsterDev

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
KEY = "browser.gpkg"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
RUNS = """{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }"""


def _require_browser():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        playwright_ok = False
    else:
        playwright_ok = True
    if CHROMIUM.exists() and playwright_ok:
        return
    if os.environ.get("GEOISO_REQUIRE_BROWSER") == "1":
        pytest.fail("GEOISO_REQUIRE_BROWSER=1 but Chromium or Playwright is missing")
    pytest.skip("Debian's chromium or playwright not installed (make test installs both)")


def _runs_of(server: DagsterDev, partition: str) -> list[dict]:
    results = server.graphql(RUNS)["runsOrError"]["results"]
    return [r for r in results if {"key": "dagster/partition", "value": partition} in r["tags"]]


@pytest.mark.timeout(600)
def test_materialize_dissolved_regions_from_the_ui(tmp_path, naturalearth_shp):
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    server = DagsterDev(
        tmp_path / "home",
        tmp_path / "data",
        tmp_path / "dagster-dev.log",
        **FAST_INBOX,
    )
    (server.data_root / "inbox").mkdir(parents=True)
    server.start()
    try:
        # Upstream first, the way users do it: drop the file and let the sensor run.
        frame = geopandas.read_file(naturalearth_shp)
        frame["region_id"] = frame["continent"]
        frame.to_file(tmp_path / KEY, layer="countries")
        shutil.copy(tmp_path / KEY, server.data_root / "inbox" / f".{KEY}.part")
        os.rename(server.data_root / "inbox" / f".{KEY}.part", server.data_root / "inbox" / KEY)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            runs = _runs_of(server, KEY)
            if runs and runs[0]["status"] == "SUCCESS":
                break
            time.sleep(1)
        assert [r["status"] for r in _runs_of(server, KEY)] == ["SUCCESS"]
        dissolved = output_path("dissolved_regions", KEY, server.data_root)
        first_write = dissolved.stat().st_mtime_ns

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # Dagster's "Join the Dagster community" dialog covers the page on a first visit,
            # at a moment of its own choosing: whenever it shows, Playwright skips it before
            # the next action.
            page.add_locator_handler(
                page.get_by_text("Join the Dagster community"),
                lambda _: page.get_by_role("button", name="Skip").click(),
            )
            started = time.monotonic()
            page.goto(f"{server.url}/assets/dissolved_regions")
            page.wait_for_load_state("networkidle")
            page.get_by_role("button", name="Materialize…").click()
            dialog = page.get_by_role("dialog")
            expect(
                dialog.get_by_text("Launch runs to materialize dissolved_regions")
            ).to_be_visible()
            dialog.get_by_text("Select a partition or create one").click()
            page.keyboard.type(KEY)
            page.get_by_text("Select all (1)").click()
            dialog.get_by_text("Launch runs to materialize").click()  # close the picker
            page.screenshot(path=str(ARTIFACTS / "launch_dialog.png"))
            dialog.get_by_role("button", name="Launch 1 run").click()

            expect(page.get_by_text("Launched run")).to_be_visible(timeout=30_000)
            ui_runs = []
            while not ui_runs and time.monotonic() - started < 60:
                ui_runs = [
                    r
                    for r in _runs_of(server, KEY)
                    if not any(t["key"] == "dagster/sensor_name" for t in r["tags"])
                ]
                time.sleep(0.5)
            (ui_run,) = ui_runs
            page.goto(f"{server.url}/runs/{ui_run['runId']}")
            expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=180_000)
            page.screenshot(path=str(ARTIFACTS / "run_page.png"))
            elapsed = time.monotonic() - started

            page.set_viewport_size({"width": 1400, "height": 2600})  # the catalog scrolls inside
            page.goto(f"{server.url}/assets/dissolved_regions")
            page.wait_for_load_state("networkidle")
            expect(page.get_by_text("Row count")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "asset_page.png"))
            page.get_by_text("[Show Markdown]").click()  # the map in the metadata
            expect(page.get_by_role("img", name="8 regions")).to_be_visible()
            page.wait_for_timeout(800)  # let the dialog finish fading in
            page.set_viewport_size({"width": 1400, "height": 1300})
            page.screenshot(path=str(ARTIFACTS / "map_metadata.png"))
            browser.close()

        ui_runs = [
            r
            for r in _runs_of(server, KEY)
            if not any(t["key"] == "dagster/sensor_name" for t in r["tags"])
        ]
        assert [r["status"] for r in ui_runs] == ["SUCCESS"]
        assert dissolved.stat().st_mtime_ns > first_write, "the UI run rewrote the output"
        print(f"browser: asset page to successful run in {elapsed:.1f} s")
    finally:
        leftovers = server.stop()
    assert leftovers == []
