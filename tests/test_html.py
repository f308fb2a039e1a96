"""report.html and summary.html: one self-contained page each, parsed here and rendered in a
headless Chromium where one is installed."""

from __future__ import annotations

import base64
import html
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scsnn.report import sample_report, summarize

NASTY = '<b>&"x'
PNG = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Tags, <img> sources, table ids and cell texts of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.tables: list[str] = []
        self.cells: list[str] = []
        self.links: list[str] = []
        self._in_cell = False
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag not in ("img", "meta", "br", "link"):
            self.stack.append(tag)
        if tag == "img":
            self.imgs.append(a)
        if tag == "table":
            self.tables.append(a.get("id") or "")
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")
        for k in ("src", "href"):
            if a.get(k):
                self.links.append(a[k])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    p.close()
    return p


def _toy(n: int = 400) -> ad.AnnData:
    """An annotated AnnData with a class named ``<b>&"x``, a rare class, Unassigned cells."""
    rng = np.random.default_rng(0)
    classes = ["CD8+/CD45RA+ Naive Cytotoxic", NASTY, "CD34+"]
    truth = rng.choice(classes, n, p=[0.6, 0.38, 0.02])
    proba = rng.dirichlet(np.ones(3), n).astype(np.float32)
    proba[np.arange(n), [classes.index(t) for t in truth]] += 1.0
    proba /= proba.sum(1, keepdims=True)
    top = proba.argmax(1)
    conf = proba.max(1)
    labels = np.where(conf < 0.5, "Unassigned", np.asarray(classes, dtype=object)[top])
    a = ad.AnnData(obs=pd.DataFrame(
        {"truth": pd.Categorical(truth),
         "scsnn": pd.Categorical(labels, categories=[*classes, "Unassigned"]),
         "scsnn_confidence": conf}, index=[f"c{i}" for i in range(n)]))
    a.obsm["scsnn_probabilities"] = proba
    a.obsm["scsnn_step_labels"] = np.asarray(classes, dtype=object)[np.stack([top] * 3, 1)]
    a.obsm["X_umap"] = rng.normal(size=(n, 2))
    a.uns["scsnn"] = {"classes": np.asarray(classes, dtype=object), "model": "toy",
                      "params": {"min_confidence": 0.5},
                      "energy": {"ratio_ann_over_snn": 4.0, "snn_pj_per_cell": 10.0,
                                 "spike_rate_per_layer": np.array([0.1, 0.2])}}
    return a


def _check_page(path: Path, out: Path) -> _Page:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    page = _parse(text)
    assert page.stack == [], f"unclosed tags: {page.stack}"
    # nothing from elsewhere: no scripts, stylesheets or links to fetch
    assert "script" not in page.tags and "link" not in page.tags
    assert not [u for u in page.links if not u.startswith("data:")], page.links
    assert "http://" not in text and "https://" not in text
    return page


def test_report_html_self_contained_and_escaped(tmp_path):
    out = tmp_path / "rep"
    sample_report(_toy(), out, truth_key="truth", sample="toy <i>")
    page = _check_page(out / "report.html", out)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"recall.png", "confusion.png", "dotplot.png", "reliability.png", "latency.png",
            "spike_rates.png", "umap.png"} <= set(pngs)
    # one <img> per plot, each a valid PNG: the very bytes of the file beside it
    assert len(page.imgs) == len(pngs)
    by_name = {}
    for img in page.imgs:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == PNG
        by_name[data] = img
    assert {(out / n).read_bytes() for n in pngs} == set(by_name)
    assert all(img.get("alt") for img in page.imgs)
    # tables: summary, per class (rare marked), predicted labels
    assert page.tables == ["summary", "per-class", "labels"]
    assert NASTY in page.cells  # the name reads back as written ...
    text = (out / "report.html").read_text(encoding="utf-8")
    assert NASTY not in text and html.escape(NASTY) in text  # ... and is escaped in the file
    assert "<i>" not in text and "i" not in page.tags and "b" not in page.tags
    rows = re.findall(r'<tr class="rare">.*?</tr>', text)
    assert len(rows) == 1 and "CD34+" in rows[0]
    cells = page.cells
    assert "Unassigned" in cells
    n_un = int((_toy().obs["scsnn"] == "Unassigned").sum())
    assert any(c.startswith(f"{n_un} of 400 cells") for c in cells)
    assert "expected calibration error" in cells


def test_report_html_without_truth_or_plots(tmp_path):
    a = _toy()
    sample_report(a, tmp_path / "u")
    page = _check_page(tmp_path / "u/report.html", tmp_path / "u")
    assert page.tables == ["summary", "labels"]
    assert len(page.imgs) == len(list((tmp_path / "u").glob("*.png"))) >= 3
    sample_report(a, tmp_path / "np", plots=False)
    page = _check_page(tmp_path / "np/report.html", tmp_path / "np")
    assert page.imgs == [] and not list((tmp_path / "np").glob("*.png"))
    sample_report(a, tmp_path / "nohtml", html=False)
    assert not (tmp_path / "nohtml/report.html").exists()


def test_summary_html(tmp_path):
    a = _toy()
    sample_report(a, tmp_path / "one", truth_key="truth")
    sample_report(a, tmp_path / "two", sample=NASTY)
    summarize([tmp_path / "one", tmp_path / "two"], tmp_path / "sum")
    page = _check_page(tmp_path / "sum/summary.html", tmp_path / "sum")
    assert page.tables == ["summary", "composition"]
    assert NASTY in page.cells and "one" in page.cells
    assert NASTY not in (tmp_path / "sum/summary.html").read_text(encoding="utf-8")


# -- a real browser --------------------------------------------------------------------------

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


#: Appended to a copy of the page (the report itself holds no script): once loaded, writes
#: how many images there are and how many failed to decode into the DOM.
_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  var d = document.createElement("div");
  d.id = "img-check";
  d.setAttribute("data-total", imgs.length);
  d.setAttribute("data-broken", broken.length);
  d.setAttribute("data-tables", document.querySelectorAll("table").length);
  d.setAttribute("data-rows", document.querySelectorAll("tbody tr").length);
  document.body.appendChild(d);
});
</script>"""


def _render(browser: str, page: Path, tmp: Path) -> dict:
    probe = tmp / f"probe_{page.name}"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _CHECK + "</body>"),
                     encoding="utf-8")
    r = subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
         "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chrome-profile'}",
         "--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri()],
        capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'<div id="img-check"([^>]*)>', r.stdout)
    assert m, "the page did not finish loading: " + r.stdout[-500:]
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', m.group(1)))
    return {**{k: int(v) for k, v in attrs.items()}, "dom": r.stdout}


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary found")
def test_report_renders_in_chromium(pbmc_annotated, pbmc_model, tmp_path):
    browser = _chromium()
    assert browser
    out = tmp_path / "pbmc"
    a = pbmc_annotated.copy()
    a.obsm["X_umap"] = np.random.default_rng(0).normal(size=(a.n_obs, 2))
    sample_report(a, out, truth_key="cell_type", model=pbmc_model)
    n_png = len(list(out.glob("*.png")))
    assert n_png >= 10
    got = _render(browser, out / "report.html", tmp_path)
    assert got["total"] == n_png and got["broken"] == 0
    assert got["tables"] == 3
    n_types = a.obs["cell_type"].nunique()
    assert got["rows"] >= n_types
    assert 'id="per-class"' in got["dom"] and "CD4+/CD45RA+/CD25- Naive T" in got["dom"]
    summarize([out], tmp_path / "sum")
    s = _render(browser, tmp_path / "sum/summary.html", tmp_path)
    assert s["tables"] == 2 and s["total"] == 0


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary found")
def test_chromium_check_catches_a_broken_image(tmp_path):
    browser = _chromium()
    assert browser
    out = tmp_path / "toy"
    sample_report(_toy(), out, truth_key="truth")
    page = out / "report.html"
    text = page.read_text(encoding="utf-8")
    # corrupt one image's data: the browser cannot decode it
    first = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(text[:first] + "AAAA" + text[first + 64:], encoding="utf-8")
    got = _render(browser, broken, tmp_path)
    assert got["broken"] == 1 and got["total"] == len(list(out.glob("*.png")))
