"""The headless-Chromium check used on HTML reports (tests/infra/browser.py).

Each test writes a small page whose defect (or absence of one) is known and
checks that the browser check reports exactly that.
"""

from __future__ import annotations

import base64
import io
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infra import browser  # noqa: E402
from infra.browser import (  # noqa: E402
    INSTALL_HINT,
    MIN_INK_PIXELS,
    Browser,
    BrowserUnavailable,
    ensure_chromium,
    browser_check,  # noqa: F401 - pytest fixture
    chromium_session,  # noqa: F401 - pytest fixture
    measure_ink,
)


def _png_base64(size: tuple[int, int] = (40, 30)) -> str:
    from PIL import Image

    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((20, 40, 220), (size[0] // 2, 0, size[0], size[1]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _page(tmp_path: Path, name: str, body: str, title: str = "page") -> Path:
    path = tmp_path / f"{name}.html"
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
                    f"<style>body{{font-family:sans-serif;margin:2em}} td{{border:1px solid #888}}"
                    f"</style></head><body>{body}</body></html>")
    return path


GOOD_BODY = """
<h1>Second-level report</h1>
<svg width="120" height="60"><rect x="5" y="5" width="110" height="50" fill="#3465a4"/></svg>
<img alt="map" src="data:image/png;base64,{png}">
<table><tr><th>cluster</th><th>peak z</th></tr><tr><td>1</td><td>4.21</td></tr></table>
"""


def test_good_page_passes(browser_check, tmp_path):
    page = _page(tmp_path, "good", GOOD_BODY.format(png=_png_base64()), title="GLM report")
    result = browser_check(page)
    assert result.ok, result.problems
    assert result.console_errors == []
    assert result.external_requests == []
    assert result.broken_images == []
    assert result.image_count == 1
    assert result.title == "GLM report"
    assert not result.blank
    # heading, red/blue PNG, blue SVG, table borders: many distinct colours (antialiasing)
    assert result.colours > 5
    assert result.screenshot.is_file()


def test_console_error_reported(browser_check, tmp_path):
    page = _page(tmp_path, "console", "<p>text</p><script>console.error('boom')</script>")
    result = browser_check(page)
    assert any("boom" in message for message in result.console_errors), result.console_messages
    assert not result.ok


def test_uncaught_exception_reported(browser_check, tmp_path):
    page = _page(tmp_path, "throw", "<p>text</p><script>throw new Error('kaboom')</script>")
    result = browser_check(page)
    assert any("kaboom" in message for message in result.console_errors), result.console_messages


def test_console_log_is_not_an_error(browser_check, tmp_path):
    page = _page(tmp_path, "log", "<p>text</p><script>console.log('just info')</script>")
    result = browser_check(page)
    assert result.console_errors == []
    assert any("just info" in message for message in result.console_messages)


def test_blank_page_is_blank(browser_check, tmp_path):
    result = browser_check(_page(tmp_path, "blank", ""))
    assert result.blank
    assert result.ink_pixels < MIN_INK_PIXELS
    assert "blank screenshot" in " ".join(result.problems)


def test_page_wiped_by_script_is_blank(browser_check, tmp_path):
    """Content that a script removes before display must not count."""
    body = "<h1>gone</h1><script>document.body.innerHTML = ''</script>"
    assert browser_check(_page(tmp_path, "wiped", body)).blank


def test_external_request_blocked_and_reported(browser_check, tmp_path):
    body = ("<p>text</p><img src='https://example.com/x.png'>"
            "<link rel='stylesheet' href='http://example.org/style.css'>")
    started = time.monotonic()
    result = browser_check(_page(tmp_path, "external", body))
    elapsed = time.monotonic() - started
    assert "https://example.com/x.png" in result.external_requests
    assert "http://example.org/style.css" in result.external_requests
    assert result.broken_images == ["https://example.com/x.png"]
    # blocked, not timed out: the page timeout is 30 s; a local check takes < 1 s
    assert elapsed < 10, elapsed


def test_script_request_reported(browser_check, tmp_path):
    body = "<p>text</p><script>fetch('https://example.com/data.json').catch(() => {})</script>"
    result = browser_check(_page(tmp_path, "fetch", body))
    assert result.external_requests == ["https://example.com/data.json"]


def test_websocket_and_loopback_requests_reported(browser_check, tmp_path):
    """Network.setBlockedURLs misses WebSockets; the refusing proxy stops them, loopback too."""
    body = ("<p>text</p><img src='http://127.0.0.1:8000/local.png'>"
            "<script>new WebSocket('wss://example.com/socket')</script>")
    result = browser_check(_page(tmp_path, "socket", body))
    assert result.external_requests == ["http://127.0.0.1:8000/local.png",
                                        "wss://example.com/socket"]
    assert result.broken_images == ["http://127.0.0.1:8000/local.png"]


def test_svg_data_image_decodes(browser_check, tmp_path):
    """An SVG data URI names http://www.w3.org in xmlns: it is local and must not be blocked."""
    svg = ("data:image/svg+xml,<svg xmlns='http://www.w3.org/2000/svg' width='40' height='20'>"
           "<rect width='40' height='20' fill='green'/></svg>")
    no_size = "data:image/svg+xml,<svg xmlns='http://www.w3.org/2000/svg'><circle r='9'/></svg>"
    body = f"<p>text</p><img src=\"{svg}\"><img src=\"{no_size}\">"
    result = browser_check(_page(tmp_path, "svgimg", body))
    assert result.ok, result.problems
    assert result.image_count == 2


def test_images_in_srcdoc_frame_counted(browser_check, tmp_path):
    """nilearn's reports live in an <iframe srcdoc>: its images count, and its errors too."""
    inner = (f"<img src='data:image/png;base64,{_png_base64()}'>"
             "<img src='data:image/png;base64,AA'><script>console.error('inner boom')</script>")
    body = f"<p>outer</p><iframe srcdoc=\"{inner}\" width='400' height='200'></iframe>"
    result = browser_check(_page(tmp_path, "frame", body))
    assert result.image_count == 1
    assert result.broken_images == ["data:image/png;base64,AA"]
    assert any("inner boom" in message for message in result.console_errors)


def test_broken_base64_image_reported(browser_check, tmp_path):
    good = _png_base64()
    broken = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" + "A" * 40
    body = f"<p>text</p><img src='data:image/png;base64,{good}'><img src='{broken}'>"
    result = browser_check(_page(tmp_path, "broken", body))
    assert result.broken_images == [broken]
    assert result.image_count == 1


def test_full_page_screenshot(browser_check, tmp_path):
    """A page taller than the viewport is captured whole, down to its last element."""
    from PIL import Image

    body = ("<div style='height:3000px;background:#eee'></div>"
            "<div style='height:200px;background:#c00'></div>")
    result = browser_check(_page(tmp_path, "tall", body), height=900)
    with Image.open(result.screenshot) as shot:
        assert shot.width == 1280
        assert shot.height >= 3200
        red = shot.convert("RGB").getpixel((640, shot.height - 120))
    assert red == (204, 0, 0)


def test_measure_ink(tmp_path):
    """Ink = pixels away from the most common colour, whatever that colour is."""
    from PIL import Image

    path = tmp_path / "ink.png"
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))  # 100 px of ink
    image.paste((4, 4, 4), (50, 0, 60, 10))  # within tolerance: background
    image.save(path)
    assert measure_ink(path) == (100, 3)


def test_missing_file_raises(chromium_session, tmp_path):
    with pytest.raises(FileNotFoundError, match="no HTML file"):
        chromium_session.check(tmp_path / "missing.html", tmp_path / "x.png")


def _alive(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_browser_leaves_no_process(tmp_path):
    """A Browser of its own (not the session's): after close() none of its processes runs."""
    page = _page(tmp_path, "good", GOOD_BODY.format(png=_png_base64()))
    try:
        chromium = Browser()
    except BrowserUnavailable as exc:
        pytest.skip(f"headless Chromium unavailable: {exc}")
    processes = list(chromium._processes)  # chromedriver and Chromium, as started
    assert any(p.name() == "chromedriver" for p in processes)
    assert any("chromium" in p.name() for p in processes)
    try:
        assert chromium.check(page, tmp_path / "own.png").ok
    finally:
        chromium.close()
    assert [p.pid for p in processes if _alive(p)] == []
    assert not chromium.profile.exists()


def test_unavailable_says_how_to_install(monkeypatch):
    """Missing Chromium and no root: BrowserUnavailable (the skip reason) names the packages."""
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    monkeypatch.setattr(browser.os, "geteuid", lambda: 1000)
    with pytest.raises(BrowserUnavailable, match="chromium not found.*needs root") as info:
        ensure_chromium()
    assert INSTALL_HINT in str(info.value)
