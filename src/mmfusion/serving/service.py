"""The BentoML service: thin HTTP over `Predictor`, with input safety and the inference log.

One service, `MMFusion`, in one process: it validates and decodes inputs, sends them through
the Predictor, answers and logs what it saw. No tensor code here. The model call goes through
`MicroBatcher` (serving/batcher.py): the Predictor runs on one model thread with
`package.torch_threads` threads, and requests that arrive while it is busy share its next call
(up to `package.batching.max_batch_size` items; batching off means one item per call).
An earlier layout with the model in a second BentoML service (BentoML adaptive batching over
HTTP between two processes) reached a third of the in-process throughput on a 2-core CPU: see
the README's Serving section.

APIs (POST, JSON answers): /classify (multipart: image file and/or text), /classify_batch
(JSON: items with base64 image and/or text), /feedback (JSON: request_id, item, label), /metadata,
/health. BentoML adds /livez and /readyz
(ready once the model is loaded and warmed up), /metrics and the OpenAPI UI at /.
"""

from __future__ import annotations

import logging
import random
import time
import typing as t
import uuid
from pathlib import Path

import anyio
import bentoml
from pydantic import BaseModel, BeforeValidator, Field
from typing_extensions import Annotated

from mmfusion.monitoring.inference_log import InferenceLogWriter, InferenceRecord
from mmfusion.serving.batcher import MicroBatcher, Overloaded
from mmfusion.serving.guard import RequestGuard, _install_safe_multipart
from mmfusion.serving.inputs import CheckedItem, RequestError, check_item, decode_base64
from mmfusion.serving.settings import load_settings

log = logging.getLogger("mmfusion.serving")

SETTINGS = load_settings()
PARAMS = SETTINGS.params
LIMITS = PARAMS.limits


def _as_text(value: t.Any) -> t.Any:
    """Numbers and booleans sent as text are text ("42" stays a string)."""
    return str(value) if isinstance(value, (int, float, bool)) else value


Text = Annotated[t.Optional[str], BeforeValidator(_as_text)]


class BatchItem(BaseModel):
    """One item of /classify_batch: a base64 image and/or a text."""

    image: t.Optional[str] = Field(default=None, description="base64 image bytes (a data: URL is accepted)")
    text: Text = Field(default=None, description=f"up to {LIMITS.max_text_chars} characters")


@bentoml.service(
    name="mmfusion",
    workers=PARAMS.workers,
    traffic={"timeout": PARAMS.timeout_s, "max_concurrency": 256},
    http={"host": "127.0.0.1"},
    resources={"gpu": 1} if PARAMS.device == "cuda" else {},
)
class MMFusion:
    """Image + text classification with the packaged fusion model."""

    bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        from PIL import Image

        from mmfusion.serving.predictor import Predictor

        self.started = time.time()
        if PARAMS.torch_threads > 0:
            import torch

            torch.set_num_threads(PARAMS.torch_threads)
        self.predictor = Predictor.from_dir(self.bento_model.path, device=PARAMS.device)
        self.batcher = MicroBatcher(
            self.predictor.predict,
            max_batch_size=PARAMS.batching.max_batch_size if SETTINGS.batching else 1,
            max_latency_ms=PARAMS.batching.max_latency_ms,
        )
        # Encoder weights load lazily: pay that here (on the model thread), so /readyz means
        # "answers at full speed".
        self.batcher.run_sync([{"image": Image.new("RGB", (64, 64), "white"), "text": "warm up"}])
        p = self.predictor
        self._info = {
            "model_version": p.version,
            "labels": list(p.labels),
            "modalities": list(p.modalities),
            "strategy": p.strategy,
            "encoders": dict(p.encoders),
            "metrics": p.metrics,
        }
        self.log = InferenceLogWriter(
            SETTINGS.log_path,
            log_text=PARAMS.log.log_text,
            log_images=PARAMS.log.log_images,
            queue_size=PARAMS.log.queue_size,
        )
        log.info("model %s loaded (version %s)", SETTINGS.model_tag, p.version)

    async def __is_ready__(self) -> bool:
        return self.predictor is not None

    async def _model_info(self) -> dict:
        return self._info

    async def _classify(self, items: list[CheckedItem]) -> list[dict]:
        try:
            return await self.batcher.submit([item.to_predictor() for item in items])
        except Overloaded as exc:
            raise RequestError(503, "overloaded", f"the server is overloaded, try again later: {exc}") from exc

    def _record(self, ctx: bentoml.Context, request_id: str, endpoint: str, items, results, latency_ms: float) -> None:
        """Queue one log record per item; never raises (a log failure must not fail the answer)."""
        try:
            version = (self._info or {}).get("model_version", "unknown")
            self.log.submit(
                [
                    InferenceRecord(
                        request_id=request_id,
                        item=i,
                        endpoint=endpoint,
                        model_version=version,
                        label=res["label"],
                        probabilities=res["probabilities"],
                        contributions=res.get("contributions", {}),
                        embeddings=res.get("embeddings", {}),
                        text=item.text,
                        image_size=item.image.size if item.image is not None else None,
                        image_format=item.image_format,
                        image_bytes=item.image_nbytes,
                        image_data=item.image_bytes,
                        latency_ms=latency_ms,
                    )
                    for i, (item, res) in enumerate(zip(items, results))
                ]
            )
        except Exception as exc:
            self.log._fail(len(items), exc)

    @staticmethod
    def _answer(result: dict, item: CheckedItem) -> dict:
        return {
            "label": result["label"],
            "probabilities": result["probabilities"],
            "contributions": result.get("contributions", {}),
            "modalities": item.modalities,
        }

    @staticmethod
    def _start(ctx: bentoml.Context) -> str:
        request_id = ctx.request.headers.get("x-request-id") or uuid.uuid4().hex
        ctx.response.headers["x-request-id"] = request_id[:128]
        return request_id[:128]

    @staticmethod
    def _error(ctx: bentoml.Context, exc: RequestError) -> dict:
        ctx.response.status_code = exc.status
        return exc.to_json()

    @bentoml.api
    async def classify(self, ctx: bentoml.Context, image: Path = None, text: Text = None) -> dict:  # type: ignore[assignment]
        """Classify one sample: a multipart image file and/or a text field (at least one)."""
        t0 = time.perf_counter()
        request_id = self._start(ctx)
        try:
            data = image.read_bytes() if image is not None else None
            item = await anyio.to_thread.run_sync(check_item, data, text, LIMITS, _keep_image())
        except RequestError as exc:
            return self._error(ctx, exc)
        info = await self._model_info()
        try:
            (result,) = await self._classify([item])
        except RequestError as exc:
            return self._error(ctx, exc)
        latency_ms = round((time.perf_counter() - t0) * 1000, 2)
        self._record(ctx, request_id, "classify", [item], [result], latency_ms)
        return {
            "request_id": request_id,
            **self._answer(result, item),
            "model_version": info["model_version"],
            "latency_ms": latency_ms,
        }

    @bentoml.api
    async def classify_batch(self, ctx: bentoml.Context, items: list[BatchItem]) -> dict:
        """Classify a JSON list of items, each with a base64 `image` and/or a `text`; all or nothing."""
        t0 = time.perf_counter()
        request_id = self._start(ctx)
        try:
            if not items:
                raise RequestError(400, "no_items", "items is empty: send at least one item")
            if len(items) > LIMITS.max_batch_items:
                raise RequestError(
                    413, "too_many_items", f"{len(items)} items, over the limit of {LIMITS.max_batch_items}"
                )
            checked = await anyio.to_thread.run_sync(self._check_batch, items, _keep_image())
        except RequestError as exc:
            return self._error(ctx, exc)
        info = await self._model_info()
        try:
            results = await self._classify(checked)
        except RequestError as exc:
            return self._error(ctx, exc)
        latency_ms = round((time.perf_counter() - t0) * 1000, 2)
        self._record(ctx, request_id, "classify_batch", checked, results, latency_ms)
        return {
            "request_id": request_id,
            "results": [self._answer(r, it) for r, it in zip(results, checked)],
            "model_version": info["model_version"],
            "latency_ms": latency_ms,
        }

    @staticmethod
    def _check_batch(items: list[BatchItem], keep_images: bool = False) -> list[CheckedItem]:
        checked = []
        for i, it in enumerate(items):
            try:
                data = decode_base64(it.image, LIMITS) if it.image is not None else None
                checked.append(check_item(data, it.text, LIMITS, keep_images))
            except RequestError as exc:
                exc.item = i
                raise
        return checked

    @bentoml.api
    async def metadata(self) -> dict:
        """Model version, labels, modalities, encoders, the winner's metrics, and the input limits."""
        info = await self._model_info()
        return {
            **info,
            "model_tag": SETTINGS.model_tag,
            "batching": {
                "enabled": SETTINGS.batching,
                "max_batch_size": PARAMS.batching.max_batch_size,
                "max_latency_ms": PARAMS.batching.max_latency_ms,
            },
            "limits": {
                "max_upload_bytes": LIMITS.max_upload_bytes,
                "max_pixels": LIMITS.max_pixels,
                "allowed_formats": list(LIMITS.allowed_formats),
                "max_text_chars": LIMITS.max_text_chars,
                "max_batch_items": LIMITS.max_batch_items,
            },
        }

    @bentoml.api
    async def health(self) -> dict:
        """Liveness with detail: uptime and the inference log's counters (see also /livez and /readyz)."""
        return {
            "status": "ok",
            "uptime_s": round(time.time() - self.started, 1),
            "inference_log": {
                "path": str(self.log.path),
                "open": self.log.healthy,
                "written": self.log.written,
                "failures": self.log.failures,
            },
            "model_calls": self.batcher.stats(),
        }

    @bentoml.api
    async def feedback(self, ctx: bentoml.Context, request_id: str = "", label: str = "", item: int = 0) -> dict:
        """The true label of an answered request (`item`: its index in a classify_batch request), stored next
        to the logged rows it labels; says whether it is usable for retraining (the raw image was kept)."""
        from mmfusion.monitoring.feedback import FeedbackError, add_feedback

        await anyio.to_thread.run_sync(self.log.flush, 5.0)  # this process's rows are written
        for attempt in range(6):  # another worker's writer may still hold the classify rows (ms)
            try:
                fb = await anyio.to_thread.run_sync(add_feedback, SETTINGS.log_path, request_id, item, label, self._info["labels"])
                break
            except FeedbackError as exc:
                if exc.status == 404 and attempt < 5:
                    await anyio.sleep(0.2)
                    continue
                return self._error(ctx, RequestError(exc.status, exc.reason, str(exc)))
        return {"status": "stored", **fb.to_json()}

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.batcher.close()
        self.log.close()


def _keep_image() -> bool:
    """Whether this request's raw image bytes go to the log: package.log.log_images x image_sample_rate."""
    return PARAMS.log.log_images and random.random() < PARAMS.log.image_sample_rate


_install_safe_multipart()
MMFusion.add_asgi_middleware(RequestGuard, max_body_bytes=LIMITS.max_upload_bytes)
