"""A real headless Chromium that checks self-contained HTML files (reports).

:func:`ensure_chromium` installs the Debian packages ``chromium`` and
``chromium-driver`` when they are missing and this process may (root,
apt-get).  Where that is impossible it raises :class:`BrowserUnavailable`
whose message is the reason to skip.

:class:`Browser` drives one headless Chromium through Selenium and the
Debian ``chromedriver`` (never Selenium Manager: the driver path is given and
``SE_OFFLINE=true``).  :meth:`Browser.check` loads ``file://<path>`` with every
http(s)/ws(s) request blocked, and returns a :class:`BrowserCheck`: console
errors and uncaught exceptions, the external requests the page tried, the
``<img>`` elements that did or did not decode, and a full-page screenshot
judged blank or not from its pixels.

Use the ``browser_check`` fixture in a test module::

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests/ folder
    from infra.browser import browser_check, chromium_session  # noqa: F401, E402

    def test_report(browser_check, tmp_path):
        result = browser_check(report_path)
        assert result.ok, result.problems

Run ``python tests/infra/browser.py REPORT.html [SHOT.png]`` to check a file by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/infra, also when run as a script
from apt_packages import install, tail as _tail  # noqa: E402

PACKAGES = ("chromium", "chromium-driver")
BROWSER_NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = "apt-get update && apt-get install -y chromium chromium-driver"
#: URLPattern syntax, anchored.  Never the legacy ``urls`` wildcards of
#: Network.setBlockedURLs: "http://*" there matches anywhere in the URL and so
#: blocks ``data:image/svg+xml,<svg xmlns='http://www.w3.org/2000/svg'...``.
BLOCKED_URL_PATTERNS = tuple({"urlPattern": f"{scheme}://*:*/*", "block": True}
                             for scheme in ("http", "https", "ws", "wss"))
#: Schemes a self-contained page may load from.
LOCAL_SCHEMES = frozenset({"file", "data", "blob", "about", "javascript", "chrome-error"})
#: Screenshots are cut at this height (px); taller pages are judged on their top.
MAX_SCREENSHOT_HEIGHT = 20000
#: A channel differing by more than this from the background counts as ink.
INK_TOLERANCE = 8
#: Fewer ink pixels than this: the screenshot is blank.
MIN_INK_PIXELS = 100


class BrowserUnavailable(RuntimeError):
    """Chromium cannot be installed here; the message says why and how to install it."""


class BrowserStartError(RuntimeError):
    """Chromium is installed but did not start; a failure, never a reason to skip."""


# --------------------------------------------------------------------------
# installation
# --------------------------------------------------------------------------
def find_chromium() -> Path | None:
    """Return the Chromium binary on PATH, or None."""
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def find_chromedriver() -> Path | None:
    """Return the chromedriver binary on PATH (or Debian's place), or None."""
    found = shutil.which("chromedriver") or shutil.which("chromedriver", path="/usr/lib/chromium")
    return Path(found) if found else None


def _missing() -> list[str]:
    return [name for name, found in (("chromium", find_chromium()),
                                     ("chromedriver", find_chromedriver())) if found is None]


def ensure_chromium(timeout: float = 900.0) -> Path:
    """Install chromium and chromium-driver from apt if either is missing.

    Parameters
    ----------
    timeout : float
        Seconds allowed for each apt-get command (also the dpkg lock wait).

    Returns
    -------
    Path
        The Chromium binary.

    Raises
    ------
    BrowserUnavailable
        When a program is missing and cannot be installed: not root, no
        apt-get, or apt-get failed (its output's tail is in the message).
    """
    missing = _missing()
    if missing:
        install(PACKAGES, f"headless browser check: {', '.join(missing)} not found", BrowserUnavailable,
                timeout, f"\nInstall by hand: {INSTALL_HINT}")
        still = _missing()
        if still:
            raise BrowserUnavailable(f"apt-get installed {' '.join(PACKAGES)} but "
                                     f"{', '.join(still)} still not found on PATH.")
    return find_chromium()


# --------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------
@dataclass
class BrowserCheck:
    """What Chromium saw of one HTML file.

    Attributes
    ----------
    console_errors : list of str
        Console messages of level error (SEVERE), uncaught exceptions
        included, and a note when the page did not finish loading.
    external_requests : list of str
        URLs outside file:/data:/blob: the page tried to load (all blocked).
    screenshot : Path
        Full-page PNG (cut at ``MAX_SCREENSHOT_HEIGHT`` px).
    blank : bool
        Fewer than ``MIN_INK_PIXELS`` pixels differ from the background colour.
    title : str
        ``document.title``.
    image_count : int
        ``<img>`` elements that decoded (``decode()`` resolved, ``naturalWidth > 0``),
        in the page and its same-origin frames (nilearn puts reports in a srcdoc iframe).
    broken_images : list of str
        Sources of the ``<img>`` elements that did not decode.
    ink_pixels, colours : int
        Pixels differing from the background; distinct colours in the screenshot.
    console_messages : list of str
        Every console message, all levels, as ``LEVEL: message``.
    """

    console_errors: list[str]
    external_requests: list[str]
    screenshot: Path
    blank: bool
    title: str
    image_count: int
    broken_images: list[str]
    ink_pixels: int = 0
    colours: int = 0
    console_messages: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Everything wrong with the page, one line each (empty when fine)."""
        found = [f"console error: {m}" for m in self.console_errors]
        found += [f"external request: {u}" for u in self.external_requests]
        found += [f"broken image: {s[:120]}" for s in self.broken_images]
        if self.blank:
            found.append(f"blank screenshot ({self.ink_pixels} ink pixels): {self.screenshot}")
        return found

    @property
    def ok(self) -> bool:
        """True when :attr:`problems` is empty."""
        return not self.problems


# --------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------
def measure_ink(png: Path, tolerance: int = INK_TOLERANCE) -> tuple[int, int]:
    """Return (pixels differing from the most common colour, distinct colours).

    A pixel is ink when any RGB channel differs from the background (the most
    frequent colour) by more than ``tolerance``; memory stays ~4 bytes/pixel.
    """
    from PIL import Image, ImageChops

    with Image.open(png) as image:
        rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=rgb.width * rgb.height)
    background = max(colours)[1]
    diff = ImageChops.difference(rgb, Image.new("RGB", rgb.size, background))
    red, green, blue = diff.split()
    largest = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    ink = sum(largest.histogram()[tolerance + 1:])
    return ink, len(colours)


# --------------------------------------------------------------------------
# the browser
# --------------------------------------------------------------------------
_SETTLE = """
const done = arguments[arguments.length - 1];
requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(done, 0)));
"""

_IMAGES = """
const done = arguments[arguments.length - 1];
const wait = arguments[0];
const images = [];
const collect = doc => {  // the page's images and those of same-origin (e.g. srcdoc) frames
    images.push(...doc.images);
    for (const frame of doc.querySelectorAll('iframe, frame')) {
        try { if (frame.contentDocument) collect(frame.contentDocument); } catch (e) {}
    }
};
collect(document);
const timer = new Promise(r => setTimeout(() => r(false), wait));
const decoded = img => Promise.race([img.decode().then(() => true, () => false), timer]);
Promise.all(images.map(decoded)).then(ok => done(images.map((img, i) => ({
    src: img.currentSrc || img.src || img.outerHTML.slice(0, 200),
    decoded: ok[i] && img.naturalWidth > 0,
}))));
"""

_HEIGHT = """
const d = document.documentElement, b = document.body;
return Math.max(d ? d.scrollHeight : 0, b ? b.scrollHeight : 0, d ? d.offsetHeight : 0);
"""


def _closed_port() -> socket.socket:
    """Return a socket bound to a loopback port and never listening: connections are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def _chrome_arguments(profile: Path, width: int, height: int, proxy_port: int) -> list[str]:
    return [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", f"--window-size={width},{height}",
        "--force-device-scale-factor=1", "--hide-scrollbars", "--mute-audio",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions",
        "--disable-breakpad", "--disable-crash-reporter",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-features=Translate,MediaRouter,OptimizationHints",
        # second line of defence behind Network.setBlockedURLs (which misses WebSockets):
        # every http(s)/ws(s) request, loopback included, goes to a port that refuses it
        f"--proxy-server=http://127.0.0.1:{proxy_port}", "--proxy-bypass-list=<-loopback>",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ]


class Browser:
    """One headless Chromium (via chromedriver) reused for many checks.

    Parameters
    ----------
    width, height : int
        Default viewport in CSS pixels (device scale factor 1).
    page_timeout : float
        Seconds allowed for a page to fire its load event.
    install_timeout : float
        Seconds allowed for each apt-get command when installing.

    Raises
    ------
    BrowserUnavailable
        Chromium or chromedriver is missing and cannot be installed.
    BrowserStartError
        Both are installed but the session did not start.
    """

    def __init__(self, width: int = 1280, height: int = 900, page_timeout: float = 30.0,
                 install_timeout: float = 900.0):
        chromium = ensure_chromium(install_timeout)
        chromedriver = find_chromedriver()
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError as exc:  # a missing test dependency is a failure, not a skip
            raise ImportError(f"{exc}: install the test extra (selenium>=4.20,<5)") from exc
        os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never go online
        os.environ["SE_AVOID_STATS"] = "true"
        self.width, self.height, self.page_timeout = width, height, page_timeout
        self.profile = Path(tempfile.mkdtemp(prefix="chunkglm-chromium-"))
        self.driver_log = self.profile / "chromedriver.log"
        self._refusing = _closed_port()
        options = webdriver.ChromeOptions()
        options.binary_location = str(chromium)
        for argument in _chrome_arguments(self.profile / "profile", width, height,
                                          self._refusing.getsockname()[1]):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        options.set_capability("pageLoadStrategy", "normal")
        self._service = Service(executable_path=str(chromedriver), log_output=str(self.driver_log))
        self._processes: list = []
        try:
            self.driver = webdriver.Chrome(service=self._service, options=options)
        except Exception as exc:
            log = self._log_tail()
            self.close()
            raise BrowserStartError(f"Chromium {chromium} with {chromedriver} did not start: "
                                    f"{exc}\nchromedriver log:\n{log}") from None
        self._remember_processes()
        self.driver.set_page_load_timeout(page_timeout)
        self.driver.set_script_timeout(page_timeout)
        self._cdp("Network.enable", {})
        self._block()

    # ---------------------------------------------------------- plumbing
    def _cdp(self, command: str, params: dict) -> dict:
        return self.driver.execute_cdp_cmd(command, params)

    def _block(self) -> None:
        """Block http(s)/ws(s) in the page; Chromium older than urlPatterns relies on the proxy."""
        from selenium.common.exceptions import WebDriverException

        try:
            self._cdp("Network.setBlockedURLs", {"urlPatterns": list(BLOCKED_URL_PATTERNS)})
            self.blocking = "Network.setBlockedURLs + refusing proxy"
        except WebDriverException:
            self.blocking = "refusing proxy"

    def _log_tail(self) -> str:
        try:
            return _tail(self.driver_log.read_text(errors="replace"))
        except OSError:
            return "(no log)"

    def _remember_processes(self) -> None:
        """Add chromedriver and its current descendants to the processes ended by close()."""
        import psutil

        process = getattr(self._service, "process", None)
        if process is None:
            return
        try:
            parent = psutil.Process(process.pid)
            found = [parent, *parent.children(recursive=True)]
        except psutil.Error:
            return
        known = {p.pid for p in self._processes}
        self._processes += [p for p in found if p.pid not in known]

    def close(self) -> None:
        """Quit Chromium and chromedriver, end any leftover process, remove the profile."""
        import psutil

        self._remember_processes()
        driver = getattr(self, "driver", None)
        if driver is not None:
            try:
                driver.quit()
            except Exception:  # noqa: BLE001 - the processes are ended below anyway
                pass
            self.driver = None
        try:
            self._service.stop()
        except Exception:  # noqa: BLE001
            pass
        leftover = [p for p in self._processes if p.is_running()]
        for process in leftover:
            try:
                process.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(leftover, timeout=0.5)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass
        self._processes = []
        self._refusing.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------- checking
    def _viewport(self, width: int, height: int) -> None:
        self._cdp("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def _fresh_tab_state(self) -> None:
        """Leave the previous page and drop every log entry collected so far."""
        self.driver.get("about:blank")
        self.driver.get_log("browser")
        self.driver.get_log("performance")

    def _load(self, url: str) -> list[str]:
        from selenium.common.exceptions import TimeoutException

        try:
            self.driver.get(url)
        except TimeoutException:
            self.driver.execute_script("window.stop();")
            return [f"page did not fire its load event within {self.page_timeout:.0f} s"]
        self.driver.execute_async_script(_SETTLE)
        return []

    def _external_requests(self) -> list[str]:
        urls: list[str] = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message.get("method") == "Network.requestWillBeSent":
                url = params.get("request", {}).get("url", "")
            elif message.get("method") == "Network.webSocketCreated":
                url = params.get("url", "")
            else:
                continue
            if urlsplit(url).scheme.lower() not in LOCAL_SCHEMES and url not in urls:
                urls.append(url)
        return urls

    def check(self, path: str | os.PathLike, screenshot_path: str | os.PathLike,
              width: int | None = None, height: int | None = None) -> BrowserCheck:
        """Load ``path`` offline, collect errors, take a full-page screenshot.

        Parameters
        ----------
        path : path-like
            The HTML file.
        screenshot_path : path-like
            Where the PNG goes (parent directories are created).
        width, height : int, optional
            Viewport; the screenshot grows to the page height (at most
            ``MAX_SCREENSHOT_HEIGHT``).  Defaults: the browser's.

        Returns
        -------
        BrowserCheck
        """
        source = Path(path).resolve()
        if not source.is_file():
            raise FileNotFoundError(f"browser check: no HTML file at {source}")
        shot = Path(screenshot_path)
        shot.parent.mkdir(parents=True, exist_ok=True)
        width, height = width or self.width, height or self.height
        self._fresh_tab_state()
        self._viewport(width, height)
        self._block()
        load_errors = self._load(source.as_uri())
        full = int(self.driver.execute_script(_HEIGHT) or height)
        self._viewport(width, min(max(full, height), MAX_SCREENSHOT_HEIGHT))
        images = self.driver.execute_async_script(_IMAGES, int(self.page_timeout * 1000) // 2)
        self.driver.execute_async_script(_SETTLE)
        shot.write_bytes(self.driver.get_screenshot_as_png())
        title = self.driver.title
        logs = self.driver.get_log("browser")
        ink, colours = measure_ink(shot)
        return BrowserCheck(
            console_errors=load_errors + [e["message"] for e in logs if e["level"] == "SEVERE"],
            external_requests=self._external_requests(),
            screenshot=shot,
            blank=ink < MIN_INK_PIXELS,
            title=title,
            image_count=sum(1 for image in images if image["decoded"]),
            broken_images=[image["src"] for image in images if not image["decoded"]],
            ink_pixels=ink,
            colours=colours,
            console_messages=[f"{e['level']}: {e['message']}" for e in logs],
        )


# --------------------------------------------------------------------------
# pytest fixtures
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium_session():
    """One headless Chromium for the whole session; skips only when it cannot be installed."""
    try:
        browser = Browser()
    except BrowserUnavailable as exc:
        pytest.skip(f"headless Chromium unavailable: {exc}\nInstall with: {INSTALL_HINT}")
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def browser_check(chromium_session, tmp_path) -> Callable[..., BrowserCheck]:
    """``browser_check(html_path, screenshot_path=None, width=1280, height=900)``.

    The screenshot defaults to ``tmp_path / "<html stem>.png"``.
    """

    def check(path: str | os.PathLike, screenshot_path: str | os.PathLike | None = None,
              width: int = 1280, height: int = 900) -> BrowserCheck:
        shot = screenshot_path or tmp_path / f"{Path(path).stem}.png"
        return chromium_session.check(path, shot, width=width, height=height)

    return check


def check_html(path: str | os.PathLike, screenshot_path: str | os.PathLike,
               width: int = 1280, height: int = 900) -> BrowserCheck:
    """Check one file with a Chromium started and quit for it (see :meth:`Browser.check`)."""
    with Browser(width=width, height=height) as browser:
        return browser.check(path, screenshot_path)


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tests/infra/browser.py REPORT.html [SHOT.png]")
    started = time.monotonic()
    out = sys.argv[2] if len(sys.argv) == 3 else Path(sys.argv[1]).with_suffix(".png")
    result = check_html(sys.argv[1], out)
    print(f"{result.title!r}: {result.image_count} images, {result.ink_pixels} ink pixels, "
          f"{result.colours} colours, screenshot {result.screenshot} "
          f"({time.monotonic() - started:.1f} s)")
    print("\n".join(result.problems) or "OK")
    sys.exit(1 if result.problems else 0)
