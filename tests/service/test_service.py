"""The packaged Bento over real HTTP: answers, input safety, batching under load, the inference log."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.conftest import CLASSES
from tests.service.conftest import TEST_EXPLAIN, TEST_LIMITS, png_bytes
from tests.service.test_fields import assert_fields, registered

# The fixtures train, package and serve a model: about two minutes on a 2-core CPU.
pytestmark = pytest.mark.slow

TIMEOUT = 60.0
LABELS = sorted(CLASSES)


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=TIMEOUT, **kwargs)


def assert_answer(body: dict, modalities: list[str]) -> None:
    assert body["label"] in LABELS
    assert set(body["probabilities"]) == set(LABELS)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["modalities"] == modalities
    assert set(body["contributions"]) == {"image", "text"}
    for missing in {"image", "text"} - set(modalities):
        assert body["contributions"][missing] == 0.0
    assert body["model_version"] and body["latency_ms"] > 0 and body["request_id"]


def assert_error(resp: httpx.Response, status: int, reason: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body, dict) and body["reason"] == reason and body["status"] == status
    assert isinstance(body["error"], str) and len(body["error"]) > 10
    return body


def log_count(server) -> int:
    with sqlite3.connect(f"file:{server.log_path}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]


def wait_log_count(server, expected: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    n = -1
    while time.monotonic() < deadline:
        n = log_count(server) if server.log_path.exists() else 0
        if n >= expected:
            return n
        time.sleep(0.2)
    return n


def test_package_report(packaged):
    report = packaged["report"]
    assert report["bento_tag"].startswith("mmfusion:")
    assert report["model_tag"] == f"mmfusion:{report['model_version']}"
    assert report["labels"] == LABELS and report["smoke_test"]["ok"]
    written = json.loads((packaged["root"] / "models" / "best" / "metrics.json").read_text())
    assert report["metrics"]["val"]["macro_f1"] == written["val"]["macro_f1"]  # the packaged model's own metrics


def test_the_bentos_own_page_describes_the_model(server):
    """The OpenAPI UI at / shows the model, its labels and how to call it (not BentoML's default README)."""
    info = httpx.get(f"{server.url}/docs.json", timeout=TIMEOUT).json()["info"]
    described = info["description"]
    assert server.package_report["model_version"] in described and "concat" in described
    assert all(f"`{label}`" in described for label in LABELS)
    assert "-F image=@sample -F text=" in described and "/feedback" in described
    assert "BentoML" not in described.split("**Calling it**")[0]


def test_openapi_lists_one_field_per_registered_modality(server):
    """/classify's form fields and /classify_batch's item keys are the modality registry's, typed by kind."""
    assert_fields(httpx.get(f"{server.url}/docs.json", timeout=TIMEOUT).json(), registered())


def test_image_and_text(server):
    resp = post(server, "/classify", files={"image": ("a.png", png_bytes("fruit", 1), "image/png")}, data={"text": "red apple"})
    assert resp.status_code == 200, resp.text
    assert_answer(resp.json(), ["image", "text"])
    assert resp.headers["x-request-id"] == resp.json()["request_id"]
    assert resp.headers["content-type"] == "application/json"
    assert "explanation" not in resp.json()  # explanations are asked for, never given by default


def test_the_access_log_is_on_by_default_one_line_per_request(server):
    """package.access_log (default true): BentoML's access line per request in the server's output."""
    r = httpx.post(f"{server.url}/classify", files={"image": ("a.png", png_bytes("fruit", 3), "image/png")},
                   data={"text": "red apple"}, headers={"x-request-id": "access-log-probe"}, timeout=60)  # fmt: skip
    assert r.status_code == 200
    for _ in range(50):
        lines = [line for line in server.output.read_text(errors="replace").splitlines() if "path=/classify" in line]
        if any("status=200" in line for line in lines):
            break
        time.sleep(0.1)
    assert any("method=POST" in line and "status=200" in line for line in lines), lines[-3:]


def test_image_only_and_text_only(server):
    image_only = post(server, "/classify", files={"image": ("a.png", png_bytes("water", 2), "image/png")})
    assert image_only.status_code == 200, image_only.text
    assert_answer(image_only.json(), ["image"])
    text_only = post(server, "/classify", data={"text": "blue wave"})
    assert text_only.status_code == 200, text_only.text
    assert_answer(text_only.json(), ["text"])


def test_the_model_separates_the_tiny_classes(server):
    """Behaviour, not just shape: the trained tiny model gets its own easy cases right."""
    for label in LABELS:
        text = f"{CLASSES[label][1][0]} 1"
        resp = post(server, "/classify", files={"image": ("x.png", png_bytes(label, 5), "image/png")}, data={"text": text})
        assert resp.json()["label"] == label, resp.text


def test_neither_modality_is_400(server):
    assert_error(post(server, "/classify", data={"text": "   "}), 400, "no_input")
    assert_error(post(server, "/classify", data={}), 400, "no_input")


def test_corrupt_image_is_400(server):
    bad = b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10
    assert_error(post(server, "/classify", files={"image": ("bad.png", bad, "image/png")}), 400, "undecodable_image")


def test_oversized_upload_is_413(server):
    big = b"\0" * (TEST_LIMITS["max_upload_bytes"] + 200_000)
    assert_error(post(server, "/classify", files={"image": ("big.png", big, "image/png")}), 413, "upload_too_large")


def test_decompression_bomb_is_413(server):
    # a 2100x2100 PNG is a few KB but 4.4 M pixels, over the test limit of 4 M
    buf = io.BytesIO()
    Image.new("L", (2100, 2100), 0).save(buf, format="PNG")
    assert len(buf.getvalue()) < TEST_LIMITS["max_upload_bytes"]
    assert_error(post(server, "/classify", files={"image": ("bomb.png", buf.getvalue(), "image/png")}), 413, "image_too_large")


def test_format_outside_allow_list_is_415(server):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buf, format="TIFF")
    assert_error(post(server, "/classify", files={"image": ("x.tiff", buf.getvalue(), "image/tiff")}), 415, "unsupported_format")


def test_overlong_text_is_400(server):
    text = "word " * (TEST_LIMITS["max_text_chars"] // 5 + 10)
    assert_error(post(server, "/classify", data={"text": text}), 400, "text_too_long")


def test_image_field_as_url_is_refused(server):
    """BentoML would download a URL given as the file field; the service refuses it instead."""
    assert_error(post(server, "/classify", data={"image": "http://127.0.0.1:1/x.png"}), 400, "invalid_request")


def test_batch_endpoint(server):
    items = [
        {"image": base64.b64encode(png_bytes("plant", 3)).decode(), "text": "green leaf"},
        {"text": "deep lake"},
        {"image": base64.b64encode(png_bytes("fruit", 4)).decode()},
    ]
    resp = post(server, "/classify_batch", json={"items": items})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["results"]) == 3
    for result, modalities in zip(body["results"], (["image", "text"], ["text"], ["image"])):
        assert_answer({**result, "model_version": body["model_version"], "latency_ms": body["latency_ms"], "request_id": body["request_id"]}, modalities)


def test_batch_errors_name_the_item(server):
    body = assert_error(post(server, "/classify_batch", json={"items": [{"text": "ok"}, {"image": "%%%"}]}), 400, "invalid_base64")
    assert body["item"] == 1
    assert_error(post(server, "/classify_batch", json={"items": []}), 400, "no_items")
    too_many = [{"text": "x"}] * (TEST_LIMITS["max_batch_items"] + 1)
    assert_error(post(server, "/classify_batch", json={"items": too_many}), 413, "too_many_items")


def test_metadata_and_health(server):
    resp = post(server, "/metadata")
    assert resp.headers["content-type"] == "application/json"  # every endpoint declares it (service.JSON)
    meta = resp.json()
    assert meta["labels"] == LABELS and meta["strategy"] == "concat"
    assert meta["encoders"] == {"image": "efficientnet_lite0", "text": "minilm_l6"}
    assert meta["head_runtime"] == "onnx"  # package.head_runtime auto on CPU: the head's export passed its check
    assert meta["model_version"] == server.package_report["model_version"]
    assert meta["limits"]["max_text_chars"] == TEST_LIMITS["max_text_chars"]
    assert meta["explain"]["max_evaluations"] == TEST_EXPLAIN["max_evaluations"]  # the packaged params travel
    assert meta["explain"]["method"] == "feature_ablation" and meta["explain"]["image_grid"] == 6
    assert "val" in meta["metrics"]
    assert httpx.get(f"{server.url}/livez", timeout=TIMEOUT).status_code == 200
    assert httpx.get(f"{server.url}/readyz", timeout=TIMEOUT).status_code == 200
    health = post(server, "/health").json()
    assert health["status"] == "ok" and health["worker"]["inference_log"]["open"]
    assert health["worker"]["index"] in (1, 2)  # BentoML's worker id (mmfusion.compat.worker_index)
    assert health["service"]["workers"] == 2 and health["service"]["inference_log"]["rows"] >= 0


def test_32_parallel_requests_with_bad_ones_mixed_in(server):
    """32 good requests in parallel, each answered correctly, while bad ones are refused alongside."""
    before = wait_log_count(server, 0)
    label_of = {i: LABELS[i % 3] for i in range(32)}

    def good(i: int) -> tuple[int, dict]:
        label = label_of[i]
        files = {"image": (f"{i}.png", png_bytes(label, 5), "image/png")}
        resp = post(server, "/classify", files=files, data={"text": f"{CLASSES[label][1][0]} 1"})
        return resp.status_code, resp.json()

    def bad(i: int) -> int:
        return post(server, "/classify", files={"image": ("b.png", b"garbage" * 10, "image/png")}).status_code

    with ThreadPoolExecutor(max_workers=40) as pool:
        goods = [pool.submit(good, i) for i in range(32)]
        bads = [pool.submit(bad, i) for i in range(8)]
        results = [f.result(timeout=120) for f in goods]
        bad_codes = [f.result(timeout=120) for f in bads]
    assert all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:2]
    assert [body["label"] for _, body in results] == [label_of[i] for i in range(32)]
    assert len({body["request_id"] for _, body in results}) == 32
    assert bad_codes == [400] * 8
    # one log row per answered item, none for refused requests
    assert wait_log_count(server, before + 32) == before + 32


def test_log_rows_match_answers(server):
    before = wait_log_count(server, 0)
    resp = post(server, "/classify", files={"image": ("a.png", png_bytes("water", 9), "image/png")}, data={"text": "rain cloud"})
    request_id = resp.json()["request_id"]
    assert wait_log_count(server, before + 1) == before + 1
    with sqlite3.connect(f"file:{server.log_path}?mode=ro", uri=True, timeout=10) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM predictions WHERE request_id = ?", (request_id,)).fetchone()
        embs = conn.execute("SELECT modality, dim FROM embeddings WHERE request_id = ?", (request_id,)).fetchall()
        kept = dict(conn.execute("SELECT modality, format FROM inputs WHERE request_id = ?", (request_id,)).fetchall())
        previews = {m: (f, d) for m, f, d in conn.execute("SELECT modality, format, data FROM previews WHERE request_id = ?", (request_id,))}
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert row["label"] == resp.json()["label"] and row["model_version"] == resp.json()["model_version"]
    assert row["text_chars"] == len("rain cloud") and (row["image_width"], row["image_height"]) == (64, 64)
    assert row["image_format"] == "PNG" and row["image_bytes"] > 0
    assert dict((e["modality"], e["dim"]) for e in embs) == {"image": 1280, "text": 384}
    assert kept == {"text": "text"}  # by default the text is kept, the raw image is not (package.log.keep)
    # and a preview of each, made in the check thread (package.log.previews: every request by default)
    assert previews["text"] == ("text/plain", b"rain cloud") and previews["image"][0] == "image/webp"
    assert Image.open(io.BytesIO(previews["image"][1])).size == (64, 64) and set(previews) == {"image", "text"}
    assert mode == "wal"


def test_explain_attributes_the_answer_to_words_and_image_regions(server):
    """explain=true: the answer's label is the explanation's target, at the answer's (calibrated) probability, with one
    attribution per word of the normalised text and per cell of the image grid; overlay=true adds a heatmap PNG."""
    files = {"image": ("a.png", png_bytes("fruit", 1), "image/png")}
    resp = post(server, "/classify", files=files, data={"text": "  Red\tAPPLE  pie ", "explain": "true", "overlay": "true"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert_answer(body, ["image", "text"])
    ex = body["explanation"]
    assert ex["method"] == "feature_ablation" and ex["target"] == body["label"]
    assert ex["probability"] == pytest.approx(body["probabilities"][body["label"]], abs=1e-3)
    words = ex["modalities"]["text"]
    assert words["kind"] == "words" and [w["word"] for w in words["parts"]] == ["red", "apple", "pie"]
    assert all(isinstance(w["attribution"], float) for w in words["parts"])
    regions = ex["modalities"]["image"]
    assert regions["kind"] == "regions" and regions["grid"] == [6, 6] and regions["size"] == [64, 64]
    assert [len(row) for row in regions["attributions"]] == [6] * 6
    overlay = Image.open(io.BytesIO(base64.b64decode(regions["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (256, 256)
    assert ex["evaluations"] >= 3 + 36 + 1 and ex["seconds"] > 0  # every part removed once, and none
    # without overlay: the numbers only; a text-only item: the text's words only
    text_only = post(server, "/classify", data={"text": "blue wave", "explain": "1"}).json()
    assert set(text_only["explanation"]["modalities"]) == {"text"}
    assert "overlay_png" not in json.dumps(text_only)


def test_a_burst_of_explanations_beyond_max_pending_is_429_and_plain_requests_go_on(server):
    """Each worker takes package.explain.max_pending (1 here) explanations at a time; the rest are refused at once."""
    files = {"image": ("a.png", png_bytes("water", 2), "image/png")}
    with ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda _: post(server, "/classify", files=files, data={"text": "deep blue lake",
                                                                                    "explain": "true"}), range(8)))
    codes = sorted(r.status_code for r in burst)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    busy = assert_error(next(r for r in burst if r.status_code == 429), 429, "explanations_busy")
    assert "package.explain.max_pending: 1" in busy["error"]
    ok = post(server, "/classify", files=files, data={"text": "deep blue lake", "explain": "true"})  # admitted again
    assert ok.status_code == 200 and ok.json()["explanation"]["target"] == ok.json()["label"]


def test_a_too_costly_explanation_is_413_before_any_model_work(server):
    before = wait_log_count(server, 0)
    words = TEST_EXPLAIN["max_evaluations"] + 2  # text only: feature ablation costs words + 1 model evaluations
    resp = post(server, "/classify", data={"text": " ".join(["w"] * words), "explain": "true"})
    body = assert_error(resp, 413, "explanation_too_costly")
    assert f"needs {words + 1} model evaluations" in body["error"] and f"limit of {TEST_EXPLAIN['max_evaluations']}" in body["error"]
    ok = post(server, "/classify", data={"text": "red apple", "explain": "true"})  # the server keeps serving
    assert ok.status_code == 200 and ok.json()["explanation"]["target"] == ok.json()["label"]
    assert wait_log_count(server, before + 1) == before + 1  # logged like any classify; the refused one not at all
