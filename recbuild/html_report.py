"""Self-contained HTML pages for the reports: every image inline as a data: URI, no scripts or styles fetched.

Shared by the data-health report (recbuild.report) and the evaluation report (train.report), so it imports
neither mxnet nor anything above recbuild. A page is built from small pieces (`table`, `image`, `section`) and
written atomically with `write_page`.

Every page carries one inline script that counts resources that failed to load and <img> elements that did not
decode, into `document.body.dataset` (failedResources, brokenImages, images) once the page has loaded;
`tools.check_pages` renders the page in headless Chromium and reads them back from the DOM.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from recbuild.atomic import atomic_open

# Thumbnails in the pages: longest side in pixels (big enough to recognise a photo, small enough that a page
# with a thousand pairs stays a few MB). Smaller images are enlarged (nearest neighbour: pixels stay visible)
# to at least THUMB_MIN_SIDE.
THUMB_SIDE = 96
THUMB_MIN_SIDE = 64
# JPEG quality of the thumbnails (PNG for images with fewer than three channels is not needed: grey JPEG works).
THUMB_QUALITY = 85

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}.headline{font-size:18px;padding:10px;background:#fff4e0;border:1px solid #f0c080}
.ok{background:#e8f6e8;border-color:#8c8}.warn{color:#b00}.pair{display:inline-block;margin:6px;padding:6px;
border:1px solid #ddd;font-size:11px;vertical-align:top;max-width:240px}.pair img{margin:2px}
.muted{color:#777;font-size:12px}img.fig{max-width:100%}img.thumb{border:1px solid #ccc}
"""

# Runs first in <head>: counts every resource (image, style sheet, script) that fails to load, in the capture
# phase where such errors are seen, and, once the page has loaded, the <img> elements that did not decode.
_RESOURCE_CHECK = """
var failedResources = 0;
window.addEventListener('error', function (e) { if (e.target && e.target !== window) failedResources++; }, true);
window.addEventListener('load', function () {
  var broken = 0, imgs = document.getElementsByTagName('img');
  for (var i = 0; i < imgs.length; i++) { if (!imgs[i].complete || imgs[i].naturalWidth === 0) broken++; }
  document.body.dataset.brokenImages = String(broken);
  document.body.dataset.images = String(imgs.length);
  document.body.dataset.failedResources = String(failedResources);
});
"""


def esc(value) -> str:
    """HTML-escape any value's str()."""
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    """An inline data: URI for `data`."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(img: np.ndarray, side: int = THUMB_SIDE) -> str:
    """A JPEG data: URI of a decoded OpenCV image (BGR, BGRA, grey or 16-bit), longest side at most `side`."""
    import cv2
    if img.dtype != np.uint8:  # 16-bit PNGs: keep the top byte for viewing
        img = (img >> 8).astype(np.uint8) if img.dtype == np.uint16 else np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    h, w = img.shape[:2]
    scale = side / max(h, w)
    if scale < 1:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    elif max(h, w) < THUMB_MIN_SIDE:
        factor = -(-THUMB_MIN_SIDE // max(h, w))
        img = cv2.resize(img, (w * factor, h * factor), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
    if not ok:
        raise ValueError("could not encode a thumbnail")
    return data_uri(buf.tobytes(), "image/jpeg")


def figure_png(fig, dpi: int = 80) -> bytes:
    """PNG bytes of a matplotlib figure (the figure is closed)."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def image(src_png: Union[bytes, str], alt: str, css: str = "fig", title: Optional[str] = None) -> str:
    """An <img> of PNG bytes (inlined) or of an existing data: URI."""
    src = src_png if isinstance(src_png, str) else data_uri(src_png, "image/png")
    tip = f' title="{esc(title)}"' if title else ""
    return f'<img class="{css}" alt="{esc(alt)}"{tip} src="{src}">'


def table(headers: Sequence[str], rows: Iterable[Sequence], left: int = 1) -> str:
    """A table; the first `left` columns are left-aligned (names), the rest right-aligned (numbers).
    Cells are escaped; floats are shown with 4 significant digits."""
    def cell(value, i: int, tag: str) -> str:
        cls = ' class="l"' if i < left else ""
        text = f"{value:.4g}" if isinstance(value, float) else ("" if value is None else value)
        return f"<{tag}{cls}>{esc(text)}</{tag}>"
    head = "".join(cell(h, i, "th") for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell(v, i, "td") for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title: str, *parts: str) -> str:
    """An <h2> and its content (parts are already HTML)."""
    return f"<h2>{esc(title)}</h2>\n" + "\n".join(parts)


def paragraph(text: str, css: str = "") -> str:
    """An escaped paragraph."""
    cls = f' class="{css}"' if css else ""
    return f"<p{cls}>{esc(text)}</p>"


def page(title: str, body_parts: Sequence[str]) -> str:
    """A complete page: inline style, the parts, and the broken-image check."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<script>{_RESOURCE_CHECK}</script><title>{esc(title)}</title><style>{_STYLE}</style></head>\n"
            f"<body>\n<h1>{esc(title)}</h1>\n" + "\n".join(body_parts) + "\n</body></html>\n")


def write_page(path: Union[str, Path], text: str) -> Path:
    """Write a page atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
    return path


def write_png(path: Union[str, Path], data: bytes) -> Path:
    """Write PNG bytes atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return path
