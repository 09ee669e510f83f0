"""The SQLite inference log: round trip, WAL, and failures that are counted instead of raised."""

from __future__ import annotations

import sqlite3

import numpy as np

from mmfusion.monitoring.inference_log import (
    SCHEMA,
    InferenceLog,
    InferenceLogWriter,
    InferenceRecord,
    read_embeddings,
    read_inference_log,
)


def record(i: int, text: str | None = "red apple", image: bool = True) -> InferenceRecord:
    emb = {"text": [0.1 * i] * 4} if text else {}
    if image:
        emb["image"] = [float(i)] * 6
    return InferenceRecord(
        request_id=f"r{i}",
        item=0,
        endpoint="classify",
        model_version="v1",
        label="fruit",
        probabilities={"fruit": 0.7, "plant": 0.3},
        contributions={"image": 0.4, "text": 0.6},
        embeddings=emb,
        text=text,
        image_size=(72, 64) if image else None,
        image_format="PNG" if image else None,
        image_bytes=123 if image else None,
        image_data=b"raw" if image else None,
        latency_ms=12.5,
        ts=1000.0 + i,
    )


def test_round_trip(tmp_path):
    log = InferenceLog(tmp_path / "log.sqlite")
    assert log.append([record(1), record(2, text=None), record(3, image=False)]) == 3
    log.close()
    df = read_inference_log(tmp_path / "log.sqlite")
    assert list(df["request_id"]) == ["r1", "r2", "r3"]
    assert df.loc[0, "probabilities"] == {"fruit": 0.7, "plant": 0.3}
    assert df.loc[0, "confidence"] == 0.7 and df.loc[0, "text"] == "red apple" and df.loc[0, "text_chars"] == 9
    assert df.loc[1, "modalities"] == "image" and df.loc[2, "modalities"] == "text"
    assert (df.loc[0, "image_width"], df.loc[0, "image_height"]) == (72, 64)
    keys, image = read_embeddings(tmp_path / "log.sqlite", "image")
    assert list(keys["request_id"]) == ["r1", "r2"] and image.shape == (2, 6) and image.dtype == np.float32
    np.testing.assert_allclose(image[1], 2.0)
    keys, text = read_embeddings(tmp_path / "log.sqlite", "text", since=1002.0)
    assert list(keys["request_id"]) == ["r3"] and text.shape == (1, 4)


def test_wal_mode_and_privacy_flags(tmp_path):
    path = tmp_path / "log.sqlite"
    log = InferenceLog(path, log_text=False, log_images=False)
    log.append([record(1)])
    log.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0
        assert conn.execute("SELECT text, text_chars FROM predictions").fetchone() == (None, 9)
    log = InferenceLog(path, log_images=True)
    log.append([record(2)])
    log.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT request_id, data FROM images").fetchall() == [("r2", b"raw")]


def test_writer_writes_in_background(tmp_path):
    writer = InferenceLogWriter(tmp_path / "log.sqlite")
    writer.submit([record(i) for i in range(50)])
    assert writer.flush(timeout=10)
    writer.close()
    assert writer.written == 50 and writer.failures == 0
    assert len(read_inference_log(tmp_path / "log.sqlite")) == 50


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
    import sqlite3

    from mmfusion.monitoring import inference_log

    real, refusals = inference_log.connect, []

    def locked_at_first(path, timeout=10.0):
        if len(refusals) < 3:
            refusals.append(path)
            raise sqlite3.OperationalError("database is locked")
        return real(path, timeout)

    monkeypatch.setattr(inference_log, "connect", locked_at_first)
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


def test_a_duplicate_key_never_overwrites_and_the_rest_of_its_batch_is_written(tmp_path):
    log = InferenceLog(tmp_path / "log.sqlite")
    first = record(1)
    assert log.append([first]) == 1
    again = record(1)
    again.label = "plant"
    assert log.append([record(2), again, record(3)]) == 2  # the duplicate alone is refused
    log.close()
    df = read_inference_log(tmp_path / "log.sqlite")
    assert list(df["request_id"]) == ["r1", "r2", "r3"] and df.loc[0, "label"] == "fruit"
    writer = InferenceLogWriter(tmp_path / "log.sqlite")
    writer.submit([record(1), record(4)])
    assert writer.flush(timeout=10)
    writer.close()
    assert writer.written == 1 and writer.failures == 1


def test_client_request_id_column_and_migration_of_an_old_log(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # a log written before client_request_id existed
        conn.executescript(SCHEMA.replace("    client_request_id TEXT,\n", ""))
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
