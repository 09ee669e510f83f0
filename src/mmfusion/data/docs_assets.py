"""Make Great Expectations Data Docs work offline: copy their front-end files next to the pages, rewrite CDN URLs.

GX 1.24's page templates load Bootstrap, jQuery, bootstrap-table, font-awesome, vega... from CDNs, and the index
table is built by that JavaScript: offline, the index is empty and every page unstyled. The same files, at the
versions GX names, are npm packages pinned in package.json / package-lock.json, which `make setup` installs into
`.venv/web/node_modules` (MMFUSION_NODE_MODULES overrides where). Any remote script, style, image or CSS url()
that this module does not know is an error, so a GX upgrade that adds one cannot ship a silently broken page.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from mmfusion.errors import UserError

# CDN URL in GX's templates (render/view/templates/*.j2) -> (npm package, file in it). The versions are GX's
# (bootstrap 4.3.1, jquery 3.7.1, bootstrap-table 1.19.1, ...), except popper.js 1.16.1 for GX's 1.12.9: bootstrap
# 4.3.1's own peer range (^1.14.7), same API. GX mixes bootstrap-table 1.19.0 and 1.19.1 URLs: 1.19.1 serves both.
CDN_FILES: dict[str, tuple[str, str]] = {
    "https://cdn.jsdelivr.net/npm/vega@5": ("vega", "build/vega.min.js"),
    "https://cdn.jsdelivr.net/npm/vega-lite@5": ("vega-lite", "build/vega-lite.min.js"),
    "https://cdn.jsdelivr.net/npm/vega-embed@6": ("vega-embed", "build/vega-embed.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": (
        "@fortawesome/fontawesome-free", "css/all.min.css"),
    "https://code.jquery.com/jquery-3.7.1.min.js": ("jquery", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": (
        "popper.js", "dist/umd/popper.min.js"),
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": (
        "bootstrap", "dist/js/bootstrap.min.js"),
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": (
        "bootstrap", "dist/css/bootstrap.min.css"),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": (
        "bootstrap-table", "dist/bootstrap-table.min.js"),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": (
        "bootstrap-table", "dist/bootstrap-table.min.css"),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js": (
        "bootstrap-table", "dist/extensions/filter-control/bootstrap-table-filter-control.min.js"),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css": (
        "bootstrap-table", "dist/extensions/filter-control/bootstrap-table-filter-control.css"),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css": (
        "bootstrap-table", "dist/extensions/filter-control/bootstrap-table-filter-control.min.css"),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js": (
        "bootstrap-datepicker", "dist/js/bootstrap-datepicker.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css": (
        "bootstrap-datepicker", "dist/css/bootstrap-datepicker.min.css"),
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css": (
        "@forevolve/bootstrap-dark", "dist/css/bootstrap-prefers-dark.css"),
}
# GX's navbar logo comes from its S3 bucket, but the SiteBuilder copies the same image into static/images. It ships
# no dark-mode logo (full_logo_dark.png): the light one beats an empty navbar.
GX_IMAGES_URL = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
GX_IMAGES = {"logo-long.png": "logo-long.png", "full_logo_dark.png": "logo-long.png"}
VENDOR_DIR = "static/vendor"

# What a page loads: <script src>, <link href> (stylesheet, icon), <img src>, and url(...) in <style> blocks. Links
# (<a href>) are left alone: following one is the reader's choice, not part of rendering the page. GX HTML-escapes
# the data it shows, so these patterns only meet markup GX wrote, never a text value that merely contains a URL.
_TAG = re.compile(r"<(?:script|link|img)\b[^>]*>", re.IGNORECASE)
_STYLE = re.compile(r"<style\b[^>]*>.*?</style>", re.IGNORECASE | re.DOTALL)
_TAG_URL = re.compile(r"""\b(src|href)\s*=\s*(["'])(https?://[^"']*)\2""", re.IGNORECASE)
_CSS_URL = re.compile(r"""url\(\s*(["']?)(https?://[^"')\s]*)\1\s*\)""", re.IGNORECASE)
# file:// pages cannot pass a CORS check, so a `crossorigin` script would be blocked; SRI only applies to the CDN copy.
_CORS_ATTRS = re.compile(r"""\s+(?:integrity|crossorigin)\s*=\s*(["'])[^"']*\1""", re.IGNORECASE)
_CSS_REF = re.compile(r"""url\(\s*(["']?)([^"')]+)\1\s*\)""")


class MissingWebAsset(UserError):
    """A front-end file a page needs is not installed, or a page loads a remote file this module does not know."""


def node_modules() -> Path:
    """Where `make setup` installs the npm packages of package.json (MMFUSION_NODE_MODULES overrides)."""
    return Path(os.environ.get("MMFUSION_NODE_MODULES") or Path(sys.prefix) / "web" / "node_modules")


def remote_refs(html: str) -> list[str]:
    """Every http(s) URL a page loads as a script, stylesheet, icon, image or CSS url()."""
    refs = [m.group(3) for tag in _TAG.finditer(html) for m in _TAG_URL.finditer(tag.group(0))]
    return refs + [m.group(2) for style in _STYLE.finditer(html) for m in _CSS_URL.finditer(style.group(0))]


def localize_data_docs(docs_dir: Path, modules: Path | None = None) -> list[Path]:
    """Copy the files every Data Docs page loads into `docs_dir/static/vendor` and point the pages at them.

    Returns the rewritten pages. Raises MissingWebAsset for a file not installed or a remote URL not known.
    """
    modules = modules or node_modules()
    copied: dict[str, Path] = {}
    changed = []
    for page in sorted(docs_dir.rglob("*.html")):
        html = page.read_text(encoding="utf-8")

        def local(url: str) -> str:
            if url not in copied:
                copied[url] = _vendor(url, docs_dir, modules, page)
            return Path(os.path.relpath(copied[url], page.parent)).as_posix()

        def fix_tag(m: re.Match) -> str:
            tag = m.group(0)
            if not _TAG_URL.search(tag):
                return tag
            tag = _TAG_URL.sub(lambda u: f"{u.group(1)}={u.group(2)}{local(u.group(3))}{u.group(2)}", tag)
            return _CORS_ATTRS.sub("", tag)

        def fix_style(m: re.Match) -> str:
            return _CSS_URL.sub(lambda u: f"url({u.group(1)}{local(u.group(2))}{u.group(1)})", m.group(0))

        new = _STYLE.sub(fix_style, _TAG.sub(fix_tag, html))
        if new != html:
            page.write_text(new, encoding="utf-8")
            changed.append(page)
    return changed


def _vendor(url: str, docs_dir: Path, modules: Path, page: Path) -> Path:
    """The local copy of a remote URL, copied in (with the files its CSS refers to) on first use."""
    base = url.split("?", 1)[0].split("#", 1)[0]
    if base.startswith(GX_IMAGES_URL) and base[len(GX_IMAGES_URL):] in GX_IMAGES:
        image = docs_dir / "static" / "images" / GX_IMAGES[base[len(GX_IMAGES_URL):]]
        if not image.is_file():
            raise MissingWebAsset(f"{image} is missing: the great_expectations package's SiteBuilder copies it there")
        return image
    if base not in CDN_FILES:
        raise MissingWebAsset(
            f"{page} loads {url}, which has no local copy: add it to CDN_FILES in {Path(__file__).name} "
            f"(and its npm package to package.json)"
        )
    package, file = CDN_FILES[base]
    return _copy(package, file, docs_dir / VENDOR_DIR, modules)


def _copy(package: str, file: str, vendor: Path, modules: Path) -> Path:
    """Copy one file of an npm package to vendor/<package>/<file>; for CSS, the fonts/images it refers to too."""
    src = modules / package / file
    dest = vendor / package / file
    if not src.is_file():
        raise MissingWebAsset(
            f"{src} is missing: the npm package {package!r} of package.json is not installed (run `make setup`), "
            f"or not at the version CDN_FILES in {Path(__file__).name} expects"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    if file.endswith(".css"):
        for m in _CSS_REF.finditer(src.read_text(encoding="utf-8")):
            ref = m.group(2).split("?", 1)[0].split("#", 1)[0]
            if ref and not re.match(r"^(?:[a-z]+:|/)", ref, re.IGNORECASE):  # data:, http:, absolute: not files
                _copy(package, os.path.normpath(Path(file).parent / ref), vendor, modules)
    return dest
