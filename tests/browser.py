"""Headless Chromium check of a self-contained HTML page (tests of the HTML reports).

    problems = check_page(Path("report.html"), tmp_path / "report.png")
    assert problems == []
    page = inspect_page(Path("report.html"), tmp_path / "first-screen.png", window=(1400, 900))
    assert page.problems == [] and page.image("site-plots").bottom <= page.viewport[1]

Debian's ``chromium`` is used (installed with apt-get when missing: directly when root, otherwise
through ``sudo -n``); :class:`BrowserUnavailable` is raised when that is impossible, so that tests can
skip with the reason.

How the check works (verified with Chromium 156 on Debian 12):

- The page is copied to a temporary folder with a ``<base href>`` pointing at the original folder (so
  relative references resolve as they would for the original) and a probe ``<script>`` placed as early
  as possible (right after ``<head>``). The probe wraps ``console.error``, listens to ``error`` events
  (uncaught exceptions, script syntax errors and, in the capture phase, resources that fail to load)
  and ``unhandledrejection``; on ``load`` it reports every ``<img>`` that is not ``complete`` or has
  ``naturalWidth === 0``, logs the layout box of every ``<img>`` (JSON: index, id, alt, top, left,
  bottom, right in CSS pixels of the viewport, natural size) and the viewport size, and then logs a final
  "loaded" line.
- Why a probe rather than the browser's own log: with ``--enable-logging=stderr --v=0`` this Chromium
  prints every console message of web content as ``INFO:CONSOLE:<line>] "<text>", source: <url>
  (<line>)`` whatever its level (``console.log`` and ``console.error`` look the same), and a missing
  image file is not logged at all. The probe therefore re-logs what it sees with a unique tag, which
  is parsed from stderr.
- ``--virtual-time-budget`` makes the headless browser run the page (load event, timers) before it
  takes the ``--screenshot``; the missing "loaded" line is itself a problem (the probe did not run).
- The screenshot must exist, be a PNG (signature and decodable by matplotlib) and not be one flat
  colour. It is ``window`` (width, height) pixels (default 1400 x 4000: most of a report; 1400 x 900 is
  a laptop's first screen). Chromium 156's headless mode lays the page out in a viewport shorter than
  the window (1400 x 757 for a 1400 x 900 window; the screenshot's bottom rows stay blank), so a
  "first screen" check compares against the reported viewport height, the stricter of the two.
"""

from __future__ import annotations

import fcntl
import html as html_lib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("chromium",)
INSTALL_LOCK = Path("/tmp/mrflesion-chromium-install.lock")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAG = "MRFLESION-PAGE-CHECK"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-extensions",
    "--no-first-run",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
)
VIRTUAL_TIME_BUDGET_MS = 10000
WINDOW = (1400, 4000)

# Console line of this Chromium: [pid:tid:date:INFO:CONSOLE:12] "text", source: file:///x.html (12)
# (older builds print CONSOLE(12) instead of CONSOLE:12).
_CONSOLE_RE = re.compile(r"CONSOLE[(:][^\]]*\]\s*\"(?P<msg>.*)\", source: (?P<src>.*)$")

_PROBE = """<script>
(function () {
  var TAG = "%(tag)s";
  var say = console.log.bind(console);
  var realError = console.error.bind(console);
  function flat(s) { return String(s).replace(/\\s+/g, " ").slice(0, 500); }
  function report(kind, text) { say(TAG + " error " + kind + ": " + flat(text)); }
  console.error = function () {
    var parts = [];
    for (var i = 0; i < arguments.length; i++) { parts.push(flat(arguments[i])); }
    report("console.error", parts.join(" "));
    realError.apply(null, arguments);
  };
  window.addEventListener("error", function (ev) {
    var t = ev.target;
    if (t && t !== window && t.tagName) {
      var ref = t.currentSrc || t.src || t.href || "";
      report("resource", "<" + t.tagName.toLowerCase() + "> failed to load " + flat(ref).slice(0, 80));
    } else {
      report("uncaught", ev.message || "error");
    }
  }, true);
  window.addEventListener("unhandledrejection", function (ev) {
    report("unhandled rejection", ev.reason);
  });
  window.addEventListener("load", function () {
    var imgs = document.images;
    for (var i = 0; i < imgs.length; i++) {
      var im = imgs[i];
      if (!im.complete || im.naturalWidth === 0) {
        report("image", "broken <img> #" + i + " alt=" + flat(im.alt || "") + " src=" + flat(im.src).slice(0, 80));
      }
      var b = im.getBoundingClientRect();
      say(TAG + " img " + JSON.stringify({index: i, id: im.id || "", alt: flat(im.alt || ""), top: b.top,
        left: b.left, bottom: b.bottom, right: b.right, natural_width: im.naturalWidth,
        natural_height: im.naturalHeight}));
    }
    say(TAG + " viewport " + JSON.stringify({width: window.innerWidth, height: window.innerHeight}));
    say(TAG + " loaded images=" + imgs.length);
  });
})();
</script>
"""


@dataclass(frozen=True)
class ImageBox:
    """Layout box of an ``<img>`` after the load event, in CSS pixels of the viewport (top-left origin)."""

    index: int
    id: str
    alt: str
    top: float
    left: float
    bottom: float
    right: float
    natural_width: int
    natural_height: int


@dataclass
class PageCheck:
    """What :func:`inspect_page` saw: problems (empty = fine), image boxes and the viewport (w, h)."""

    problems: list[str]
    images: list[ImageBox] = field(default_factory=list)
    viewport: tuple[int, int] = (0, 0)

    def image(self, ident: str) -> ImageBox:
        """The image with this ``id`` attribute (KeyError when there is none)."""
        for im in self.images:
            if im.id == ident:
                return im
        raise KeyError(f"no <img id={ident!r}> among {[im.id or im.alt for im in self.images]}")


class BrowserUnavailable(RuntimeError):
    """Chromium is missing and cannot be installed here (no apt-get, not root and no sudo, no network)."""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def ensure_chromium(timeout: float = 900) -> str:
    """Path of the chromium executable; installs Debian's ``chromium`` with apt-get when missing."""
    exe = find_chromium()
    if exe:
        return exe
    if shutil.which("apt-get") is None:
        raise BrowserUnavailable("chromium is not installed and apt-get is not available")
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") is not None:
        prefix = ["sudo", "-n", "env", "DEBIAN_FRONTEND=noninteractive"]
        probe = subprocess.run(["sudo", "-n", "true"], capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            raise BrowserUnavailable(f"chromium is not installed and sudo -n is refused: {probe.stderr.strip()}")
    else:
        raise BrowserUnavailable("chromium is not installed and installing it needs root (no sudo)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # One installer at a time (parallel pytest workers would trip over apt's own lock).
    fd = os.open(INSTALL_LOCK, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        exe = find_chromium()
        if exe:
            return exe
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
            try:
                proc = subprocess.run(prefix + cmd, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise BrowserUnavailable(f"{' '.join(cmd)} timed out after {timeout:.0f} s") from exc
            if proc.returncode != 0:
                raise BrowserUnavailable(
                    f"{' '.join(cmd)} failed (rc {proc.returncode}): {proc.stdout[-1000:]} {proc.stderr[-1000:]}"
                )
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    exe = find_chromium()
    if exe is None:
        raise BrowserUnavailable("apt-get install chromium succeeded but no chromium executable was found")
    return exe


def chromium_version() -> str:
    exe = ensure_chromium()
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    return proc.stdout.strip()


def instrument(page: str, base_dir: Path) -> str:
    """The page with a ``<base href>`` to ``base_dir`` and the probe script inserted after ``<head>``."""
    head = f'<base href="{html_lib.escape(base_dir.resolve().as_uri())}/">' + _PROBE % {"tag": TAG}
    for pattern in (r"<head\b[^>]*>", r"<html\b[^>]*>", r"<!doctype[^>]*>"):
        m = re.search(pattern, page, flags=re.IGNORECASE)
        if m:
            return page[: m.end()] + head + page[m.end() :]
    return head + page


def console_messages(stderr: str) -> list[str]:
    """Texts of the console messages in chromium's ``--enable-logging=stderr`` output."""
    out = []
    for line in stderr.splitlines():
        m = _CONSOLE_RE.search(line)
        if m:
            out.append(m.group("msg"))
    return out


def screenshot_problems(path: Path) -> list[str]:
    """Problems of a screenshot: missing, not a PNG, undecodable or a single flat colour."""
    if not path.is_file():
        return [f"no screenshot was written to {path}"]
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return [f"screenshot {path.name} is not a PNG ({len(data)} bytes)"]
    import matplotlib.image as mpimg  # local: only this check needs it

    try:
        img = mpimg.imread(path, format="png")
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a problem of the page
        return [f"screenshot {path.name} cannot be decoded: {exc}"]
    if img.ndim < 2 or img.size == 0:
        return [f"screenshot {path.name} is empty"]
    pixels = img.reshape(img.shape[0] * img.shape[1], -1)
    if bool((pixels == pixels[0]).all()):
        return [f"screenshot {path.name} is one flat colour"]
    return []


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run chromium in its own process group; on timeout that group (and only it) is killed."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        return None, out


def check_page(html: Path, screenshot: Path, timeout: float = 60, window: tuple[int, int] = WINDOW) -> list[str]:
    """Open ``html`` in headless Chromium, save a screenshot and return the problems found (empty = fine).

    Problems: console errors, uncaught exceptions, resources that fail to load, broken ``<img>``
    (not complete or ``naturalWidth == 0`` after the load event), a load event that never came,
    chromium failing or timing out, and a missing / invalid / flat screenshot.
    Raises :class:`BrowserUnavailable` when chromium cannot be installed.
    """
    return inspect_page(html, screenshot, timeout, window).problems


def inspect_page(html: Path, screenshot: Path, timeout: float = 60, window: tuple[int, int] = WINDOW) -> PageCheck:
    """:func:`check_page` with the layout: the problems, every ``<img>``'s box and the viewport size."""
    exe = ensure_chromium()
    html = Path(html).resolve()
    screenshot = Path(screenshot).resolve()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    problems: list[str] = []
    page = html.read_text(encoding="utf-8", errors="replace")
    with tempfile.TemporaryDirectory(prefix="mrflesion-chromium-") as tmp_name:
        tmp = Path(tmp_name)
        probe_page = tmp / "page.html"
        probe_page.write_text(instrument(page, html.parent), encoding="utf-8")
        env = {
            **os.environ,
            "HOME": str(tmp),
            "XDG_CONFIG_HOME": str(tmp / "config"),
            "XDG_CACHE_HOME": str(tmp / "cache"),
        }
        cmd = [
            exe,
            *FLAGS,
            f"--window-size={int(window[0])},{int(window[1])}",
            f"--user-data-dir={tmp / 'profile'}",
            f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
            f"--screenshot={screenshot}",
            probe_page.as_uri(),
        ]
        t0 = time.monotonic()
        rc, log = _run(cmd, tmp, env, timeout)
        elapsed = time.monotonic() - t0
    if rc is None:
        problems.append(f"chromium timed out after {elapsed:.0f} s: {log[-1500:]}")
    elif rc != 0:
        problems.append(f"chromium exited with {rc}: {log[-1500:]}")
    loaded = False
    images: list[ImageBox] = []
    viewport = (0, 0)
    for msg in console_messages(log):
        if not msg.startswith(TAG + " "):
            continue
        body = msg[len(TAG) + 1 :]
        if body.startswith("loaded"):
            loaded = True
        elif body.startswith("error "):
            problems.append(body[len("error ") :])
        elif body.startswith(("img ", "viewport ")):
            kind, _, text = body.partition(" ")
            try:
                data = json.loads(text)  # Chromium 156 logs the text as is (quotes unescaped)
            except ValueError:
                problems.append(f"unreadable {kind} line from the probe: {text[:200]}")
                continue
            if kind == "img":
                images.append(ImageBox(**data))
            else:
                viewport = (int(data["width"]), int(data["height"]))
    if not loaded and rc == 0:
        problems.append("the page's load event was not observed (the probe script did not report)")
    problems += screenshot_problems(screenshot)
    return PageCheck(problems, images, viewport)
