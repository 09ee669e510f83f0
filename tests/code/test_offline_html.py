"""The HTML pages we tell a user to open render offline: they load no script or style from the network, and what their
JavaScript builds (the Data Docs tables) is really built, checked in headless Chromium with every host unresolvable.

Without Chromium these tests skip, except under MMFUSION_REQUIRE_BROWSER=1 (`make test`, which installs it first).
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmfusion.config import CleanParams, ValidateParams
from mmfusion.data.clean import clean_dataset
from mmfusion.data.docs_assets import CDN_FILES, MissingWebAsset, localize_data_docs
from mmfusion.data.validate import validate_manifest
from mmfusion.sources.manifest import build as build_manifest_source
from tests.conftest import REPO, tiny_params, write_tiny_dataset

# Offline whatever the machine: no host resolves, and none of Chromium's own background traffic.
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=15000",
]
# What a page loads (not the links a reader may follow): scripts, stylesheets, images, CSS url().
LOADED = re.compile(
    r"""<script\b[^>]*\bsrc\s*=\s*["']([^"']+)|<img\b[^>]*\bsrc\s*=\s*["']([^"']+)"""
    r"""|<link\b(?=[^>]*stylesheet)[^>]*\bhref\s*=\s*["']([^"']+)|url\(\s*["']?([^"')\s]+)""",
    re.IGNORECASE,
)


def loaded_urls(html: str) -> list[str]:
    """Every URL a page loads as a script, stylesheet, image or CSS url()."""
    return [next(g for g in m.groups() if g) for m in LOADED.finditer(html)]


def chromium() -> str:
    """Debian's chromium; the test skips where it is missing, unless MMFUSION_REQUIRE_BROWSER=1."""
    path = shutil.which("chromium")
    if path:
        return path
    if os.environ.get("MMFUSION_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is not on PATH but MMFUSION_REQUIRE_BROWSER=1: `make browser` installs it")
    pytest.skip("chromium is not on PATH (`make browser` installs it)")


def dump_dom(page: Path, profile: Path) -> str:
    """The DOM of a local page after its scripts ran, in headless Chromium."""
    browser = chromium()
    profile.mkdir(parents=True, exist_ok=True)
    cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "</html>" in out.stdout, f"chromium failed on {page}: {out.stderr[-2000:]}"
    return out.stdout


def rows_of(dom: str, table_class: str) -> list[str]:
    """The data-href of each row that bootstrap-table built in the table of that class."""
    table = re.search(rf'<table\b[^>]*class="[^"]*\b{table_class}\b.*?</table>', dom, re.DOTALL)
    assert table, f"no table {table_class!r} in the page"
    return re.findall(r'<tr\b[^>]*data-href="([^"]+)"[^>]*data-index=', table.group(0))


@pytest.fixture(scope="module")
def data_docs(tmp_path_factory) -> Path:
    """Data Docs written by the validate stage's function over the tiny dataset."""
    tmp = tmp_path_factory.mktemp("offline_html")
    params = tiny_params(write_tiny_dataset(tmp / "userdata"))
    df = build_manifest_source(params.ingest, tmp / "raw")
    clean_df, _ = clean_dataset(df, tmp / "raw", tmp / "clean", CleanParams())
    validate_manifest(clean_df, tmp / "clean", tmp / "val", ValidateParams(min_per_class=3))
    return tmp / "val" / "data_docs"


def test_data_docs_load_nothing_from_the_network_and_every_local_file_exists(data_docs):
    pages = sorted(data_docs.rglob("*.html"))
    assert len(pages) == 5  # index, 2 suites, 2 validation results
    for page in pages:
        urls = loaded_urls(page.read_text(encoding="utf-8"))
        assert urls, page
        assert not [u for u in urls if re.match(r"(https?:)?//", u)], f"{page} loads from the network"
        missing = [u for u in urls if not u.startswith("data:") and not (page.parent / u.split("?")[0]).is_file()]
        assert not missing, f"{page.relative_to(data_docs)} loads files that are not there: {missing}"


def test_every_data_docs_page_is_built_by_its_vendored_scripts(data_docs, tmp_path):
    index = dump_dom(data_docs / "index.html", tmp_path / "profile")
    # the index's tables are empty HTML until bootstrap-table (vendored JS) fills them from the page's data
    results = rows_of(index, "ge-index-page-validation-results-table")
    assert len(results) == 2 and all(r.startswith("validations/") for r in results), results
    suites = rows_of(index, "ge-index-page-expectation_suites-table")
    assert sorted(suites) == ["expectations/clean_class_counts.html", "expectations/clean_samples.html"]
    assert all((data_docs / href).is_file() for href in results + suites)
    for page in [data_docs / href for href in results + suites]:
        dom = dump_dom(page, tmp_path / "profile")
        assert 'class="bootstrap-table' in dom, f"bootstrap-table did not run in {page.relative_to(data_docs)}"


def test_missing_package_or_unknown_cdn_url_is_a_clear_error(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    url = next(u for u, (package, _) in CDN_FILES.items() if package == "bootstrap-table")
    (docs / "index.html").write_text(f'<html><head><script src="{url}"></script></head></html>')
    with pytest.raises(MissingWebAsset, match="npm package 'bootstrap-table'.*make setup"):
        localize_data_docs(docs, modules=tmp_path / "empty_node_modules")
    (docs / "index.html").write_text('<html><link rel="stylesheet" href="https://cdn.example/x.css"></html>')
    with pytest.raises(MissingWebAsset, match=r"https://cdn\.example/x\.css.*CDN_FILES"):
        localize_data_docs(docs)


def test_dvc_plots_show_writes_an_offline_page(tmp_path):
    """A fresh project with our .dvc/config: `dvc plots show` loads no script, and a vega plot says it cannot draw."""
    project = tmp_path / "project"
    (project / "plots").mkdir(parents=True)
    dvc = Path(sys.executable).parent / "dvc"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=project, env=env, check=True)
    shutil.copy(REPO / ".dvc" / "config", project / ".dvc" / "config")
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    template = config["plots"]["html_template"].strip()
    shutil.copy(REPO / ".dvc" / template, project / ".dvc" / template)

    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(project / "plots" / "confusion.png")
    (project / "plots" / "loss.csv").write_text("step,loss\n0,1.0\n1,0.5\n")
    (project / "dvc.yaml").write_text("plots:\n  - plots/confusion.png\n  - plots/loss.csv\n")
    subprocess.run([dvc, "plots", "show", "-o", "out"], cwd=project, env=env, check=True, capture_output=True)
    page = project / "out" / "index.html"
    urls = loaded_urls(page.read_text(encoding="utf-8"))
    assert not [u for u in urls if re.match(r"(https?:)?//", u)], urls
    assert [u for u in urls if u.endswith(".png")] and all((page.parent / u).is_file() for u in urls)

    dom = dump_dom(page, tmp_path / "profile")
    assert "confusion.png" in dom
    assert "This plot needs vega, which this offline page does not load" in dom


def test_a_drift_report_of_a_window_without_text_renders_offline_with_its_notice(tmp_path):
    """The monitor's HTML report of a window where text stopped arriving: Evidently draws it offline (its JS is
    inlined) and the notice saying why text checks are missing sits at the top."""
    from mmfusion.monitoring.monitor import run_monitor
    from tests.drift_fixtures import monitor_params, synthetic, write_log, write_reference_dir

    write_reference_dir(tmp_path / "model", synthetic(300, seed=1), "v1")
    write_log(tmp_path / "log.sqlite", synthetic(80, seed=2, missing={"text": 1.0}), "v1")
    params = monitor_params(tmp_path, window={"by": "count", "size": 80}, plot_rows=16,
                            embeddings={"second_method": "", "bootstrap": "false"})  # fmt: skip
    (window,) = run_monitor(params, tmp_path)["windows"]
    assert window["verdict"] == "drift" and "missing_text" in window["flagged"]
    page = Path(window["report_html"])
    assert not [u for u in loaded_urls(page.read_text(encoding="utf-8")) if re.match(r"(https?:)?//", u)]
    dom = dump_dom(page, tmp_path / "profile")
    notice = re.search(r'<section id="mmfusion-notice".*?</section>', dom, re.DOTALL)
    assert notice and "text" in notice.group(0) and "EmbeddingsDrift(text)" in notice.group(0)
    assert "Row count in dataset (current)" in dom.replace(notice.group(0), "")  # drawn by Evidently's own JS


def test_the_docs_site_builds_and_renders_offline(tmp_path):
    """`make docs`'s site: every page loads only local files, and the nav is there once its scripts ran."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed (make setup)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    subprocess.run([mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=REPO, env=env, check=True)
    pages = sorted((tmp_path / "site").glob("*.html"))
    assert len(pages) >= 10
    for page in pages:
        remote = [u for u in loaded_urls(page.read_text(encoding="utf-8")) if re.match(r"(https?:)?//", u)]
        assert not remote, f"{page.name} loads {remote}"
    dom = dump_dom(tmp_path / "site" / "adding-a-modality.html", tmp_path / "profile")
    assert "Adding a modality" in dom and "Serving and operating" in dom and "md-nav" in dom
