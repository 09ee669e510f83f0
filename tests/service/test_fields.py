"""The HTTP fields come from the modality registry: /classify takes one multipart field and a
/classify_batch item one key per registered modality, typed by the spec's `http` kind, and a plugin's
modality (`MMFUSION_PLUGINS`) is a field of a served Bento with nothing in the service edited.

The registry is process-wide, so the plugin is only ever imported by other processes: a `python -c`
that imports the service (fast), and a second `bentoml serve` of the session's Bento.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from mmfusion.modalities import get_modality, list_modalities
from mmfusion.procs import stop_process_group
from tests.conftest import REPO
from tests.service.conftest import png_bytes, service_env, start_server

PLUGIN = "tests.service.toy_plugin"
TOYS = {"toy_file": "file", "toy_text": "text"}  # what toy_plugin registers
OPTIONS = ("explain", "overlay")  # /classify's own form fields (booleans), after the modalities'
TIMEOUT = 60.0

_DESCRIBE = (
    "import json, mmfusion.serving.service as s; from mmfusion.modalities import get_modality, list_modalities; "
    "print(json.dumps({'kinds': {m: get_modality(m).http for m in list_modalities()}, "
    "'openapi': s.MMFusion.openapi_spec.asdict()}, default=str))"
)


def registered() -> dict[str, str]:
    """{modality: http kind} of this process's registry (no plugin)."""
    return {m: get_modality(m).http for m in list_modalities()}


def assert_fields(doc: dict, kinds: dict[str, str]) -> None:
    """The OpenAPI document has exactly one /classify field and one BatchItem key per modality in `kinds`,
    in registration order: a file upload or a string in the form, base64 or a string in JSON; then the form's options."""
    form = doc["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert list(form) == [*kinds, *OPTIONS], form
    assert all(form[o]["type"] == "boolean" and form[o]["default"] is False for o in OPTIONS), form
    for m, kind in kinds.items():
        assert form[m]["type"] == "string", form[m]
        assert form[m].get("format") == ("binary" if kind == "file" else None), (m, form[m])
    batch = doc["paths"]["/classify_batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["properties"]["items"]["items"] == {"$ref": "#/components/schemas/BatchItem"}
    item = doc["components"]["schemas"]["BatchItem"]["properties"]
    assert list(item) == list(kinds), item
    for m, kind in kinds.items():
        assert item[m]["anyOf"] == [{"type": "string"}, {"type": "null"}] and item[m]["default"] is None, item[m]
        assert ("base64" in item[m]["description"]) == (kind == "file"), (m, item[m])


def describe_service(tmp_path: Path, plugins: str | None = None) -> subprocess.CompletedProcess:
    """Import the service in a fresh process (this checkout's params.yaml) and print its registry and OpenAPI."""
    env = service_env(tmp_path / "bentoml")
    env.pop("MMFUSION_PLUGINS", None)
    if plugins is not None:
        env["MMFUSION_PLUGINS"] = plugins
    cmd = [sys.executable, "-c", _DESCRIBE]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)


def described(tmp_path: Path, plugins: str | None = None) -> dict:
    proc = describe_service(tmp_path, plugins)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fields_follow_the_registry(tmp_path):
    out = described(tmp_path)
    assert out["kinds"] == registered()
    assert_fields(out["openapi"], registered())


def test_a_plugins_modalities_are_fields(tmp_path):
    out = described(tmp_path, f" {PLUGIN} ,")  # comma-separated, blanks ignored
    assert out["kinds"] == {**registered(), **TOYS}
    assert_fields(out["openapi"], out["kinds"])
    assert "toy_file" not in list_modalities()  # this process's registry is untouched


def test_a_plugin_that_does_not_import_fails_the_start(tmp_path):
    proc = describe_service(tmp_path, "tests.service.no_such_plugin")
    assert proc.returncode != 0 and "No module named 'tests.service.no_such_plugin'" in proc.stderr, proc.stderr[-2000:]


# -- a real `bentoml serve` of the session's Bento, with the plugin --------------------------------------


def _upload_dirs(proc: subprocess.Popen) -> list[Path]:
    """The per-worker upload folders of this server (serving/guard.py: use_private_upload_dir)."""
    pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    return [d for pid in pids if (d := Path(tempfile.gettempdir()) / f"mmfusion-uploads-{pid}").is_dir()]


@pytest.fixture(scope="module")
def toy_server(packaged, tmp_path_factory):
    """The session's Bento served with MMFUSION_PLUGINS naming the toy plugin; its own inference log."""
    tmp = tmp_path_factory.mktemp("toy_server")
    env = {
        **packaged["env"],
        "MMFUSION_PLUGINS": PLUGIN,
        "MMFUSION_INFERENCE_LOG": str(tmp / "log.sqlite"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),  # tests.service...
    }
    tag = packaged["report"]["bento_tag"]
    proc, url = start_server(tag, env, cwd=packaged["root"], output=tmp / "serve.log", timeout=420)
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            stop_process_group(proc)


@pytest.mark.slow
def test_a_plugin_modality_is_a_field_of_a_served_bento(toy_server):
    proc, url = toy_server
    kinds = {**registered(), **TOYS}
    assert_fields(httpx.get(f"{url}/docs.json", timeout=TIMEOUT).json(), kinds)

    def post(path: str, **kw) -> httpx.Response:
        return httpx.post(f"{url}{path}", timeout=TIMEOUT, **kw)

    # the served model takes none of the toys: each is refused per request, naming what it takes
    toy_upload = {"toy_file": ("t.bin", b"toy bytes", "application/octet-stream")}
    toy_base64 = base64.b64encode(b"toy bytes").decode()
    refused = [
        post("/classify", files=toy_upload, data={"text": "red apple"}),
        post("/classify", data={"toy_text": "hello", "text": "red apple"}),
        post("/classify_batch", json={"items": [{"text": "red apple"}, {"toy_file": toy_base64}]}),
        post("/classify_batch", json={"items": [{"toy_text": "hello"}]}),
    ]
    for resp in refused:
        assert resp.status_code == 400 and resp.json()["reason"] == "unsupported_modality", resp.text
        assert "toy_" in resp.json()["error"]
    assert refused[2].json()["item"] == 1
    # the model's own modalities still answer on the same server
    image = {"image": ("a.png", png_bytes("fruit", 1), "image/png")}
    good = post("/classify", files=image, data={"text": "red apple"})
    assert good.status_code == 200 and good.json()["modalities"] == ["image", "text"], good.text
    # every upload, a refused toy file included, was read and deleted before the answer
    dirs = _upload_dirs(proc)
    assert dirs, "no upload folder found for the server's workers"
    assert [f for d in dirs for f in d.rglob("*") if f.is_file()] == []
