"""bench/datasets/gimp_help.py: the GIMP manual's pages -> figures, text and labels (on a tiny hand-made manual)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("gimp_help", REPO / "bench" / "datasets" / "gimp_help.py")
gimp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gimp)

PAGE = """<html><head><title>{title}</title><link rel="up" href="{up}"></head><body>{body}</body></html>"""
FIGURE = """<div class="figure"><p class="title"><b>Figure 17.54. Example for the "Blur" filter</b></p>
<div class="mediaobject"><img src="images/filters/examples/{img}" alt="ignored when titled"></div>
<div class="caption"><p>Left: original. Right: blurred</p></div></div>"""


def write_manual(root: Path) -> None:
    pages = {
        "index.html": ("GIMP User Manual", "", ""),
        "filters.html": ("Chapter 17. Filters", "index.html", ""),
        "filters-blur.html": ("2. Blur Filters", "filters.html", ""),
        "gaussian.html": ("2.3. Gaussian Blur", "filters-blur.html",
                          "<p>Some words before.</p>" + FIGURE.format(img="gauss.png")
                          + '<p>The icon <img src="images/icons/x.png"> is inline.</p>'),
        "tools.html": ("Chapter 14. Tools", "index.html",
                       '<p>The toolbox.</p><div class="mediaobject"><img src="images/toolbox.png" alt=""></div>'),
    }  # fmt: skip
    root.mkdir(parents=True)
    for name, (title, up, body) in pages.items():
        (root / name).write_text(PAGE.format(title=title, up=up, body=body))


def test_figures_text_and_labels(tmp_path):
    write_manual(tmp_path / "html")
    pages, chains = gimp.parse_manual(tmp_path / "html")
    fig = pages["gaussian.html"].figures
    assert len(fig) == 1 and [i["src"] for i in fig[0]["images"]] == ["images/filters/examples/gauss.png"]  # not the inline icon
    assert gimp.strip_number(fig[0]["title"]) == 'Example for the "Blur" filter'
    assert fig[0]["images"][0]["caption"].strip().startswith("Left: original")
    assert chains["gaussian.html"] == ["GIMP User Manual", "Chapter 17. Filters", "2. Blur Filters", "2.3. Gaussian Blur"]
    # home > chapter > section: the filter category is the section, without "Filters"
    assert gimp.label_of(["Home", "Part", "Chapter 17. Filters", "2. Blur Filters", "2.3. Gaussian Blur"], "filter-category") == "Blur"
    assert gimp.label_of(["Home", "Part", "Chapter 17. Filters", "2. Blur Filters"], "chapter") == "Filters"
    assert gimp.label_of(["Home", "Part", "Chapter 14. Tools", "1. Toolbox"], "filter-category") is None
    tools = pages["tools.html"].figures  # a block image outside a figure: its context is the paragraph before it
    assert tools[0]["images"][0]["context"] == "The toolbox."
