"""Headless Chromium for tests: find Debian's ``chromium`` (or another Chrome), screenshot, dump the DOM.

Why a real browser: the trace page relies on CSS (confidence shading via ``calc``) and a script that
wires the step scrubber; only a rendering engine shows whether the page is blank or the script broke.
The tests never install anything themselves: without Chromium the tests using it are *skipped* with
the reason and the install command (``.ci/run`` installs it first). ``DMAX_REQUIRE_CHROMIUM=1`` turns
that skip into a failure, for a CI that must not silently lose the check; ``-m "not browser"``
deselects them.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1")
MISSING = ("Chromium not found (looked for $CHROMIUM, " + ", ".join(CANDIDATES) + "); the browser test "
           "needs it: `apt-get install -y chromium` (what .ci/run does) or set CHROMIUM=/path/to/chrome")


class ChromiumUnavailable(RuntimeError):
    """Chromium is required (``DMAX_REQUIRE_CHROMIUM=1``) but not installed, or ``$CHROMIUM`` is bad."""


def _find() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise ChromiumUnavailable(f"CHROMIUM={env!r} is not an executable file")
        return env
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_path() -> str:
    """Path of a Chromium binary; skips the calling test (with the reason) when there is none."""
    found = _find()
    if found:
        return found
    if os.environ.get("DMAX_REQUIRE_CHROMIUM", "") not in ("", "0"):
        raise ChromiumUnavailable(MISSING)
    pytest.skip(MISSING)


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium_path(), *FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc


def screenshot(url: str, png: str | os.PathLike[str], size: tuple[int, int] = (1200, 900),
               timeout: float = 120) -> Path:
    """Render ``url`` headless and save a PNG of the viewport."""
    out = Path(png)
    _run([f"--screenshot={out}", f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=2000", url],
         timeout)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot at {out}")
    return out


def dump_dom(url: str, timeout: float = 120) -> str:
    """The serialised DOM after the page's scripts ran (``--dump-dom``)."""
    return _run(["--dump-dom", "--virtual-time-budget=2000", url], timeout).stdout


def read_png_rgb(path: str | os.PathLike[str]) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes) into rows of RGB bytes.

    Plain zlib/struct so the check needs no imaging library.
    """
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos, idat, width = 8, b"", 0
    height = depth = color = interlace = 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if depth != 8 or color not in (2, 6) or interlace:
        raise ValueError(f"{path}: unsupported PNG (bit depth {depth}, colour type {color}, interlace "
                         f"{interlace})")
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        prev = line
        rows.append(bytes(line) if bpp == 3 else bytes(v for k, v in enumerate(line) if k % 4 != 3))
    return width, height, rows
