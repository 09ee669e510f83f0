"""bench/datasets/drumkits.py: Hydrogen drum kits -> audio, text, label, group, licence (on tiny hand-made kits)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("drumkits", REPO / "bench" / "datasets" / "drumkits.py")
drumkits = importlib.util.module_from_spec(spec)
spec.loader.exec_module(drumkits)

NS = 'xmlns="http://www.hydrogen-music.org/drumkit"'
QT_INFO = (
    '&lt;!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.0//EN"&gt;&lt;html&gt;&lt;head&gt;&lt;style type="text/css"&gt;'
    "p, li { white-space: pre-wrap; }&lt;/style&gt;&lt;/head&gt;&lt;body&gt;&lt;p style=\"margin-top:0px;\"&gt;"
    "A sampled acoustic &amp;amp; wooden kit.&lt;/p&gt;&lt;/body&gt;&lt;/html&gt;"
)


def kit_xml(name: str, author: str, licence: str, info: str, instruments: list[tuple[str, list[str]]],
            ns: str = NS, layers: bool = True) -> str:  # fmt: skip
    def inst(i: int, iname: str, files: list[str]) -> str:
        if layers:
            body = "".join(f"<layer><filename>{f}</filename><min>0</min><max>1</max></layer>" for f in files)
        else:  # an old kit: one <filename> per instrument
            body = f"<filename>{files[0]}</filename>"
        return f"<instrument><id>{i}</id><name>{iname}</name><volume>1</volume>{body}</instrument>"

    insts = "".join(inst(i, n, f) for i, (n, f) in enumerate(instruments))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<drumkit_info {ns}><name>{name}</name><author>{author}</author>'
            f"<info>{info}</info><license>{licence}</license><instrumentList>{insts}</instrumentList></drumkit_info>")  # fmt: skip


def tone(path: Path, freq: float, seconds: float = 0.3, rate: int = 44100, channels: int = 1) -> None:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t) * np.exp(-5 * t)
    sf.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """An unpacked hydrogen-drumkits: three kits, the copyright file."""
    root = tmp_path / "pkg"
    kits = root / drumkits.KITS_DIR
    # Acoustic: Qt rich-text info, a namespace, layers; a file named "snare" under the Kick instrument;
    # a cowbell (other percussion), a numbered slot (unclear), a missing file; one file under two tom names
    acoustic = kits / "Acoustic Kit"
    acoustic.mkdir(parents=True)
    tone(acoustic / "snare.wav", 60)
    tone(acoustic / "kick_soft.flac", 55, channels=2)
    tone(acoustic / "sn1.wav", 200)
    tone(acoustic / "sn2.wav", 210)
    tone(acoustic / "tom.wav", 120)
    tone(acoustic / "bell.wav", 800)
    tone(acoustic / "empty.wav", 1)
    (acoustic / "drumkit.xml").write_text(kit_xml("Acoustic Kit", "Jane Doe", "GPL", QT_INFO, [
        ("Kick", ["snare.wav", "kick_soft.flac"]),
        ("Snare Rock", ["sn1.wav", "sn2.wav", "gone.wav"]),
        ("Tom Hi", ["tom.wav"]),
        ("Tom Mid", ["tom.wav"]),
        ("Cowbell", ["bell.wav"]),
        ("17", ["empty.wav"]),
    ]))  # fmt: skip
    # Synth: plain-text info, no namespace, no licence in the XML (Debian's copyright gives one), old layout
    synth = kits / "Synth v2"
    synth.mkdir(parents=True)
    for f, freq in (("BD.wav", 50), ("HH.wav", 5000), ("OH.wav", 6000), ("SN.wav", 300), ("zap.wav", 900)):
        tone(synth / f, freq)
    (synth / "drumkit.xml").write_text(kit_xml("Synth", "Bob Roe", "", "All sounds synthesized from noise.", [
        ("Bass Drum", ["BD.wav"]), ("Closed HH", ["HH.wav"]), ("Hi-Hat Open", ["OH.wav"]), ("Snare 1", ["SN.wav"]),
        ("Zap", ["zap.wav"]),
    ], ns="", layers=False))  # fmt: skip
    # Cymbals: only crash and ride, CC0
    cymbals = kits / "Cymbals"
    cymbals.mkdir(parents=True)
    tone(cymbals / "c.wav", 4000)
    tone(cymbals / "r.wav", 4500)
    (cymbals / "drumkit.xml").write_text(kit_xml("Cymbals", "Ann", "CC0", "Two cymbals.", [
        ("Crash (Paiste 18&quot;)", ["c.wav"]), ("Ride Bell", ["r.wav"]),
    ]))  # fmt: skip
    doc = root / drumkits.COPYRIGHT
    doc.parent.mkdir(parents=True)
    doc.write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: drumkits/Acoustic?Kit.h2drumkit\nCopyright: Jane Doe\nLicense: GPL-2\n\n"
        "Files:\n drumkits/Synth.h2drumkit\nCopyright: Bob Roe <bob@example.org>\nLicense: GPL-2+\n\n"
        "Files: drumkits/Cymbals.h2drumkit\nCopyright: Ann\nLicense: CC0\n"
    )
    return root


def test_classify_from_instrument_names():
    assert drumkits.classify("Pearl Kick") == ("kick", None)
    assert drumkits.classify("a3 - bass drum 4")[0] == "kick"
    assert drumkits.classify("Hi-Hat Semiopen (Paiste Alpha Metal edge 14\")")[0] == "hihat"
    assert drumkits.classify("Side OHH")[0] == "hihat"
    assert drumkits.classify("Crash/Ride Bell (Paiste Rude Crash/Ride 18\")")[0] == "cymbal"
    assert drumkits.classify("Snare1")[0] == "snare"
    assert drumkits.classify("tomhi2")[0] == "tom"
    assert drumkits.classify("Hand Clap") == (None, drumkits.DROP_OTHER)
    assert drumkits.classify("Pearl Side Stick") == (None, drumkits.DROP_OTHER)
    assert drumkits.classify("Sample: beats_01-10.flac") == (None, drumkits.DROP_UNCLEAR)
    assert drumkits.classify("Snare Tom") == (None, drumkits.DROP_AMBIGUOUS)


def test_build_manifest(package: Path, tmp_path: Path):
    out = tmp_path / "out"
    summary = drumkits.build(package, out, min_class=1, version="1.0-1")
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "audio", "text", "label", "group", "license"]
    by_audio = {r["audio"]: r for r in rows}

    # labels from the XML instrument, never the file name
    assert by_audio["audio/Acoustic Kit/snare.wav"]["label"] == "kick"
    assert by_audio["audio/Acoustic Kit/kick_soft.flac"]["label"] == "kick"
    assert by_audio["audio/Synth v2/OH.wav"]["label"] == "hihat"
    assert by_audio["audio/Cymbals/r.wav"]["label"] == "cymbal"
    labels = {a: r["label"] for a, r in by_audio.items()}
    assert labels == {
        "audio/Acoustic Kit/snare.wav": "kick", "audio/Acoustic Kit/kick_soft.flac": "kick",
        "audio/Acoustic Kit/sn1.wav": "snare", "audio/Acoustic Kit/sn2.wav": "snare", "audio/Acoustic Kit/tom.wav": "tom",
        "audio/Synth v2/BD.wav": "kick", "audio/Synth v2/HH.wav": "hihat", "audio/Synth v2/OH.wav": "hihat",
        "audio/Synth v2/SN.wav": "snare", "audio/Cymbals/c.wav": "cymbal", "audio/Cymbals/r.wav": "cymbal",
    }  # fmt: skip
    # clips copied unchanged under audio/<kit>/
    for a in by_audio:
        src = package / drumkits.KITS_DIR / a.removeprefix("audio/")
        assert (out / a).read_bytes() == src.read_bytes()

    # the text: the kit's description (HTML stripped) and author, the same for the whole kit, no instrument name
    acoustic = {r["text"] for r in rows if r["group"] == "Acoustic Kit"}
    assert acoustic == {"A sampled acoustic & wooden kit. Author: Jane Doe."}
    assert {r["text"] for r in rows if r["group"] == "Synth v2"} == {"All sounds synthesized from noise. Author: Bob Roe."}
    for r in rows:
        assert "<" not in r["text"] and "white-space" not in r["text"]
        for word in ("kick", "snare", "tom", "hat", "crash", "ride", "bass drum"):
            assert word not in r["text"].lower()

    # groups are kits (folder names); licences per kit: the XML's, then Debian's
    assert {r["group"] for r in rows} == {"Acoustic Kit", "Synth v2", "Cymbals"}
    lic = {r["group"]: r["license"] for r in rows}
    assert lic["Acoustic Kit"] == "GPL (drumkit.xml); GPL-2, Jane Doe (Debian copyright)"
    assert lic["Synth v2"].startswith(drumkits.UNSTATED) and "GPL-2+, Bob Roe" in lic["Synth v2"]
    assert lic["Cymbals"].startswith("CC0 (drumkit.xml)")
    assert (out / "COPYRIGHT").read_text() == (package / drumkits.COPYRIGHT).read_text()

    # dropped and counted: other percussion, unclear names, the missing file, the file two toms share
    d = summary["dropped"]
    assert d[drumkits.DROP_OTHER] == 2  # Cowbell, Zap
    assert d[drumkits.DROP_UNCLEAR] == 1  # "17"
    assert d["sample file missing from the kit folder"] == 1
    assert d["file already kept under another instrument of the same class (duplicate)"] == 1
    assert summary["dropped_instruments"][drumkits.DROP_OTHER] == {"Cowbell": 1, "Zap": 1}
    assert "Acoustic Kit: gone.wav" in summary["dropped_instruments"]["sample file missing from the kit folder"]
    assert summary["rows"] == len(rows) == 11 and summary["groups"] == 3
    assert summary["per_class"] == {"kick": 3, "snare": 3, "hihat": 2, "cymbal": 2, "tom": 1}
    assert summary["per_kit"]["Cymbals"] == {"cymbal": 2}
    assert len({r["id"] for r in rows}) == len(rows)

    # the instrument behind each row is kept apart from the manifest
    with (out / "provenance.csv").open(newline="", encoding="utf-8") as f:
        prov = {r["audio"]: r["instrument"] for r in csv.DictReader(f)}
    assert prov["audio/Acoustic Kit/snare.wav"] == "Kick"
    assert json.loads((out / "summary.json").read_text())["source"].endswith("1.0-1 (Hydrogen drum kits)")


def test_min_class_and_conflicts(package: Path, tmp_path: Path):
    # a file used by a kick and a snare instrument is ambiguous: both uses dropped
    kit = package / drumkits.KITS_DIR / "Cymbals"
    xml = (kit / "drumkit.xml").read_text().replace("</instrumentList>", "")
    extra = "<instrument><name>Kick</name><filename>c.wav</filename></instrument></instrumentList>"
    (kit / "drumkit.xml").write_text(xml.replace("</drumkit_info>", extra + "</drumkit_info>"))
    rows, summary = drumkits.collect(package, min_class=2)
    assert "audio/Cymbals/c.wav" not in {r["audio"] for r in rows}
    assert summary["dropped"]["one file used by instruments of different classes (ambiguous)"] == 2
    # tom and (now) cymbal have 1 row < 2: the classes are dropped, and said so
    assert {r["label"] for r in rows} == {"kick", "snare", "hihat"}
    assert summary["dropped_instruments"]["class has fewer than 2 rows (class dropped)"] == {"tom": 1, "cymbal": 1}
    # an earlier output is replaced; a folder this script did not write is not
    out = tmp_path / "out"
    drumkits.build(package, out, min_class=2)
    drumkits.build(package, out, min_class=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        drumkits.build(package, foreign)
    assert (foreign / "keep.txt").exists()


def test_real_data_params_for_audio():
    """bench/real_data.py --dataset drumkits: audio+text encoders, and baselines that follow them."""
    rspec = importlib.util.spec_from_file_location("real_data", REPO / "bench" / "real_data.py")
    real_data = importlib.util.module_from_spec(rspec)
    rspec.loader.exec_module(real_data)
    params = {"featurize": {"encoders": {"image": "efficientnet_lite0", "text": "minilm_l6"}, "device": "auto"},
              "train": {"strategies": ["image_only", "text_only", "concat", "late"]}}  # fmt: skip
    real_data.merge(params, real_data.DATASETS["drumkits"]["params"])
    assert params["featurize"] == {"encoders": {"audio": "resemblyzer", "text": "minilm_l6"}, "device": "auto"}
    assert real_data.follow_encoders(params["train"]["strategies"], list(params["featurize"]["encoders"])) == [
        "audio_only", "text_only", "concat", "late"]  # fmt: skip
    # image+text data keeps the default list as it is
    default = ["image_only", "text_only", "concat"]
    assert real_data.follow_encoders(default, ["image", "text"]) == default
