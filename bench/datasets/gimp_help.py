"""Build a real image+text+label manifest from the GIMP user manual's figures (Debian `gimp-help-en`).

The GIMP 2.10 manual (HTML, as shipped by Debian bookworm in `gimp-help-en`, licence GFDL-1.2+,
"The GIMP Documentation Team") holds ~1,800 distinct raster figures: photos before/after a filter,
renders made by the Render filters, dialog, menu and tool screenshots, tutorial steps.
Each figure becomes one manifest row:

  image  the figure's PNG/JPEG, copied as is (images/<path as in the manual>)
  text   "<page title>: <figure title>. <caption>" (alt text when there is no figure title,
         else the paragraph just before the image, cut at 300 characters), section numbers
         ("5.2.", "Figure 17.54.") removed
  label  --label filter-category (default): the Filters chapter's section the page sits in
         (Rendering, Distort, Map, Artistic, Blur, ...: 14 classes, 616 rows from 2.10.34-2);
         --label chapter: the manual chapter (Filters, Menus, Tools, Dialogs, Combining
         Images, ...: 10 classes, 1,663 rows)
  group  the HTML page the figure is on (before/after pairs of one filter stay together)
  license  "GFDL-1.2-or-later; The GIMP Documentation Team (gimp-help 2.10.34)"

Rules (counted and printed): only block figures (div.mediaobject) count, inline icons and
navigation images do not; images smaller than --min-side px on a side are dropped as icons;
an image file used on several pages is kept once, under its first use, if all its uses have
the same label, and dropped as ambiguous otherwise ("Original image" shots reused by many
filters); byte-identical files under different names are kept once by the same rule; classes
with fewer than --min-class rows are dropped (named in the output). Images are copied unchanged
(the manual has PNG and JPEG only; the few SVGs are navigation icons, not figures).

Offline: needs only `apt-get download` against a Debian bookworm mirror (or --deb FILE.deb
already on disk); the .deb is unpacked in Python (no dpkg, no root). Point mmfusion at the
result with:

  ingest: {source: manifest, manifest: {path: OUT/manifest.csv, files_root: OUT,
           id_column: "", label_column: label, group_column: group}}

Examples:

  python bench/datasets/gimp_help.py
  python bench/datasets/gimp_help.py --label chapter --out /tmp/mmfusion-datasets/gimp_help_chapter
  python bench/datasets/gimp_help.py --deb ./gimp-help-en_2.10.34-2_all.deb --out /data/gimp
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import html
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path

PACKAGE = "gimp-help-en"
COPYRIGHT_PACKAGE = "gimp-help-common"  # gimp-help-en's /usr/share/doc entry is a symlink to it
HELP_DIR = "usr/share/gimp/2.0/help/en"
FIGURE_DIVS = {"figure", "informalfigure", "example", "informalexample"}
NUMBER = re.compile(r"^\s*(?:(?:Chapter|Part|Appendix|Figure|Example|Table)\s+)?[0-9A-Z]{0,3}(?:\.[0-9]+)*\.?\s+")


def clean(text: str) -> str:
    text = html.unescape(text).replace("\u201c", '"').replace("\u201d", '"')
    text = re.sub(r"\s+", " ", text).strip()
    text = text.replace('""', '"')
    return text


def strip_number(title: str) -> str:
    return NUMBER.sub("", clean(title), count=1).strip()


# ----------------------------------------------------------------------------- fetch + unpack


def fetch_deb(package: str, cache: Path, version: str | None) -> Path:
    """The newest cached .deb of `package` in `cache/debs`, or `apt-get download` it there."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    pattern = f"{package}_{version or '*'}_all.deb".replace(":", "%3a")
    found = sorted(debs.glob(pattern))
    if found:
        return found[-1]
    spec = f"{package}={version}" if version else package
    print(f"apt-get download {spec}  (into {debs})", flush=True)
    res = subprocess.run(["apt-get", "download", spec], cwd=debs, capture_output=True, text=True)
    found = sorted(debs.glob(pattern))
    if res.returncode != 0 or not found:
        sys.exit(
            f"apt-get download {spec} failed (rc {res.returncode}): {res.stderr.strip()[-400:]}\n"
            "Run `apt-get update` (Debian bookworm sources) or pass --deb FILE.deb."
        )
    return found[-1]


def ar_members(path: Path) -> dict[str, bytes]:
    """The members of a Debian .deb (an `ar` archive)."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        sys.exit(f"{path} is not a .deb (ar) archive")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return out


def unpack_deb(deb: Path, dest: Path) -> dict[str, str]:
    """Unpack the data member of `deb` into `dest` (once); returns the control fields."""
    members = ar_members(deb)
    control_name = next(n for n in members if n.startswith("control.tar"))
    with tarfile.open(fileobj=io.BytesIO(members[control_name])) as tar:
        control = tar.extractfile("./control").read().decode()
    fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", control, re.M))
    marker = dest / ".unpacked"
    if not marker.exists():
        data_name = next(n for n in members if n.startswith("data.tar"))
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tar:
            safe = [m for m in tar.getmembers() if (m.isfile() or m.isdir()) and ".." not in Path(m.name).parts]
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=safe, filter="data")
            else:
                tar.extractall(dest, members=safe)
        marker.write_text(deb.name)
    return fields


# ----------------------------------------------------------------------------- parse the manual


class PageParser(HTMLParser):
    """Figures (block images with their figure title, alt text and caption) of one manual page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.up = ""
        self.figures: list[dict] = []
        self._stack: list[tuple[str, str]] = []  # (tag, class) of open divs/p/span
        self._fig: dict | None = None
        self._fig_depth = -1
        self._in_title_tag = False
        self._in_fig_title = False
        self._in_caption = -1
        self._last_img: dict | None = None
        self._para: list[str] | None = None  # text of the <p> being read (not a title/caption)
        self.last_para = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "") or ""
        if tag == "title":
            self._in_title_tag = True
        elif tag == "link" and a.get("rel") == "up":
            self.up = (a.get("href") or "").split("#")[0]
        if tag in ("div", "p", "span"):
            self._stack.append((tag, cls))
            if tag == "div" and cls in FIGURE_DIVS and self._fig is None:
                self._fig = {"title": "", "images": []}
                self._fig_depth = len(self._stack)
            elif tag == "p" and cls == "title" and self._fig is not None:
                self._in_fig_title = True
            elif tag == "div" and cls == "caption":
                self._in_caption = len(self._stack)
            elif tag == "p" and self._in_caption < 0 and not self._in_fig_title:
                self._para = []
        elif tag == "img":
            src = a.get("src") or ""
            in_block = any(t == "div" and c == "mediaobject" for t, c in self._stack)
            if src.startswith("images/") and in_block:
                img = {"src": src, "alt": clean(a.get("alt") or ""), "caption": "", "context": self.last_para}
                self._last_img = img
                if self._fig is not None:
                    self._fig["images"].append(img)
                else:
                    self.figures.append({"title": "", "images": [img]})

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title_tag = False
        if tag in ("div", "p", "span") and self._stack:
            # pop to the matching tag (tolerates sloppy nesting)
            while self._stack:
                t, c = self._stack.pop()
                if t == "p" and c == "title":
                    self._in_fig_title = False
                elif t == "p" and self._para is not None:
                    self.last_para = clean("".join(self._para))[:300]
                    self._para = None
                if self._in_caption > len(self._stack):
                    self._in_caption = -1
                if self._fig is not None and len(self._stack) < self._fig_depth:
                    self.figures.append(self._fig)
                    self._fig, self._fig_depth = None, -1
                if t == tag:
                    break

    def handle_data(self, data):
        if self._in_title_tag:
            self.title += data
        elif self._in_fig_title and self._fig is not None:
            self._fig["title"] += data
        elif self._in_caption > 0 and self._last_img is not None:
            self._last_img["caption"] += data
        elif self._para is not None:
            self._para.append(data)


def parse_manual(root: Path) -> tuple[dict[str, PageParser], dict[str, list[str]]]:
    pages = {}
    for f in sorted(root.glob("*.html")):
        p = PageParser()
        p.feed(f.read_text(encoding="utf-8", errors="replace"))
        p.close()
        pages[f.name] = p
    chains = {}
    for name in pages:
        chain = [name]
        while pages.get(chain[-1]) and pages[chain[-1]].up and pages[chain[-1]].up not in chain and len(chain) < 20:
            chain.append(pages[chain[-1]].up)
        chains[name] = [clean(pages[c].title) if c in pages else c for c in reversed(chain)]
    return pages, chains


def label_of(chain: list[str], mode: str) -> str | None:
    """chain: page titles (numbers kept) from the manual's home page down to the page itself."""
    if mode == "chapter":
        # home > part > "Chapter N. ..." > ...; the preface, glossary and appendices have no chapter
        return strip_number(chain[2]) if len(chain) > 2 and chain[2].startswith("Chapter ") else None
    if len(chain) > 3 and strip_number(chain[2]) == "Filters":
        section = strip_number(chain[3])
        if section in ("Introduction", "Common Features"):
            return None
        return re.sub(r"\s+Filters?$", "", section)
    return None


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/datasets/gimp_help.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cache", type=Path, default=Path("/tmp/mmfusion-datasets"), help="download/unpack cache (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default CACHE/gimp_help, or CACHE/gimp_help_chapter with --label chapter); replaced if an earlier run wrote it")
    ap.add_argument("--label", choices=("filter-category", "chapter"), default="filter-category", help="what the label is (default %(default)s)")
    ap.add_argument("--deb", type=Path, default=None, help=f"use this {PACKAGE} .deb instead of apt-get download")
    ap.add_argument("--version", default=None, help=f"Debian version of {PACKAGE} to download (default: apt's candidate, 2.10.34-2 on bookworm)")
    ap.add_argument("--min-class", type=int, default=10, help="drop classes with fewer rows (default %(default)s)")
    ap.add_argument("--min-side", type=int, default=48, help="drop images with a side shorter than this, in px (icons; default %(default)s)")
    args = ap.parse_args(argv)

    from PIL import Image  # the project's venv has Pillow

    cache: Path = args.cache
    out: Path = args.out or cache / ("gimp_help" if args.label == "filter-category" else "gimp_help_chapter")
    deb = args.deb or fetch_deb(PACKAGE, cache, args.version)
    fields = unpack_deb(deb, cache / "extract" / deb.stem)
    version = fields.get("Version", "?")
    root = cache / "extract" / deb.stem / HELP_DIR
    copyright_text = ""
    try:
        cdeb = fetch_deb(COPYRIGHT_PACKAGE, cache, None) if args.deb is None else None
        if cdeb is not None:
            unpack_deb(cdeb, cache / "extract" / cdeb.stem)
            copyright_text = (cache / "extract" / cdeb.stem / "usr/share/doc" / COPYRIGHT_PACKAGE / "copyright").read_text()
    except SystemExit as e:  # the licence file is a courtesy; the data does not need it
        print(f"note: could not fetch {COPYRIGHT_PACKAGE} for its copyright file: {e}")
    licence = f"GFDL-1.2-or-later; The GIMP Documentation Team (Debian {PACKAGE} {version})"

    pages, chains = parse_manual(root)
    dropped = collections.Counter()
    uses: dict[str, list[dict]] = collections.defaultdict(list)  # image src -> uses in page order
    # pages in a stable order: by their title chain from the home page, then file name
    for name in sorted(pages, key=lambda n: ([strip_number(t) for t in chains[n]], n)):
        page = pages[name]
        label = label_of(chains[name], args.label)
        page_title = strip_number(page.title)
        for fig in page.figures:
            fig_title = strip_number(fig["title"])
            for img in fig["images"]:
                # no figure title, alt text or caption: the paragraph just before the image
                head = fig_title or img["alt"] or (img["context"] if not img["caption"] else "")
                parts = [page_title + ":" if head or img["caption"] else page_title]
                if head:
                    parts.append(head if head.endswith((".", "!", "?", ":")) or not img["caption"] else head + ".")
                if img["caption"] and clean(img["caption"]) != head:
                    parts.append(clean(img["caption"]))
                text = clean(" ".join(parts))
                uses[img["src"]].append({"page": name, "label": label, "text": text})

    rows, by_hash = [], {}
    seen_label: dict[str, str | None] = {}
    for src, us in uses.items():
        labels = {u["label"] for u in us}
        path = root / src
        if not path.is_file():
            dropped["missing file"] += 1
            continue
        if None in labels and len(labels) == 1:
            dropped[f"outside the {args.label} labels (preface, appendices, glossary; other chapters)"] += 1
            continue
        labels.discard(None)
        if len(labels) > 1:
            dropped["one image used under several labels (ambiguous)"] += 1
            continue
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception:
            dropped["undecodable image"] += 1
            continue
        if min(w, h) < args.min_side:
            dropped[f"smaller than {args.min_side}px on a side (icon)"] += 1
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        label = labels.pop()
        first = next(u for u in us if u["label"] == label)
        if digest in by_hash:
            other = by_hash[digest]
            if other is not None and other["label"] != label:
                other["drop"] = True  # same pixels under two labels: drop both
                dropped["identical image file under several labels (ambiguous)"] += 2
                by_hash[digest] = None
            elif other is None:
                dropped["identical image file under several labels (ambiguous)"] += 1
            else:
                dropped["identical image file already kept (duplicate)"] += 1
            continue
        row = {"image": src, "text": first["text"], "label": label, "group": first["page"].removesuffix(".html"), "license": licence, "size": f"{w}x{h}"}
        by_hash[digest] = row
        rows.append(row)
    rows = [r for r in rows if not r.get("drop")]
    counts = collections.Counter(r["label"] for r in rows)
    small = {k: v for k, v in counts.items() if v < args.min_class}
    for k, v in small.items():
        dropped[f"class {k!r} has {v} < {args.min_class} rows (class dropped)"] += v
    rows = [r for r in rows if r["label"] not in small]
    counts = collections.Counter(r["label"] for r in rows)

    if out.exists():
        if any(out.iterdir()) and not (out / "summary.json").is_file():
            sys.exit(f"--out {out} exists and was not written by this script (no summary.json); not replacing it")
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    for r in rows:
        dst = out / r["image"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / r["image"], dst)
    with (out / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "text", "label", "group", "license"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if copyright_text:
        (out / "COPYRIGHT").write_text(copyright_text)
    summary = {
        "source": f"Debian {PACKAGE} {version} (GIMP 2.10 user manual, English HTML)",
        "deb": deb.name,
        "license": licence,
        "label": args.label,
        "rows": len(rows),
        "classes": len(counts),
        "groups": len({r["group"] for r in rows}),
        "per_class": dict(counts.most_common()),
        "dropped": dict(dropped),
        "figure_uses_seen": sum(len(u) for u in uses.values()),
        "distinct_images_seen": len(uses),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"{summary['source']}  licence: {licence}")
    print(f"label = {args.label}: {len(rows)} rows, {len(counts)} classes, {summary['groups']} groups (pages)")
    for k, v in counts.most_common():
        print(f"  {v:5d}  {k}")
    print(f"seen: {summary['figure_uses_seen']} figure uses of {summary['distinct_images_seen']} distinct image files; dropped:")
    for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]):
        print(f"  {v:5d}  {k}")
    print(f"wrote {out / 'manifest.csv'} (+ images/, summary.json{', COPYRIGHT' if copyright_text else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
