"""Open a report in a real headless browser (Debian's `chromium`): does it render, every chart, no errors?

No browser driver is needed. The page is copied with a small probe script placed first in <head>:
it records script errors, failed resource loads (a report that tried to fetch anything from the
network would fail here, offline), unhandled promise rejections and console.error calls, and at
the load event writes what it saw, plus the rendered size of every chart, into the DOM. Chromium's
`--dump-dom` prints that DOM. Chromium's own console log (`--enable-logging=stderr`) is read too.
A screenshot is taken of the unmodified page.

    python -m deltatune.compare.browser runs/grid/report.html --screenshot docs/results/report.png
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

BASE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
)

PROBE = """<script id="__deltatune_probe">
(function () {
  var seen = [];
  window.addEventListener('error', function (event) {
    var target = event.target || {};
    seen.push(event.message ? 'error: ' + event.message
              : 'failed to load: ' + (target.src || target.href || target.tagName || 'a resource'));
  }, true);
  window.addEventListener('unhandledrejection', function (event) {
    seen.push('unhandled rejection: ' + event.reason);
  });
  var original = console.error;
  console.error = function () { seen.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
                                return original.apply(console, arguments); };
  window.addEventListener('load', function () {
    var plots = Array.prototype.map.call(document.querySelectorAll('svg.plot'), function (svg) {
      var box = svg.getBoundingClientRect();
      return {name: svg.getAttribute('data-plot'), width: Math.round(box.width), height: Math.round(box.height),
              marks: svg.querySelectorAll('polyline, circle, rect, polygon, line').length};
    });
    var out = document.createElement('pre');
    out.id = '__deltatune_result';
    out.textContent = JSON.stringify({errors: seen, plots: plots, title: document.title,
                                      tables: document.querySelectorAll('table').length});
    document.body.appendChild(out);
  });
})();
</script>"""


@dataclass
class PageCheck:
    """What the browser saw."""

    errors: list[str] = field(default_factory=list)
    """Script errors, failed loads, console errors and console messages from chromium's log."""
    plots: list[dict] = field(default_factory=list)
    """Every <svg class="plot">: name, rendered width and height, number of drawn marks."""
    title: str = ""
    tables: int = 0
    screenshot: Path | None = None


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(chromium: str, arguments: list[str], profile: Path, timeout: float) -> subprocess.CompletedProcess:
    command = [chromium, *BASE_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *arguments]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HOME": str(profile)}
    )


def check_page(
    page: str | Path,
    screenshot: str | Path | None = None,
    window: tuple[int, int] = (1280, 2400),
    timeout: float = 90.0,
    chromium: str | None = None,
) -> PageCheck:
    """Load `page` in headless chromium from disk and report what rendered and what went wrong."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
    page = Path(page).resolve()
    text = page.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="deltatune-browser-") as scratch:
        scratch_path = Path(scratch)
        probed = scratch_path / page.name
        head = text.find("<head>")
        if head < 0:
            raise ValueError(f"{page} has no <head>: not an HTML page deltatune wrote")
        probed.write_text(text[: head + len("<head>")] + PROBE + text[head + len("<head>") :], encoding="utf-8")
        result = _run(
            chromium,
            ["--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
            scratch_path / "profile-dom",
            timeout,
        )
        check = PageCheck()
        match = re.search(r'<pre id="__deltatune_result">(.*?)</pre>', result.stdout, re.S)
        if match is None:
            check.errors.append(
                f"the page did not finish loading (chromium exit {result.returncode}): " + result.stderr.strip()[-800:]
            )
        else:
            found = json.loads(html.unescape(match.group(1)))
            check.errors += found["errors"]
            check.plots, check.title, check.tables = found["plots"], found["title"], found["tables"]
        check.errors += [line.strip() for line in result.stderr.splitlines() if ":CONSOLE" in line]
        if screenshot is not None:
            target = Path(screenshot).resolve()
            target.parent.mkdir(parents=True, exist_ok=True)
            shot = _run(
                chromium,
                [f"--window-size={window[0]},{window[1]}", f"--screenshot={target}", page.as_uri()],
                scratch_path / "profile-shot",
                timeout,
            )
            if not target.is_file():
                check.errors.append(
                    f"no screenshot was written (chromium exit {shot.returncode}): " + shot.stderr.strip()[-800:]
                )
            else:
                check.screenshot = target
    return check


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m deltatune.compare.browser", description=__doc__.splitlines()[0])
    parser.add_argument("page")
    parser.add_argument("--screenshot", help="write a PNG of the page here")
    parser.add_argument("--window", default="1280,2400", help="window size WIDTH,HEIGHT for the screenshot")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.window.split(","))
    check = check_page(args.page, args.screenshot, (width, height))
    print(f"{check.title}: {len(check.plots)} plots, {check.tables} tables")
    for plot in check.plots:
        print(f"  {plot['name']}: {plot['width']}×{plot['height']} px, {plot['marks']} marks")
    for error in check.errors:
        print(f"  ERROR {error}")
    if check.screenshot:
        print(f"screenshot: {check.screenshot}")
    return 1 if check.errors else 0


if __name__ == "__main__":
    sys.exit(main())
