"""The widgets in a real browser: JupyterLab on localhost, a lesson opened in headless Chromium (Debian's
chromium, driven by Playwright), the teleop cell run, the widget rendered and answering a click.

`make setup` installs chromium (apt) and playwright (pip); the test uses the system browser, so no
browser download is needed. It works on a copy of the lesson, so JupyterLab never writes to the repo,
and leaves a screenshot in runs/browser/ for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a browser and JupyterLab (still in make test; skipped by make test-fast)

REPO = Path(__file__).resolve().parents[1]
LESSON = REPO / "solutions" / "00_tour.ipynb"
SCREENSHOT = REPO / "runs" / "browser" / "teleop_widget.png"
CELL_TEXT = 'TeleopPanel("labkit/Detour-v0"'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within {timeout:.0f} s")


@pytest.fixture
def jupyter_lab(tmp_path):
    """A JupyterLab server on a free localhost port, serving a copy of lesson 00; yields its URL."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(LESSON, root / LESSON.name)
    config, settings = tmp_path / "config", tmp_path / "settings"
    (config / "labconfig").mkdir(parents=True)
    # The announcements popup covers part of the page; render every cell (no virtual windowing) so
    # the one we want is in the DOM.
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none"}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "lab.log").open("w"))
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/status?token={token}", 60)
        yield f"http://127.0.0.1:{port}/lab/tree/{LESSON.name}?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


def test_teleop_widget_renders_in_chromium(jupyter_lab):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "no chromium on PATH: `make setup` installs it (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            _drive(page, jupyter_lab)
        except Exception:
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT.with_name("failure.png")))  # what the browser showed
            raise
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000


def _kernel_ready(page, timeout: float = 90.0) -> None:
    """Wait until the notebook's kernel is idle. On a slow start JupyterLab may ask which kernel to
    use (a "Select Kernel" dialog that swallows key presses): accept its preferred one."""
    end = time.time() + timeout
    select = page.locator(".jp-Dialog").get_by_role("button", name="Select")
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    while time.time() < end:
        if select.count() and select.first.is_visible():
            select.first.click()
        elif idle.count() and not page.locator(".jp-Dialog").count():
            return
        page.wait_for_timeout(500)
    raise TimeoutError(f"the notebook's kernel was not idle within {timeout:.0f} s")


def _drive(page, url: str) -> None:
    """Open the lesson, run the teleop cell, wait for the widget, click Step, take the screenshot."""
    page.goto(url)
    cell = page.locator(".jp-CodeCell", has_text=CELL_TEXT)
    cell.wait_for(timeout=90_000)
    widget = cell.locator(".labkit-teleop")
    for _ in range(3):  # a run swallowed by a kernel dialog is retried once the kernel is chosen
        _kernel_ready(page)
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        prompt = cell.locator(".jp-InputPrompt")
        end, started = time.time() + 15, False  # the run must start (prompt [*] or [n]) within 15 s
        while time.time() < end and not widget.count() and not page.locator(".jp-Dialog").count():
            if not started and re.search(r"\[(\*|\d+)\]", prompt.inner_text()):
                started, end = True, time.time() + 120  # running: give it time to import and render
            page.wait_for_timeout(250)
        if widget.count():
            break
    widget.wait_for(state="visible", timeout=60_000)
    image = widget.locator("img").first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                           timeout=30_000)
    assert image.evaluate("img => img.naturalWidth") == 256  # the env's render size
    sliders = widget.locator(".widget-slider")
    assert sliders.count() == 2  # Detour's action: two velocities

    widget.get_by_role("button", name="Step").click()  # a round trip through the kernel
    page.wait_for_function("el => el.innerText.includes('step 1')", arg=widget.element_handle(),
                           timeout=30_000)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    cell.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOT))
