"""Render report pages in headless Chromium and check they load with nothing missing.

    python -m tools.check_pages PAGE.html [...] [--out-dir DIR]

For each page: (1) the source references nothing outside itself (every src/href/url() is a data: URI or an
in-page anchor); (2) Chromium loads it with the network disabled (every host resolves to nothing) and the page's
own check (recbuild.html_report) reports no failed resource and no undecodable image, and as many images as the
source holds; (3) a screenshot is written (PAGE.png, or into --out-dir) and is not blank. Exit status 1 when any
page fails, 2 when no Chromium is installed (Debian: `apt-get install -y chromium`).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Flags for a quiet, isolated, offline headless run: no sandbox (CI containers run as root), no GPU, no network
# services or updates, a fresh profile per run.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND")
WINDOW = "1200,3000"
TIMEOUT_S = 90
_REFERENCE = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?)([^"'\s)>]*)""", re.IGNORECASE)


@dataclass
class PageCheck:
    """What was found for one page; `problems` is empty when it passed."""
    page: Path
    screenshot: Optional[Path] = None
    images: int = 0
    problems: List[str] = field(default_factory=list)


def find_browser() -> Optional[str]:
    """The first Chromium-like browser on PATH, or None."""
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def external_references(text: str) -> List[str]:
    """Every src/href/url() target that is not a data: URI or a same-page anchor."""
    return [ref for ref in _REFERENCE.findall(text) if ref and not ref.startswith(("data:", "#"))]


def _run(browser: str, args: Sequence[str], page: Path) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="check-pages-") as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=TIMEOUT_S)


def _blank(png: Path) -> bool:
    import cv2
    img = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    return img is None or int(img.max()) - int(img.min()) < 16


def check_page(page: Path, browser: str, screenshot: Path) -> PageCheck:
    """Check one page (see the module docstring)."""
    result = PageCheck(page, screenshot)
    text = page.read_text(encoding="utf-8")
    result.images = len(re.findall(r"<img\b", text, re.IGNORECASE))
    result.problems += [f"external reference {ref[:80]!r}" for ref in external_references(text)]
    dom = _run(browser, ["--dump-dom"], page)
    body = re.search(r"<body([^>]*)>", dom.stdout)
    if dom.returncode != 0 or body is None:
        result.problems.append(f"Chromium could not load it (exit {dom.returncode}): {dom.stderr.strip()[-200:]}")
        return result
    marks = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body.group(1)))
    if "images" not in marks:
        result.problems.append("the page's load check did not run (no data-images on <body>)")
    else:
        for key, what in (("failed-resources", "resource(s) failed to load"),
                          ("broken-images", "image(s) did not decode")):
            if int(marks.get(key, 0)):
                result.problems.append(f"{marks[key]} {what}")
        if int(marks["images"]) != result.images:
            result.problems.append(f"the browser saw {marks['images']} images, the source has {result.images}")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    shot = _run(browser, [f"--window-size={WINDOW}", f"--screenshot={screenshot.resolve()}"], page)
    if shot.returncode != 0 or not screenshot.is_file():
        result.problems.append(f"no screenshot (exit {shot.returncode})")
    elif _blank(screenshot):
        result.problems.append(f"{screenshot}: the screenshot is blank")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.check_pages", description=__doc__.split("\n\n")[0])
    p.add_argument("pages", nargs="+", type=Path)
    p.add_argument("--out-dir", type=Path, default=None, help="screenshots go here (default: beside each page)")
    a = p.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print(f"error: no headless browser found ({', '.join(BROWSERS)}); on Debian: apt-get install -y chromium",
              file=sys.stderr)
        return 2
    failed = 0
    for page in a.pages:
        if not page.is_file():
            print(f"{page}: FAIL: no such page")
            failed += 1
            continue
        shot = (a.out_dir / (page.stem + ".png")) if a.out_dir else page.with_suffix(".png")
        check = check_page(page, browser, shot)
        failed += bool(check.problems)
        status = "ok" if not check.problems else "FAIL: " + "; ".join(check.problems)
        print(f"{page}: {status} ({check.images} images, screenshot {check.screenshot})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
