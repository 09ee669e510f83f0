"""The pure parts of the loop: feedback storage and its errors, export, retrain policy, promotion rule."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from mmfusion import live
from mmfusion.config import parse_params
from mmfusion.monitoring.export import export_feedback, split_holdout
from mmfusion.monitoring.feedback import FeedbackError, add_feedback, feedback_counts, read_feedback
from mmfusion.monitoring.inference_log import InferenceLog, InferenceRecord
from mmfusion.monitoring import policy
from mmfusion.serving import promotion
from tests.conftest import CLASSES, draw_sample

LABELS = sorted(CLASSES)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    draw_sample(CLASSES["fruit"][0], seed=seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def logged(tmp_path):
    """An inference log with 7 answered requests: r0..r4 kept their image and text, r5 only its text; r6 is a
    2-item batch of texts, item 1 kept, item 0 not."""
    path = tmp_path / "logs" / "inference.sqlite"
    log = InferenceLog(path)
    recs = []
    for i in range(6):
        data, text = _png(i), f"red apple {i}"
        kept = {"image": ("PNG", data), "text": ("text", text.encode())} if i < 5 else {"text": ("text", text.encode())}
        recs.append(InferenceRecord(request_id=f"r{i}", item=0, endpoint="classify", model_version="v1", label="fruit",
                                    probabilities={"fruit": 0.9, "plant": 0.05, "water": 0.05}, modalities=["image", "text"],
                                    fields={"image_width": 48, "image_height": 48, "image_format": "PNG",
                                            "image_bytes": len(data), "text_chars": len(text)},
                                    kept=kept, ts=1000.0 + i))  # fmt: skip
    for j in range(2):
        recs.append(InferenceRecord(request_id="r6", item=j, endpoint="classify_batch", model_version="v1", label="plant",
                                    probabilities={"fruit": 0.1, "plant": 0.8, "water": 0.1}, modalities=["text"],
                                    fields={"text_chars": 4}, kept={"text": ("text", b"leaf")} if j else {}, ts=1010.0))  # fmt: skip
    log.append(recs)
    log.close()
    return path


def test_feedback_is_stored_and_client_mistakes_are_4xx(logged):
    fb = add_feedback(logged, "r0", 0, "plant", LABELS, now=2000.0)
    assert fb.usable and fb.predicted == "fruit" and not fb.to_json()["correct"]
    cases = [
        (("nope", 0, "fruit"), 404, "unknown_request"),
        (("r0", 3, "fruit"), 404, "unknown_item"),
        (("r1", 0, "banana"), 400, "unknown_label"),
        (("r0", 0, "fruit"), 409, "duplicate_feedback"),
        (("", 0, "fruit"), 400, "no_request_id"),
    ]
    for args, status, reason in cases:
        with pytest.raises(FeedbackError) as err:
            add_feedback(logged, *args, LABELS)
        assert (err.value.status, err.value.reason) == (status, reason)
    not_kept = add_feedback(logged, "r5", 0, "fruit", LABELS)
    assert not not_kept.usable and not_kept.reason == "image_not_kept"
    text_only = add_feedback(logged, "r6", 1, "plant", LABELS)
    assert text_only.usable  # every input it had was kept: a text-only row is a training row
    nothing_kept = add_feedback(logged, "r6", 0, "plant", LABELS)
    assert not nothing_kept.usable and nothing_kept.reason == "text_not_kept"
    assert feedback_counts(logged) == {"total": 4, "usable": 2, "not_usable": {"image_not_kept": 1, "text_not_kept": 1}}
    df = read_feedback(logged)
    assert list(df["request_id"]) == ["r0", "r5", "r6", "r6"] and df.loc[0, "label"] == "plant"  # the duplicate changed nothing
    assert df.loc[0, "inputs"]["text"] == ("text", b"red apple 0") and df.loc[0, "inputs"]["image"][0] == "PNG"
    assert df.loc[2, "modalities"] == "text" and set(df.loc[2, "inputs"]) == {"text"}


def test_export_holds_out_the_newest_and_writes_an_ingestable_manifest(logged, tmp_path):
    from mmfusion.sources.manifest import build

    add_feedback(logged, "r6", 1, "plant", LABELS, now=2999.0)  # text-only, usable, the oldest
    for i in range(5):
        add_feedback(logged, f"r{i}", 0, "water" if i % 2 else "fruit", LABELS, now=3000.0 + i)
    add_feedback(logged, "r5", 0, "fruit", LABELS, now=3010.0)  # stored, not usable
    params = parse_params({"retrain": {"holdout_fraction": 0.4, "export_dir": str(tmp_path / "fb")},
                           "ingest": {"feedback_dir": str(tmp_path / "fb" / "train")}})
    summary = export_feedback(params, tmp_path, log_url=str(logged))
    assert (summary["usable"], summary["train"], summary["holdout"]) == (6, 4, 2)
    assert summary["not_usable"] == {"image_not_kept": 1} and summary["modalities"] == ["image", "text"]
    hold = pd.read_csv(tmp_path / "fb" / "holdout" / "manifest.csv")
    assert sorted(hold["request_id"]) == ["r3", "r4"]  # the newest feedback
    src = parse_params({"ingest": {"source": "manifest", "manifest": {"path": str(tmp_path / "fb" / "train" / "manifest.csv")}}})
    df = build(src.ingest, tmp_path / "staging")
    assert len(df) == 4 and set(df["label"]) == {"fruit", "water", "plant"}
    images = [p for p in df["image"] if p]
    assert len(images) == 3 and all((tmp_path / "staging" / p).read_bytes()[:4] == b"\x89PNG" for p in images)
    assert sorted(df["text"]) == ["leaf", "red apple 0", "red apple 1", "red apple 2"]


def test_split_holdout_edges():
    df = pd.DataFrame({"ts": [3.0, 1.0, 2.0], "request_id": ["c", "a", "b"], "item": 0})
    train, hold = split_holdout(df, 0.2)
    assert list(hold["request_id"]) == ["c"] and list(train["request_id"]) == ["a", "b"]
    assert len(split_holdout(df, 0.0)[1]) == 0
    assert len(split_holdout(df.iloc[:1], 0.5)[1]) == 1  # round(0.5) rounds up: one row, held out


def test_policy_starts_only_with_drift_feedback_and_no_cooldown():
    params = parse_params({"retrain": {"drift_windows": 2, "min_feedback": 5, "cooldown_minutes": 10}})
    assert policy.decide(params, 1, 50, None, 0.0) == (False, "1 consecutive drifted window(s), policy needs 2")
    start, reason = policy.decide(params, 2, 4, None, 0.0)
    assert not start and "4 usable feedback" in reason
    start, reason = policy.decide(params, 3, 5, last_start_ts=1000.0, now=1000.0 + 300)
    assert not start and reason.startswith("cooldown")
    assert policy.decide(params, 3, 5, last_start_ts=1000.0, now=1000.0 + 601)[0]
    off = parse_params({"retrain": {"auto": False}})
    assert policy.decide(off, 9, 99, None, 0.0) == (False, "retrain.auto is false")


def test_policy_reads_the_drift_streak_and_records_skips(tmp_path):
    from mmfusion.monitoring.monitor import History
    from types import SimpleNamespace

    hist = History(tmp_path / "monitor.sqlite")
    for i, verdict in enumerate(["drift", "ok", "drift", "drift"]):
        w = SimpleNamespace(index=i, id=f"w{i}", start_ts=float(i), end_ts=i + 1.0, data=[1] * 60, complete=True)
        hist.record("v1", "count:200", w, {"verdict": verdict, "severity": "critical", "flagged": []})
    hist.close()
    assert policy.drift_streak(tmp_path / "monitor.sqlite", "v1", "count:200") == 2
    assert policy.drift_streak(tmp_path / "monitor.sqlite", "v2", "count:200") == 0
    path = tmp_path / "retrain.jsonl"
    policy.append_event(path, {"event": "skip", "reason": "x"})
    policy.append_event(path, {"event": "start", "reason": "y"})
    events = policy.read_events(path)
    assert [e["event"] for e in events] == ["skip", "start"] and policy.last_start(events) == events[1]["ts"]


def test_promotion_rule():
    rule = parse_params({"retrain": {"promotion": {"test_tolerance": 0.02, "holdout_tolerance": 0.0}}}).retrain.promotion
    champ = {"test": {"rows": 50, "accuracy": 0.90, "macro_f1": 0.88}, "holdout": {"rows": 10, "accuracy": 0.5, "macro_f1": 0.4}}
    better = {"test": {"rows": 50, "accuracy": 0.89, "macro_f1": 0.87}, "holdout": {"rows": 10, "accuracy": 0.9, "macro_f1": 0.8}}
    assert promotion.decide(champ, better, rule)["promote"]
    worse_test = {**better, "test": {"rows": 50, "accuracy": 0.85, "macro_f1": 0.85}}
    d = promotion.decide(champ, worse_test, rule)
    assert not d["promote"] and d["reason"].startswith("rejected: test accuracy")
    worse_hold = {**better, "holdout": {"rows": 10, "accuracy": 0.5, "macro_f1": 0.39}}
    assert not promotion.decide(champ, worse_hold, rule)["promote"]
    no_hold = {"test": better["test"], "holdout": {"rows": 0, "accuracy": None, "macro_f1": None}}
    d = promotion.decide(champ, no_hold, rule)
    assert d["promote"] and "skipped" in d["checks"][1]


def test_live_pointer_promote_and_rollback_errors(tmp_path):
    params = parse_params({})
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "package.json").write_text(json.dumps({"bento_tag": "mmfusion:b1", "model_tag": "mmfusion:m1"}))
    assert live.live_entry(params, tmp_path)["bento_tag"] == "mmfusion:b1"  # never promoted: the last built
    with pytest.raises(promotion.PromotionError, match="nothing to roll back"):
        promotion.rollback(params, tmp_path)
    promotion.promote(params, tmp_path, {"bento_tag": "mmfusion:b1", "model_tag": "mmfusion:m1"}, "first")
    promotion.promote(params, tmp_path, {"bento_tag": "mmfusion:b2", "model_tag": "mmfusion:m2"}, "better")
    state = live.read_live(params, tmp_path)
    assert state["live"]["bento_tag"] == "mmfusion:b2" and state["previous"][0]["bento_tag"] == "mmfusion:b1"
    assert "previous: mmfusion:b1" in promotion.show(params, tmp_path)
