"""The inference log on SQLite and on a real PostgreSQL server: round trip, migrations of older logs,
and failures that are counted instead of raised."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import sqlalchemy as sa

from mmfusion import logdb
from mmfusion.monitoring.inference_log import (
    InferenceLog,
    InferenceLogWriter,
    InferenceRecord,
    read_embeddings,
    read_inference_log,
    read_kept,
    read_previews,
)


def record(i: int, text: str | None = "red apple", image: bool = True, keep: tuple[str, ...] = ()) -> InferenceRecord:
    emb = {"text": [0.1 * i] * 4} if text else {}
    if image:
        emb["image"] = [float(i)] * 6
    fields = {"text_chars": len(text)} if text else {}
    if image:
        fields.update({"image_width": 72, "image_height": 64, "image_format": "PNG", "image_bytes": 123})
    kept = {}
    if "image" in keep and image:
        kept["image"] = ("PNG", b"raw")
    if "text" in keep and text:
        kept["text"] = ("text", text.encode())
    return InferenceRecord(
        request_id=f"r{i}",
        item=0,
        endpoint="classify",
        model_version="v1",
        label="fruit",
        probabilities={"fruit": 0.7, "plant": 0.3},
        contributions={"image": 0.4, "text": 0.6},
        embeddings=emb,
        fields=fields,
        kept=kept,
        latency_ms=12.5,
        ts=1000.0 + i,
    )


def test_round_trip(log_url):
    log = InferenceLog(log_url)
    assert log.append([record(1), record(2, text=None), record(3, image=False)]) == 3
    log.close()
    df = read_inference_log(log_url)
    assert list(df["request_id"]) == ["r1", "r2", "r3"]
    assert df.loc[0, "probabilities"] == {"fruit": 0.7, "plant": 0.3}
    assert df.loc[0, "confidence"] == 0.7 and df.loc[0, "text_chars"] == 9 and "text" not in df
    assert df.loc[1, "modalities"] == "image" and df.loc[2, "modalities"] == "text"
    assert (df.loc[0, "image_width"], df.loc[0, "image_height"], df.loc[0, "image_format"]) == (72, 64, "PNG")
    assert df.loc[2, ["image_width", "image_format"]].isna().all()
    assert df.loc[0, "host"] and df.loc[0, "pid"] > 0  # the replica that answered
    keys, image = read_embeddings(log_url, "image")
    assert list(keys["request_id"]) == ["r1", "r2"] and image.shape == (2, 6) and image.dtype == np.float32
    np.testing.assert_allclose(image[1], 2.0)
    keys, text = read_embeddings(log_url, "text", since=1002.0)
    assert list(keys["request_id"]) == ["r3"] and text.shape == (1, 4)
    with logdb.reading(logdb.resolve_url(log_url)) as conn:  # one versioned schema on both back ends
        assert logdb.current_revision(conn) == logdb.head_revision()


def test_kept_inputs(log_url):
    log = InferenceLog(log_url)
    log.append([record(1), record(2, keep=("image",)), record(3, keep=("image", "text"))])
    log.close()
    with logdb.reading(logdb.resolve_url(log_url)) as conn:
        assert read_kept(conn) == {("r2", 0): {"image": ("PNG", b"raw")},
                                   ("r3", 0): {"image": ("PNG", b"raw"), "text": ("text", b"red apple")}}  # fmt: skip
        assert read_kept(conn, [("r3", 0), ("r1", 0)]) == {("r3", 0): {"image": ("PNG", b"raw"), "text": ("text", b"red apple")}}


def test_previews_are_written_and_read_back_for_the_asked_items_only(log_url):
    log = InferenceLog(log_url)
    thumb = ("image/webp", b"RIFF\x00webp")
    with_previews = [record(i) for i in (1, 2)]
    for r in with_previews:
        r.previews = {"image": thumb, "text": ("text/plain", f"text {r.request_id}".encode())}
    no_previews = record(3)  # package.log.previews 0 for every modality: no rows at all
    assert log.append([*with_previews, no_previews]) == 3
    log.close()
    with logdb.reading(logdb.resolve_url(log_url)) as conn:
        assert read_previews(conn, [("r2", 0), ("r3", 0), ("r2", 0), ("nope", 0)]) == {
            ("r2", 0): {"image": thumb, "text": ("text/plain", b"text r2")}
        }
        assert conn.execute(sa.text("SELECT COUNT(*) FROM previews")).scalar() == 4


def test_wal_mode(tmp_path):
    path = tmp_path / "log.sqlite"
    InferenceLog(path).append([record(1)])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT text_chars FROM predictions WHERE request_id='r1'").fetchone() == (9,)


def test_a_log_of_the_old_schema_keeps_its_rows_and_its_kept_inputs(tmp_path):
    """Logs written before the `inputs` table kept images in `images` and texts in `predictions.text`: they
    stay readable, feedback on them stays usable, and new rows go in beside the old ones."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO predictions VALUES ('old', 0, 1.0, 't', 'classify', 'v0', 'fruit', 0.9, "
                     "'{\"fruit\": 0.9}', '{}', 'image,text', 9, 'red apple', 72, 64, 'PNG', 3, 5.0)")  # fmt: skip
        conn.execute("INSERT INTO images VALUES ('old', 0, 'PNG', x'010203')")
    log = InferenceLog(path)  # migrates: columns are only added
    assert log.append([record(7, keep=("text",))]) == 1
    log.close()
    df = read_inference_log(path)
    assert list(df["request_id"]) == ["old", "r7"] and list(df["text_chars"]) == [9, 9]
    with logdb.reading(logdb.resolve_url(path)) as conn:
        assert read_kept(conn) == {("old", 0): {"image": ("PNG", b"\x01\x02\x03"), "text": ("text", b"red apple")},
                                   ("r7", 0): {"text": ("text", b"red apple")}}  # fmt: skip


def test_a_modality_registered_later_gets_its_columns(log_url):
    from mmfusion.modalities import ModalitySpec, register_modality, unregister_modality

    path = log_url
    InferenceLog(path).close()  # made before the modality exists

    @register_modality
    class Pitch(ModalitySpec):
        name, column, http, stats, log_fields, dedup_key = "pitch", "pitch", "text", ("pitch_hz",), ("pitch_unit",), "pitch"

    try:
        rec = record(1)
        rec.fields.update({"pitch_hz": 440.0, "pitch_unit": "Hz"})
        rec.kept = {"pitch": ("text", b"440")}
        log = InferenceLog(path)
        assert log.append([rec]) == 1
        log.close()
        rec = record(2)
        rec.fields.update({"pitch_hz": "not a number", "pitch_unit": 7})  # coerced to the column's type
        assert InferenceLog(path).append([rec]) == 1
        df = read_inference_log(path)
        assert (df.loc[0, "pitch_hz"], df.loc[0, "pitch_unit"]) == (440.0, "Hz")
        assert np.isnan(df.loc[1, "pitch_hz"]) and df.loc[1, "pitch_unit"] == "7"
    finally:
        unregister_modality("pitch")


OLD_SCHEMA = """
CREATE TABLE predictions (request_id TEXT NOT NULL, item INTEGER NOT NULL, ts REAL NOT NULL, time TEXT NOT NULL,
    endpoint TEXT NOT NULL, model_version TEXT NOT NULL, label TEXT NOT NULL, confidence REAL NOT NULL,
    probabilities TEXT NOT NULL, contributions TEXT NOT NULL, modalities TEXT NOT NULL, text_chars INTEGER,
    text TEXT, image_width INTEGER, image_height INTEGER, image_format TEXT, image_bytes INTEGER, latency_ms REAL,
    PRIMARY KEY (request_id, item));
CREATE TABLE embeddings (request_id TEXT NOT NULL, item INTEGER NOT NULL, modality TEXT NOT NULL,
    dim INTEGER NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (request_id, item, modality));
CREATE TABLE images (request_id TEXT NOT NULL, item INTEGER NOT NULL, format TEXT, data BLOB NOT NULL,
    PRIMARY KEY (request_id, item));
"""


def test_writer_writes_in_background(log_url):
    writer = InferenceLogWriter(log_url)
    writer.submit([record(i) for i in range(50)])
    assert writer.flush(timeout=10)
    writer.close()
    assert writer.written == 50 and writer.failures == 0
    assert len(read_inference_log(log_url)) == 50


def test_writer_failure_is_counted_not_raised(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    writer = InferenceLogWriter(blocker / "log.sqlite", open_retry_s=0.5)  # cannot be created
    assert not writer.healthy
    writer.submit([record(1), record(2)])  # must not raise
    assert writer.flush(timeout=10)
    assert writer.failures == 2 and writer.written == 0
    writer.close()


def test_a_log_locked_at_start_is_opened_later_and_loses_nothing(tmp_path, monkeypatch):
    """A worker started while SQLite recovers a WAL (a kill -9 mid-write, another worker holding the file) got
    "database is locked" once and then answered every request unlogged: the writer must try again."""
    from mmfusion.monitoring import inference_log

    real, refusals = inference_log.open_log, []

    def locked_at_first(url, root=None):
        if len(refusals) < 3:
            refusals.append(url)
            raise sqlite3.OperationalError("database is locked")
        return real(url, root)

    monkeypatch.setattr(inference_log, "open_log", locked_at_first)
    writer = InferenceLogWriter(tmp_path / "log.sqlite")
    assert not writer.healthy  # the first try, at start, failed
    writer.submit([record(i) for i in range(5)])
    assert writer.flush(timeout=20)
    writer.close()
    assert writer.healthy and len(refusals) == 3
    assert writer.written == 5 and writer.failures == 0
    assert len(read_inference_log(tmp_path / "log.sqlite")) == 5


def test_writer_counts_a_bad_record_and_keeps_going(tmp_path):
    writer = InferenceLogWriter(tmp_path / "log.sqlite")
    bad = record(1)
    bad.probabilities = {"fruit": object()}  # not JSON-able: this batch fails
    writer.submit([bad])
    assert writer.flush(timeout=10)
    writer.submit([record(2)])
    assert writer.flush(timeout=10)
    writer.close()
    assert writer.failures == 1 and writer.written == 1


def test_full_queue_drops_and_counts(tmp_path):
    writer = InferenceLogWriter(tmp_path / "log.sqlite", queue_size=1)
    writer.submit([record(i) for i in range(200)])  # never blocks
    assert writer.flush(timeout=10)
    writer.close()
    assert writer.written + writer.failures == 200 and writer.written >= 1


def test_a_duplicate_key_never_overwrites_and_the_rest_of_its_batch_is_written(log_url):
    log = InferenceLog(log_url)
    first = record(1)
    assert log.append([first]) == 1
    again = record(1)
    again.label = "plant"
    assert log.append([record(2), again, record(3)]) == 2  # the duplicate alone is refused
    log.close()
    df = read_inference_log(log_url)
    assert list(df["request_id"]) == ["r1", "r2", "r3"] and df.loc[0, "label"] == "fruit"
    writer = InferenceLogWriter(log_url)
    writer.submit([record(1), record(4)])
    assert writer.flush(timeout=10)
    writer.close()
    assert writer.written == 1 and writer.failures == 1


def test_client_request_id_column_and_migration_of_an_old_log(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # a log written before client_request_id existed
        conn.executescript(PRE_ALEMBIC_SCHEMA.replace("    client_request_id TEXT,\n", ""))
        assert "client_request_id" not in {r[1] for r in conn.execute("PRAGMA table_info(predictions)")}
    log = InferenceLog(path)
    rec = record(1)
    rec.client_request_id = "abc"
    log.append([rec, record(2)])
    log.close()
    df = read_inference_log(path)
    assert list(df["client_request_id"]) == ["abc", None]
    keys, emb = read_embeddings(path, "image")
    assert list(keys["request_id"]) == ["r1", "r2"] and emb.shape == (2, 6)


# The schema every log had before Alembic versioned it (the service created it with this DDL).
PRE_ALEMBIC_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id    TEXT NOT NULL,
    item          INTEGER NOT NULL,
    ts            REAL NOT NULL,
    time          TEXT NOT NULL,
    endpoint      TEXT NOT NULL,
    model_version TEXT NOT NULL,
    label         TEXT NOT NULL,
    confidence    REAL NOT NULL,
    probabilities TEXT NOT NULL,
    contributions TEXT NOT NULL,
    modalities    TEXT NOT NULL,
    latency_ms    REAL,
    client_request_id TEXT,
    PRIMARY KEY (request_id, item)
);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts);
CREATE TABLE IF NOT EXISTS embeddings (
    request_id TEXT NOT NULL, item INTEGER NOT NULL, modality TEXT NOT NULL, dim INTEGER NOT NULL,
    vector BLOB NOT NULL, PRIMARY KEY (request_id, item, modality)
);
CREATE TABLE IF NOT EXISTS inputs (
    request_id TEXT NOT NULL, item INTEGER NOT NULL, modality TEXT NOT NULL, format TEXT,
    data BLOB NOT NULL, PRIMARY KEY (request_id, item, modality)
);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL, item INTEGER NOT NULL, label TEXT NOT NULL, ts REAL NOT NULL, time TEXT NOT NULL,
    predicted TEXT, model_version TEXT, usable INTEGER NOT NULL, reason TEXT, PRIMARY KEY (request_id, item)
);
"""


def test_a_log_from_before_versioning_migrates_forward_without_losing_a_row(tmp_path):
    """Today's SQLite files (no version table) come forward in place: every row of every table stays, the
    new columns are NULL on old rows, and the file is stamped at the newest revision."""
    path = tmp_path / "today.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(PRE_ALEMBIC_SCHEMA)
        conn.execute("ALTER TABLE predictions ADD COLUMN text_chars")  # added by the old service, typeless
        for i in range(30):
            conn.execute("INSERT INTO predictions (request_id, item, ts, time, endpoint, model_version, label, confidence, "
                         "probabilities, contributions, modalities, text_chars) VALUES (?, 0, ?, 't', 'classify', 'v0', "
                         "'fruit', 0.9, '{\"fruit\": 0.9}', '{}', 'text', 9)", (f"old{i}", float(i)))  # fmt: skip
            conn.execute("INSERT INTO embeddings VALUES (?, 0, 'text', 4, ?)", (f"old{i}", np.ones(4, "<f4").tobytes()))
            conn.execute("INSERT INTO inputs VALUES (?, 0, 'text', 'text', ?)", (f"old{i}", b"red apple"))
        conn.execute("INSERT INTO feedback VALUES ('old3', 0, 'plant', 5.0, 't', 'fruit', 'v0', 1, NULL)")
    url = logdb.resolve_url(path)
    with logdb.reading(url) as conn:
        assert logdb.current_revision(conn) is None
    log = InferenceLog(path)
    assert log.append([record(100)]) == 1
    with logdb.reading(url) as conn:
        assert logdb.current_revision(conn) == logdb.head_revision()
    df = read_inference_log(path)
    assert len(df) == 31 and df["host"].isna().sum() == 30 and list(df["text_chars"][:3]) == [9, 9, 9]
    keys, emb = read_embeddings(path, "text")
    assert len(keys) == 31 and np.allclose(emb[:30], 1.0)
    from mmfusion.monitoring.feedback import read_feedback

    fb = read_feedback(path)
    assert list(fb["request_id"]) == ["old3"] and fb.loc[0, "inputs"] == {"text": ("text", b"red apple")}


def test_replicas_starting_at_once_migrate_a_fresh_server_log_once(pg_url):
    """Four processes open one new PostgreSQL log at the same moment (replicas starting): one migrates, the
    others wait on the advisory lock; every one can then write."""
    import subprocess
    import sys

    code = (
        "import sys; from mmfusion.monitoring.inference_log import InferenceLog, InferenceRecord as R\n"
        "log = InferenceLog(sys.argv[1])\n"
        "print(log.append([R(request_id='p' + sys.argv[2], item=0, endpoint='classify', model_version='v1', "
        "label='fruit', probabilities={'fruit': 1.0})]))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-800:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["1"] * 4
    df = read_inference_log(pg_url)
    assert sorted(df["request_id"]) == ["p0", "p1", "p2", "p3"] and df["pid"].nunique() == 4


def test_a_server_that_is_down_is_one_clear_line_with_the_password_masked(postgres):
    url = postgres.url().set(port=1)  # nothing listens there
    with pytest.raises(logdb.LogUnavailable) as exc:
        logdb.check_reachable(url)
    line = str(exc.value)
    assert "\n" not in line and "cannot connect" in line and "***" in line and postgres.password not in line


def test_masked_urls_and_sqlite_paths(tmp_path):
    url = logdb.resolve_url("postgresql://u:s3cret@db.example:5432/log")
    assert url.drivername == "postgresql+psycopg" and logdb.masked(url) == "postgresql+psycopg://u:***@db.example:5432/log"
    assert logdb.resolve_url("logs/x.sqlite", tmp_path).database == str(tmp_path / "logs/x.sqlite")
    assert logdb.resolve_url("sqlite:///logs/x.sqlite", tmp_path).database == str(tmp_path / "logs/x.sqlite")
    with pytest.raises(ValueError, match="SQLite file path"):
        logdb.resolve_url("sqlite://")
    with pytest.raises(ValueError, match="expected sqlite"):
        logdb.resolve_url("mysql://u@h/db")
