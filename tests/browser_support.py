"""Headless Chromium for the browser tests, and the service as a real HTTP server in a thread.

`ensure_chromium()` finds /usr/bin/chromium and /usr/bin/chromedriver (Debian packages `chromium`
and `chromium-driver`) and, when they are missing and we run as root, installs them once with
apt-get. Without them (and without root) the browser tests are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
APT_PACKAGES = ("chromium", "chromium-driver")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"

# Flags for a quiet, offline, sandbox-free (container, root) headless browser.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
    "--lang=en-GB",
)

_install_lock = threading.Lock()
_install_attempted = False


def chromium_present() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


def ensure_chromium() -> str | None:
    """None when Chromium and chromedriver are ready; otherwise why they are not."""
    global _install_attempted
    if chromium_present():
        return None
    with _install_lock:
        if chromium_present():
            return None
        if os.geteuid() != 0:
            return "chromium / chromium-driver missing (install: apt-get install -y chromium chromium-driver)"
        if shutil.which("apt-get") is None:
            return "chromium missing and apt-get not available"
        if not _install_attempted:
            _install_attempted = True
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            commands = (
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
            )
            for command in commands:
                result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
                if result.returncode != 0:
                    return f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}"
    return None if chromium_present() else "chromium still missing after apt-get install"


def new_driver(user_data_dir: Path):
    """A headless Chromium WebDriver with its own temporary profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    return driver


@contextmanager
def live_server(app):
    """Serve `app` on 127.0.0.1 (a free port) with werkzeug in a thread; yields the base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="rpl-live-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def save_screenshot(driver, name: str, max_height: int = 6000) -> Path:
    """PNG of the page in docs/screenshots/<name>.png: the full page, up to `max_height` pixels."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    height = driver.execute_script(
        "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"
    )
    width = driver.execute_script("return window.outerWidth") or 1280
    driver.set_window_size(width, min(max(int(height) + 120, 800), max_height))
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1000)
    return path
