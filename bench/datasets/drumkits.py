"""Build a real audio+text+label manifest from Hydrogen's drum kits (Debian `hydrogen-drumkits`).

The Debian package `hydrogen-drumkits` (2017.09.19~dfsg-1, arch all, the DFSG-free kits of the
Hydrogen drum machine's official list) ships 14 kits under /usr/share/hydrogen/data/drumkits/<Kit>/:
a `drumkit.xml` and the kit's one-shot samples (WAV, FLAC, AIFF). The XML names each instrument
(`<instrument><name>`) and its sample files (`<layer><filename>`, velocity layers, or an older
kit's `<filename>`), and describes the kit (`<info>`, often Qt rich-text HTML), its `<author>` and
its `<license>`. Each sample file of a drum instrument becomes one manifest row:

  id       <kit>-<file stem>, file-name safe (mmfusion derives its own ids: id_column "")
  audio    the sample, copied unchanged to audio/<kit folder>/<file name as in the kit>
  text     the kit's description: `<info>` stripped of HTML, then "Author: <author>." The same
           text for every clip of a kit, and never the instrument's name (that would leak the label):
           the text tells acoustic from synthesized kits, the audio tells a kick from a hi-hat
  label    kick | snare | tom | hihat | cymbal, from the XML instrument name by a table of patterns
           (CLASSES below); never from the file name ("86335__zgump__tom-0105.wav" is Audiophob's Kick)
  group    the kit (its folder name): a kit's clips never straddle splits
  license  the kit's `<license>` as its drumkit.xml states it ("unstated in drumkit.xml" if empty),
           then the licence and holder Debian's copyright file gives for that kit

Rules (counted and printed, with the instrument names behind each count): instruments whose name
matches no class are dropped, as other percussion or effects (claps, cowbells, side sticks,
congas, tambourines, djembes, zaps, ...) or as unclear names (numbered empty slots "17".."32",
"Sample: beats_01-10.flac", "a4 -", "Drum 1"); a name that matches two classes is dropped as
ambiguous; a missing or unreadable sample file is dropped; a file two instruments of one kit
share is kept once (dropped if their classes differ), byte-identical files likewise; classes with
fewer than --min-class rows are dropped. On 2017.09.19~dfsg-1 that leaves 465 clips of 12
kits. The pipeline's own `clean` then drops clips shorter than `modalities.audio.min_seconds`
(0.2 s: some closed hi-hats, electronic snares) and reports them.

Licences differ per kit (GPL-2, GPL-2+, CC-BY-SA-3.0, CC-BY-3.0, CC0; some kits' XML states none,
Debian's copyright file does): every row carries its kit's; the package's copyright file is copied
to OUT/COPYRIGHT. Offline: needs only `apt-get download hydrogen-drumkits` against a Debian
mirror (or --deb FILE.deb already on disk); the .deb is unpacked in Python (no dpkg, no root),
with bench/datasets/gimp_help.py's helpers. Point mmfusion at the result with:

  ingest: {source: manifest, manifest: {path: OUT/manifest.csv, files_root: OUT,
           id_column: "", label_column: label, group_column: group}}
  featurize: {encoders: {audio: resemblyzer, text: minilm_l6}}
  train: {strategies: [audio_only, text_only, concat, weighted_sum, gated, attention,
                       cross_attention, late, late_stacking, ensemble]}   # no image_only: no images

Examples:

  python bench/datasets/drumkits.py
  python bench/datasets/drumkits.py --deb ./hydrogen-drumkits_2017.09.19~dfsg-1_all.deb --out /data/drums
  python bench/real_data.py --dataset drumkits      # the whole pipeline on it
"""

from __future__ import annotations

import argparse
import collections
import csv
import fnmatch
import hashlib
import html
import json
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gimp_help import fetch_deb, unpack_deb  # noqa: E402  (apt-get download + unpack in Python)

PACKAGE = "hydrogen-drumkits"
KITS_DIR = "usr/share/hydrogen/data/drumkits"
COPYRIGHT = f"usr/share/doc/{PACKAGE}/copyright"
UNSTATED = "unstated in drumkit.xml"

# instrument name (lower case) -> class. Every pattern is tried: a name matching two is ambiguous.
CLASSES: dict[str, re.Pattern] = {
    "kick": re.compile(r"\bkick|\bbass ?drum|\bbd\b"),
    "snare": re.compile(r"\bsnare"),
    "tom": re.compile(r"\btom"),
    "hihat": re.compile(r"\bhi[- ]?hat|\bhihat|\bhat\b|\b[oc]?hh\b"),
    "cymbal": re.compile(r"\bcrash|\bride|\bchina|\bsplash|\bcymbal"),
}
# what is not a kit drum or cymbal (named so the dropped counts say what was left out)
OTHER_PERCUSSION = re.compile(
    r"clap|cowbell|bell|stick|rim|conga|bongo|cajon|clave|snap|maraca|tambourine|agogo|waterglass|woodblock"
    r"|djembe|dun|kenkeni|sangban|whistle|click|\bfx\b|zap"
)
DROP_OTHER = "instrument is other percussion or an effect (clap, cowbell, stick, tambourine, djembe, zap, ...)"
DROP_UNCLEAR = "instrument name names no drum class (numbered slot, 'Sample: ...', empty, 'Drum 1')"
DROP_AMBIGUOUS = "instrument name matches several classes (ambiguous)"


def classify(name: str) -> tuple[str | None, str | None]:
    """(label, None) for a drum instrument's name, else (None, the reason it is dropped)."""
    low = name.lower()
    hits = [label for label, pattern in CLASSES.items() if pattern.search(low)]
    if len(hits) == 1:
        return hits[0], None
    if hits:
        return None, DROP_AMBIGUOUS
    return None, DROP_OTHER if OTHER_PERCUSSION.search(low) else DROP_UNCLEAR


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def html_to_text(info: str) -> str:
    """A kit's `<info>`: Qt rich text (a whole HTML document) or plain text -> one line of plain text."""
    if "<" not in info:
        return clean(info)
    info = re.sub(r"(?is)<!DOCTYPE[^>]*>|<head\b.*?</head>|<style\b.*?</style>", " ", info)
    info = re.sub(r"(?i)<br\s*/?>|</p>", "\n", info)
    return clean(re.sub(r"<[^>]+>", " ", info))


def kit_text(info: str, author: str) -> str:
    """The text of every clip of a kit: its description, then its author."""
    description = html_to_text(info)
    if description and not description.endswith((".", "!", "?")):
        description += "."
    author = clean(author)
    return " ".join(p for p in (description, f"Author: {author}." if author else "") if p)


# ----------------------------------------------------------------------------- parse


def parse_kit(xml_path: Path) -> dict:
    """name, author, license, info and [(instrument name, [sample file names])] of one drumkit.xml."""
    root = ET.parse(xml_path).getroot()
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""

    def text(elem: ET.Element, tag: str) -> str:
        return (elem.findtext(ns + tag) or "").strip()

    instruments = []
    for inst in root.iter(ns + "instrument"):
        files = [text(layer, "filename") for layer in inst.iter(ns + "layer")]
        files += [text(inst, "filename")]  # kits of Hydrogen < 0.9.4: one file, no layers
        instruments.append((clean(text(inst, "name")), [f for f in dict.fromkeys(files) if f]))
    return {"name": text(root, "name"), "author": text(root, "author"), "license": clean(text(root, "license")),
            "info": text(root, "info"), "instruments": instruments}  # fmt: skip


def debian_licences(copyright_text: str) -> list[tuple[str, str]]:
    """[(kit file pattern, "<licence>, <holder>")] of the `Files: drumkits/*.h2drumkit` paragraphs
    of a machine-readable (DEP-5) debian/copyright."""
    out = []
    for para in re.split(r"\n\s*\n", copyright_text):
        fields, key = {}, None
        for line in para.splitlines():
            m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
            if m:
                key = m.group(1)
                fields[key] = m.group(2).strip()
            elif key and line.startswith(" "):
                fields[key] = (fields[key] + "\n" + line.strip()).strip()
        if "Files" not in fields or "License" not in fields:
            continue
        licence = fields["License"].splitlines()[0].strip()
        holder = clean(fields.get("Copyright", ""))
        entry = f"{licence}, {holder}" if holder else licence
        for pattern in fields["Files"].split():
            if pattern.startswith("drumkits/") and pattern.endswith(".h2drumkit"):
                out.append((pattern.removeprefix("drumkits/").removesuffix(".h2drumkit"), entry))
    return out


def debian_licence(kit: str, xml_name: str, licences: list[tuple[str, str]]) -> str:
    """The Debian copyright entry of a kit folder (`circAfrique v4` is `circAfrique.h2drumkit`)."""
    for pattern, licence in licences:
        for name in (kit, xml_name):
            if name and (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + " *")):
                return licence
    return ""


def collect(root: Path, min_class: int = 10, version: str = "?") -> tuple[list[dict], dict]:
    """The manifest rows and the summary from an unpacked `hydrogen-drumkits` tree at `root` (the
    folder holding usr/share/hydrogen/...). Reads only; `write` copies the files."""
    kits_dir = root / KITS_DIR
    copyright_path = root / COPYRIGHT
    copyright_text = copyright_path.read_text(encoding="utf-8", errors="replace") if copyright_path.is_file() else ""
    licences = debian_licences(copyright_text)
    try:
        import soundfile as sf  # the project's venv has it (the audio modality reads with it)
    except ImportError:  # pragma: no cover - then only the header check is skipped
        sf = None

    dropped: collections.Counter = collections.Counter()
    dropped_names: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    kits: dict[str, dict] = {}
    rows: list[dict] = []
    by_file: dict[tuple[str, str], dict] = {}  # (kit, file) -> its row
    by_hash: dict[str, dict | None] = {}

    def drop(reason: str, name: str, n: int = 1) -> None:
        dropped[reason] += n
        dropped_names[reason][name] += n

    for xml_path in sorted(kits_dir.glob("*/drumkit.xml")):
        kit = xml_path.parent.name
        try:
            info = parse_kit(xml_path)
        except ET.ParseError as exc:
            drop("drumkit.xml does not parse (whole kit)", f"{kit}: {exc}")
            continue
        licence = info["license"] or UNSTATED
        deb = debian_licence(kit, info["name"], licences)
        licence_text = f"{licence} (drumkit.xml); {deb} (Debian copyright)" if deb else f"{licence} (drumkit.xml)"
        text = kit_text(info["info"], info["author"])
        kits[kit] = {"name": info["name"], "author": clean(info["author"]), "license_xml": info["license"] or UNSTATED,
                     "license_debian": deb, "text": text, "instruments": len(info["instruments"])}  # fmt: skip
        for name, files in info["instruments"]:
            label, reason = classify(name)
            if label is None:
                drop(reason, name or "(empty)", len(files))
                continue
            for rel in files:
                rel_path = Path(rel.replace("\\", "/"))
                if rel_path.is_absolute() or ".." in rel_path.parts:
                    rel_path = Path(rel_path.name)  # a path from the author's machine: the kit keeps its files flat
                path = xml_path.parent / rel_path
                if not path.is_file():
                    drop("sample file missing from the kit folder", f"{kit}: {rel}")
                    continue
                key = (kit, rel_path.as_posix())
                if key in by_file:
                    other = by_file[key]
                    if other["label"] != label and not other.get("drop"):
                        other["drop"] = True
                        drop("one file used by instruments of different classes (ambiguous)", f"{kit}: {rel}", 2)
                    elif other["label"] == label:
                        drop("file already kept under another instrument of the same class (duplicate)", f"{kit}: {name}")
                    continue
                if sf is not None:
                    try:
                        sf.info(str(path))
                    except Exception:  # noqa: BLE001 - libsndfile says why; the row is dropped either way
                        drop("sample file libsndfile cannot read", f"{kit}: {rel}")
                        continue
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                row = {"id": re.sub(r"[^A-Za-z0-9._-]+", "_", f"{kit}-{rel_path.with_suffix('').as_posix()}"),
                       "audio": f"audio/{kit}/{rel_path.as_posix()}", "text": text, "label": label, "group": kit,
                       "license": licence_text, "instrument": name, "source": str(path), "sha256": digest}  # fmt: skip
                by_file[key] = row
                if digest in by_hash:
                    other = by_hash[digest]
                    if other is not None and other["label"] != label:
                        other["drop"] = True
                        by_hash[digest] = None
                        drop("byte-identical file under different classes (ambiguous)", f"{kit}: {rel}", 2)
                    elif other is None:
                        drop("byte-identical file under different classes (ambiguous)", f"{kit}: {rel}")
                    else:
                        drop("byte-identical file already kept (duplicate)", f"{kit}: {rel}")
                    continue
                by_hash[digest] = row
                rows.append(row)
    rows = [r for r in rows if not r.get("drop")]
    counts = collections.Counter(r["label"] for r in rows)
    for label, n in counts.items():
        if n < min_class:
            drop(f"class has fewer than {min_class} rows (class dropped)", label, n)
    rows = [r for r in rows if counts[r["label"]] >= min_class]
    ids = collections.Counter(r["id"] for r in rows)
    for r in rows:  # two files of one kit whose names differ only in unsafe characters
        if ids[r["id"]] > 1:
            r["id"] += "-" + r["sha256"][:8]

    counts = collections.Counter(r["label"] for r in rows)
    per_kit = {kit: dict(collections.Counter(r["label"] for r in rows if r["group"] == kit)) for kit in kits}
    summary = {
        "source": f"Debian {PACKAGE} {version} (Hydrogen drum kits)",
        "license": "per kit (the manifest's license column; OUT/COPYRIGHT is the package's copyright file)",
        "rows": len(rows),
        "classes": len(counts),
        "groups": len({r["group"] for r in rows}),
        "per_class": dict(counts.most_common()),
        "per_kit": {kit: c for kit, c in per_kit.items() if c},
        "kits": kits,
        "dropped": dict(dropped),
        "dropped_instruments": {reason: dict(c.most_common()) for reason, c in dropped_names.items()},
        "instruments_seen": sum(k["instruments"] for k in kits.values()),
    }
    return rows, summary


# ----------------------------------------------------------------------------- write


def write(out: Path, rows: list[dict], summary: dict, copyright_path: Path | None = None) -> None:
    """OUT/manifest.csv, the clips under OUT/audio/, provenance.csv (the instrument behind each row),
    summary.json and COPYRIGHT. Replaces an OUT this script wrote before, nothing else."""
    if out.exists():
        if any(out.iterdir()) and not (out / "summary.json").is_file():
            sys.exit(f"--out {out} exists and was not written by this script (no summary.json); not replacing it")
        shutil.rmtree(out)
    (out / "audio").mkdir(parents=True)
    for r in rows:
        dst = out / r["audio"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r["source"], dst)
    with (out / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "audio", "text", "label", "group", "license"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with (out / "provenance.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "group", "instrument", "label", "audio", "sha256"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if copyright_path is not None and copyright_path.is_file():
        shutil.copyfile(copyright_path, out / "COPYRIGHT")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def build(root: Path, out: Path, min_class: int = 10, version: str = "?") -> dict:
    """collect + write: the manifest of the unpacked package at `root` into `out`; returns the summary."""
    rows, summary = collect(root, min_class, version)
    write(out, rows, summary, root / COPYRIGHT)
    return summary


def report(summary: dict, out: Path) -> None:
    print(summary["source"])
    print(f"{summary['rows']} rows, {summary['classes']} classes, {summary['groups']} groups (kits) "
          f"from {summary['instruments_seen']} instruments of {len(summary['kits'])} kits")  # fmt: skip
    for label, n in summary["per_class"].items():
        print(f"  {n:5d}  {label}")
    labels = list(summary["per_class"])
    print("per kit: " + "  ".join(labels) + "  | licence (drumkit.xml)")
    for kit, info in summary["kits"].items():
        c = summary["per_kit"].get(kit, {})
        print(f"  {kit:24s} " + " ".join(f"{c.get(label, 0):>{len(label)}d}" for label in labels)
              + f"  | {info['license_xml'][:60]}")  # fmt: skip
    print("dropped:")
    for reason, n in sorted(summary["dropped"].items(), key=lambda kv: -kv[1]):
        names = summary["dropped_instruments"].get(reason, {})
        shown = ", ".join(f"{k} ({v})" if v > 1 else k for k, v in list(names.items())[:12])
        more = f", ... {len(names) - 12} more" if len(names) > 12 else ""
        print(f"  {n:5d}  {reason}: {shown}{more}")
    print(f"wrote {out / 'manifest.csv'} (+ audio/, provenance.csv, summary.json, COPYRIGHT)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/datasets/drumkits.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cache", type=Path, default=Path("/tmp/mmfusion-datasets"), help="download/unpack cache (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default CACHE/drumkits); replaced if an earlier run wrote it")
    ap.add_argument("--deb", type=Path, default=None, help=f"use this {PACKAGE} .deb instead of apt-get download")
    ap.add_argument("--version", default=None, help=f"Debian version of {PACKAGE} to download (default: apt's candidate, 2017.09.19~dfsg-1)")
    ap.add_argument("--min-class", type=int, default=10, help="drop classes with fewer rows (default %(default)s)")
    args = ap.parse_args(argv)

    cache: Path = args.cache
    out: Path = args.out or cache / "drumkits"
    deb = args.deb or fetch_deb(PACKAGE, cache, args.version)
    root = cache / "extract" / deb.stem
    fields = unpack_deb(deb, root)
    rows, summary = collect(root, args.min_class, fields.get("Version", "?"))
    summary["deb"] = deb.name
    write(out, rows, summary, root / COPYRIGHT)
    report(summary, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
