"""The BentoML service: thin HTTP over `Predictor`, with input safety and the inference log.

One service, `MMFusion`, in one process per worker: it validates and decodes inputs, sends them
through the Predictor, answers and logs what it saw. No tensor code here. The model call goes
through `MicroBatcher` (serving/batcher.py): the Predictor runs on one model thread with
`package.cpu_threads` threads, and requests that arrive while it is busy share its next call
(up to `package.batching.max_batch_size` items; batching off means one item per call).
An earlier layout with the model in a second BentoML service (BentoML adaptive batching over
HTTP between two processes) reached a third of the in-process throughput on a 2-core CPU: see
docs/serving.md and docs/results.md. Limits, timeouts, admission and shutdown: serving/guard.py and the
docs/serving.md.

APIs (POST, JSON answers): /classify (multipart: one field per registered modality, an uploaded
file or a text; `explain=true` adds an explanation, below), /classify_batch (JSON: items with one key
per registered modality, base64 for files; no explanations), /feedback (JSON: request_id, item,
label), /metadata, /health. BentoML adds /livez and /readyz (ready once the model is loaded and
warmed up), /metrics and the OpenAPI UI at /.

Fields: both request shapes are built from the modality registry (`mmfusion.modalities`), so a
registered modality is a field with nothing here edited. Modules named in `MMFUSION_PLUGINS`
(comma-separated) are imported with the registry (`mmfusion.modalities`), so the modalities they
register are fields too. A registered
modality the served model does not take is refused per request (400 `unsupported_modality`); a
model with a modality that has no registered spec does not load (the Predictor refuses it).

Explanations (`explain=true`, `overlay=true` for heatmap PNGs of images; mmfusion.explain): the request's
cost in model evaluations is checked before anything is queued (over `package.explain.max_evaluations`:
413 `explanation_too_costly`), then the explanation runs on the model thread after the classification
(`MicroBatcher.call`: never beside a batch). The log row is the classification's, as for any request.

Request ids: every answered request gets its own `request_id` (the answer, the `x-request-id`
response header and the log's key). A client's `x-request-id` is kept as `client_request_id`
(answer and log) and is never a key, so a reused one cannot touch another request's log row.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import re
import random
import time
import typing as t
import uuid
from pathlib import Path

import anyio
import bentoml
from bentoml.validators import ContentType
from pydantic import BeforeValidator, Field, create_model
from typing_extensions import Annotated

from mmfusion.explain import Explainer, ExplainTooCostly
from mmfusion.modalities import get_modality, keep_shares, list_modalities, preview_shares
from mmfusion import logdb
from mmfusion.monitoring.inference_log import InferenceLogWriter, InferenceRecord, log_totals, open_log
from mmfusion.serving.auth import TokenGate
from mmfusion.serving.batcher import MicroBatcher, Overloaded
from mmfusion.serving.guard import (
    RequestGuard,
    install_drain,
    install_safe_multipart,
    quiet_client_errors,
    use_private_upload_dir,
)
from mmfusion.serving.inputs import CheckContext, CheckedItem, RequestError, check_item, decode_base64
from mmfusion.serving.settings import load_settings

log = logging.getLogger("mmfusion.serving")

SETTINGS = load_settings()
PARAMS = SETTINGS.params
LIMITS = PARAMS.limits
GATE = TokenGate.from_env(PARAMS.auth.classify)  # who may write (mmfusion.serving.auth); per worker process
_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


def _as_text(value: t.Any) -> t.Any:
    """Numbers and booleans sent as text are text ("42" stays a string)."""
    return str(value) if isinstance(value, (int, float, bool)) else value


Text = Annotated[t.Optional[str], BeforeValidator(_as_text)]
# Every answer is a JSON object. Saying so up front spares BentoML building the output's JSON
# schema on every response to find its media type (~3 ms of a ~30 ms request, bench/serve.py).
JSON = Annotated[dict, ContentType("application/json")]
# /classify's options: form booleans as pydantic reads them (true/false, 1/0, yes/no, on/off; else a 400)
Explain = Annotated[bool, Field(description="add an `explanation`: how much each word, image region or time segment "
                                "moved the answer (model evaluations bounded by the service: 413 beyond)")]
Overlay = Annotated[bool, Field(description="with explain: each image's attribution heatmap over it, a base64 PNG")]


# The registered modalities (after the plugins) and how each travels over HTTP (`ModalitySpec.http`):
# the fields of both APIs, in registration order.
FIELD_KINDS: dict[str, str] = {m: get_modality(m).http for m in list_modalities()}
# /classify: BentoML takes a `Path` parameter as a multipart file upload, a `Text` one as a form field.
CLASSIFY_TYPES: dict[str, t.Any] = {"file": Path, "text": Text}


def _batch_field(modality: str, kind: str) -> tuple[t.Any, t.Any]:
    """A /classify_batch item's key for one modality: files travel as base64 strings in JSON."""
    if kind == "file":
        description = f"base64 {modality} file bytes (a data: URL is accepted)"
        return t.Optional[str], Field(default=None, description=description)
    return Text, Field(default=None, description=f"up to {LIMITS.max_text_chars} characters")


BatchItem = create_model(
    "BatchItem",
    __doc__="One item of /classify_batch: one key per modality, at least one given (files in base64).",
    __module__=__name__,
    **{m: _batch_field(m, kind) for m, kind in FIELD_KINDS.items()},
)


def modality_fields(func: t.Callable) -> t.Callable:
    """Give an API method `(self, ctx, *, options..., **fields)` one optional keyword parameter per registered
    modality, before its own keyword-only options (the form lists the modalities first).

    BentoML builds an API's input model (fields, multipart uploads, OpenAPI schema) from
    `inspect.signature(func)`, which honours `__signature__`; it calls the method with one keyword
    per field. So the generated signature is what BentoML sees, as if the fields were written out."""
    sig = inspect.signature(func)
    fixed = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    fields = [
        inspect.Parameter(m, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=CLASSIFY_TYPES[kind])
        for m, kind in FIELD_KINDS.items()
    ]
    options = [p for p in fixed if p.kind is inspect.Parameter.KEYWORD_ONLY]
    func.__signature__ = sig.replace(parameters=[*(p for p in fixed if p not in options), *fields, *options])
    func.__annotations__ = {
        **{k: v for k, v in func.__annotations__.items() if k in {p.name for p in fixed} or k == "return"},
        **{p.name: p.annotation for p in fields},
    }
    return func


@bentoml.service(
    name="mmfusion",
    workers=SETTINGS.workers,
    # BentoML's own timeout is only a backstop behind RequestGuard's (body + request timeouts, JSON
    # answers); its concurrency limit would count slow bodies, so admission is RequestGuard's too.
    traffic={"timeout": PARAMS.timeout_s + PARAMS.body_timeout_s + 5, "max_concurrency": None},
    http={"host": "127.0.0.1"},
    resources={"gpu": 1} if PARAMS.device == "cuda" else {},
    logging={"access": {"enabled": PARAMS.access_log}},
)
class MMFusion:
    """Image + text classification with the packaged fusion model."""

    bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        from mmfusion.inference.predictor import Predictor

        self.started = time.time()
        install_drain(PARAMS.graceful_shutdown_s)  # after uvicorn's handler: chained to it
        self.upload_dir = use_private_upload_dir()
        if PARAMS.cpu_threads > 0:
            import torch

            torch.set_num_threads(PARAMS.cpu_threads)
        self.predictor = Predictor.from_dir(self.bento_model.path, device=PARAMS.device, head_runtime=PARAMS.head_runtime)
        self.modalities = list(self.predictor.modalities)
        self.specs = self.predictor.inputs  # each input's check, with the model's recorded preprocessing
        self.check_ctx = CheckContext(LIMITS)
        self.keep = keep_shares(self.modalities, PARAMS.log.keep)  # package checked them against this model
        self.previews = preview_shares(self.modalities, PARAMS.log.previews)
        self.batcher = MicroBatcher(
            self.predictor.predict,
            max_batch_size=PARAMS.batching.max_batch_size if SETTINGS.batching else 1,
            max_latency_ms=PARAMS.batching.max_latency_ms,
        )
        # Encoder weights load lazily: pay that here (on the model thread), so /readyz means
        # "answers at full speed".
        example = {m: spec.example() for m, spec in self.specs.items()}
        self.batcher.run_sync([example])
        self.explainer = Explainer(self.predictor, PARAMS.explain)
        self.explaining = 0  # requests with `explain` admitted and not yet answered (package.explain.max_pending)
        _warm_explanations(self.predictor, example)
        self.info = self.predictor.describe()
        self.version = self.info.get("version") or self.info.get("model_version") or self.predictor.version
        self.log = InferenceLogWriter(SETTINGS.log_url, queue_size=PARAMS.log.queue_size)
        log.info("model %s loaded (version %s)", SETTINGS.model_tag, self.version)

    @bentoml.on_deployment
    def _open_log() -> None:
        """Once, in the serving process before any worker starts: the log's server must answer, and its schema
        is created or migrated here (not raced by the workers). A server that is down stops `bentoml serve`
        with one line: a service answering without its log would lose every answer for monitoring and
        feedback. (A SQLite file briefly locked, as after a kill -9, is opened again by the writer threads.)"""
        try:
            logdb.check_reachable(SETTINGS.log_url)
            open_log(SETTINGS.log_url)
        except Exception as exc:
            if not logdb.is_sqlite(SETTINGS.log_url):
                raise SystemExit(f"mmfusion: {exc if isinstance(exc, logdb.LogUnavailable) else logdb.first_line(exc)}") from None
            log.warning("inference log %s: %s; the workers will try again", logdb.describe(SETTINGS.log_url), logdb.first_line(exc))
        finally:
            logdb.dispose(SETTINGS.log_url)  # the workers open their own connections

    async def __is_ready__(self) -> bool:
        return self.predictor is not None

    async def _classify(self, items: list[CheckedItem]) -> list[dict]:
        try:
            return await self.batcher.submit([item.to_predictor() for item in items])
        except Overloaded as exc:
            raise RequestError(503, "overloaded", f"the server is overloaded, try again later: {exc}") from exc

    def _record(self, ids: tuple[str, str | None], endpoint: str, items, results, latency_ms: float) -> None:
        """Queue one log record per item; never raises (a log failure must not fail the answer)."""
        request_id, client_id = ids
        try:
            self.log.submit(
                [
                    InferenceRecord(
                        request_id=request_id,
                        client_request_id=client_id,
                        item=i,
                        endpoint=endpoint,
                        model_version=self.version,
                        label=res["label"],
                        probabilities=res["probabilities"],
                        contributions=res.get("contributions", {}),
                        embeddings=res.get("embeddings", {}),
                        latency_ms=latency_ms,
                        **item.record,
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
    def _start(ctx: bentoml.Context) -> tuple[str, str | None]:
        """(our unique request id, the client's x-request-id when it sent a usable one)."""
        request_id = uuid.uuid4().hex
        client_id = ctx.request.headers.get("x-request-id")
        if client_id is not None and not _CLIENT_ID.match(client_id):
            client_id = None  # not echoed: headers must stay printable ASCII
        ctx.response.headers["x-request-id"] = request_id
        return request_id, client_id

    def _done(self, ids, endpoint: str, items: list[CheckedItem], results: list[dict], t0: float) -> dict:
        latency_ms = round((time.perf_counter() - t0) * 1000, 2)
        self._record(ids, endpoint, items, results, latency_ms)
        body = {"request_id": ids[0]}
        if ids[1] is not None:
            body["client_request_id"] = ids[1]
        return {**body, "model_version": self.version, "latency_ms": latency_ms}

    def _request_ctx(self) -> CheckContext:
        """The checks' context for one request: which raw inputs and which previews the log keeps, each drawn per
        modality with its share (package.log.keep, package.log.previews)."""
        draw = lambda shares: {m: random.random() < share for m, share in shares.items()}  # noqa: E731
        return dataclasses.replace(self.check_ctx, keep=draw(self.keep), previews=draw(self.previews))

    @staticmethod
    def _error(ctx: bentoml.Context, exc: RequestError) -> dict:
        ctx.response.status_code = exc.status
        return exc.to_json()

    @bentoml.api
    @modality_fields
    async def classify(
        self, ctx: bentoml.Context, *, explain: Explain = False, overlay: Overlay = False, **fields: t.Any
    ) -> JSON:
        """Classify one sample: one multipart field per modality, a file or a text (at least one). `explain` adds an
        `explanation` of the answer (mmfusion.explain), `overlay` heatmap PNGs of its images to it."""
        t0 = time.perf_counter()
        ids = self._start(ctx)
        admitted = False
        try:
            raw = _read_uploads(fields)  # first: it deletes BentoML's copies of the uploads, whatever follows
            _check_options(explain, overlay)
            admitted = explain and self._admit_explanation()
            item, parts = await anyio.to_thread.run_sync(self._check_one, raw, self._request_ctx(), explain)
            (result,) = await self._classify([item])
            extra = {"explanation": await self._explain(item, result, parts, overlay)} if explain else {}
        except RequestError as exc:
            return self._error(ctx, exc)
        finally:
            self.explaining -= admitted
        return {**self._answer(result, item), **extra, **self._done(ids, "classify", [item], [result], t0)}

    def _check_one(self, raw: dict, ctx: CheckContext, explain: bool) -> tuple[CheckedItem, dict | None]:
        """The checked item and, with `explain`, its explanation's parts: the cost bound is checked here, before
        anything is queued for the model (413 over package.explain.max_evaluations)."""
        item = check_item(raw, self.specs, ctx)
        if not explain:
            return item, None
        try:
            return item, self.explainer.check_cost(item.to_predictor())
        except ExplainTooCostly as exc:
            raise RequestError(413, "explanation_too_costly", str(exc)) from exc

    def _admit_explanation(self) -> bool:
        """Count one more explanation in this worker, or 429 when package.explain.max_pending are already in (they hold
        the model thread one after the other: more would only queue plain requests behind them)."""
        limit = PARAMS.explain.max_pending
        if limit and self.explaining >= limit:
            raise RequestError(429, "explanations_busy", f"{self.explaining} explanations are in progress on this worker "
                               f"(package.explain.max_pending: {limit}): try again shortly, or classify without explain")  # fmt: skip
        self.explaining += 1
        return True

    async def _explain(self, item: CheckedItem, result: dict, parts: dict, overlay: bool) -> dict:
        """The explanation of the answer's label, on the model thread between batched calls (MicroBatcher.call)."""
        return await self.batcher.call(self.explainer.explain, item.to_predictor(), overlay, result["label"], parts)

    @bentoml.api
    async def classify_batch(self, ctx: bentoml.Context, items: list[BatchItem]) -> JSON:
        """Classify a JSON list of items, each with one key per modality (files in base64); all or nothing. No
        explanations here: an explanation costs tens of model calls per item; ask /classify with explain=true."""
        t0 = time.perf_counter()
        ids = self._start(ctx)
        try:
            if not items:
                raise RequestError(400, "no_items", "items is empty: send at least one item")
            if len(items) > LIMITS.max_batch_items:
                raise RequestError(
                    413, "too_many_items", f"{len(items)} items, over the limit of {LIMITS.max_batch_items}"
                )
            checked = await anyio.to_thread.run_sync(self._check_batch, items, self._request_ctx())
            results = await self._classify(checked)
        except RequestError as exc:
            return self._error(ctx, exc)
        return {
            "results": [self._answer(r, it) for r, it in zip(results, checked)],
            **self._done(ids, "classify_batch", checked, results, t0),
        }

    def _check_batch(self, items: list[BatchItem], ctx: CheckContext) -> list[CheckedItem]:
        checked = []
        for i, it in enumerate(items):
            try:
                raw = it.model_dump()
                for m, spec in self.specs.items():  # file modalities travel as base64 in JSON
                    if spec.http == "file" and raw.get(m) is not None:
                        raw[m] = decode_base64(raw[m], LIMITS, m)
                checked.append(check_item(raw, self.specs, ctx))
            except RequestError as exc:
                exc.item = i
                exc.args = (f"item {i}: {exc}",)
                raise
        return checked

    @bentoml.api
    async def metadata(self) -> JSON:
        """Model version, labels, modalities, encoders, the winner's metrics, the input limits and how the service
        explains (package.explain)."""
        return {
            **self.info,
            "model_version": self.version,
            "model_tag": SETTINGS.model_tag,
            "batching": {
                "enabled": SETTINGS.batching,
                "max_batch_size": PARAMS.batching.max_batch_size,
                "max_latency_ms": PARAMS.batching.max_latency_ms,
            },
            "explain": dataclasses.asdict(PARAMS.explain),  # /classify's `explain`: method, cost bound, grid
            "limits": {
                "max_upload_bytes": LIMITS.max_upload_bytes,
                "max_pixels": LIMITS.max_pixels,
                "allowed_formats": list(LIMITS.allowed_formats),
                "max_text_chars": LIMITS.max_text_chars,
                "max_batch_items": LIMITS.max_batch_items,
                "timeout_s": PARAMS.timeout_s,
                "body_timeout_s": PARAMS.body_timeout_s,
                "max_concurrency_per_worker": PARAMS.max_concurrency,
            },
        }

    @bentoml.api
    async def health(self) -> JSON:
        """Service-wide counts read from the inference log, and this worker's own counters."""
        from mmfusion.compat import worker_index

        service = await anyio.to_thread.run_sync(_log_totals, self.log.url)
        return {
            "status": "ok",
            "service": {"workers": SETTINGS.workers, "inference_log": {"url": logdb.masked(self.log.url), **service}},
            "worker": {
                "index": worker_index(),
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 1),
                "inference_log": {
                    "open": self.log.healthy,
                    "written": self.log.written,
                    "failures": self.log.failures,
                    "queued": self.log.queued,
                },
                "model_calls": self.batcher.stats(),
                "auth": GATE.describe(),
            },
        }

    @bentoml.api
    async def feedback(self, ctx: bentoml.Context, request_id: str = "", label: str = "", item: int = 0) -> JSON:
        """The true label of an answered request (`item`: its index in a classify_batch request), stored next
        to the logged rows it labels; says whether it is usable for retraining (the raw image was kept)."""
        from mmfusion.monitoring.feedback import FeedbackError, add_feedback

        await anyio.to_thread.run_sync(self.log.flush, 5.0)  # this process's rows are written
        for attempt in range(6):  # another worker's writer may still hold the classify rows (ms)
            try:
                fb = await anyio.to_thread.run_sync(add_feedback, SETTINGS.log_url, request_id, item, label, self.info["labels"])
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


def _check_options(explain: bool, overlay: bool) -> None:
    """/classify's options that make sense together and that this service gives."""
    if overlay and not explain:
        raise RequestError(400, "overlay_without_explain", "overlay draws an explanation's heatmaps: send explain=true too")
    if overlay and not PARAMS.explain.overlay:
        raise RequestError(400, "overlay_off", "this service draws no overlays (package.explain.overlay is false): "
                           "leave overlay out; the explanation's numbers are in the answer")  # fmt: skip


def _warm_explanations(predictor: t.Any, item: dict) -> None:
    """One explanation of the warm-up item on a coarse grid (a few model evaluations), so that Captum's and
    matplotlib's imports (~0.5 s on 2 cores; kernel_shap and lime add scikit-learn's) and first calls are paid
    before /readyz, not by the first request with `explain`. A request without it never touches Captum."""
    t0 = time.perf_counter()
    coarse = Explainer(predictor, dataclasses.replace(PARAMS.explain, image_grid=2, audio_segments=2, samples=2))
    coarse.explain(item, overlay=PARAMS.explain.overlay, parts=coarse.parts(item))  # its parts given: no cost bound
    log.info("explanations (%s) warmed up in %.2f s", PARAMS.explain.method, time.perf_counter() - t0)


def _log_totals(url) -> dict:
    """Rows in the whole log (every worker and replica writes to it) and the time of the last one."""
    try:
        return log_totals(url)
    except Exception as exc:
        return {"rows": None, "error": f"cannot read the log: {logdb.first_line(exc)}"}


def _read_uploads(fields: dict[str, t.Any]) -> dict[str, t.Any]:
    """{modality: raw value}: file fields read into bytes, and BentoML's temporary copies deleted (every
    one, even when reading another fails), so that nothing of an upload outlives the request."""
    raw = dict(fields)
    uploads = [m for m, v in fields.items() if v is not None and FIELD_KINDS.get(m) == "file"]
    try:
        for m in uploads:
            raw[m] = Path(fields[m]).read_bytes()
    finally:
        for m in uploads:
            Path(fields[m]).unlink(missing_ok=True)
    return raw


install_safe_multipart()
quiet_client_errors()
MMFusion.add_asgi_middleware(
    RequestGuard,
    max_body_bytes=LIMITS.max_upload_bytes,
    body_timeout_s=PARAMS.body_timeout_s,
    timeout_s=PARAMS.timeout_s,
    max_concurrency=PARAMS.max_concurrency,
    gate=GATE,
    keepalive_requests=PARAMS.keepalive_requests,
)
