"""Serve mode: the model behind HTTP, for applications and for people.

- ``POST /v1/models/<name>:predict`` and ``GET /v1/models/<name>``: TensorFlow Serving's
  REST dialect (``{"instances": [{"b64": ...}]}`` in, ``{"predictions": [...]}`` out, as
  the exported SavedModel's signature: ``probabilities``, ``classes``, ``scores``), so
  existing clients work unchanged. ``<name>`` is the model file's stem.
- ``POST /classify``: one image (a multipart upload or the raw bytes), the same JSON as
  ``--mode classify --json`` (the model named by its file name, never its path).
- ``GET /healthz``; ``GET /``: a page to pick or drop a photo on.

What one client can do to the others is bounded (``guards.py``): a request head that
does not arrive in time, or is too large, closes its connection; a body over
``--max_body_mb`` gets 413 as it arrives, whatever its encoding; and the decoding work of
one request is bounded in pixels per image and per request before anything is decoded.

Starlette (the ASGI toolkit FastAPI is built on; we need its routing and requests, not
schemas) in uvicorn, the standard production ASGI server. Predictions run on LiteRT
when the model's verified ``.tflite`` copy is there (no TensorFlow import), else Keras,
one call at a time (the interpreter is not thread-safe); requests that arrive while a
call runs are batched into the next one (:class:`Batcher`). Every error is a JSON
``{"error": ...}`` with its status.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import signal
import socket
import threading
from pathlib import Path

import numpy as np

from . import multilabel, unknown
from .config import ClassifyConfig, ServeConfig
from .errors import DataError
from .images import decode_stream, pixels_to_decode
from .results import ClassifyResult, top_classes
from .runtime import open_model

log = logging.getLogger(__name__)

UPLOAD_PAGE = Path(__file__).with_name("serve_page.html")  # GET /: pick or drop a photo


class Batcher:
    """Predictions for concurrent callers, batched: one predictor call for all who wait.

    A caller that finds the predictor idle leads: it runs the waiting images (its own
    first among them) in one call, again until its own are answered, then hands the lead
    to the next waiting caller, so nobody serves others for ever. Callers that arrive while
    a call runs wait for the next one. Nothing waits on a timer: a lone request runs at
    once, and under load batches grow by themselves (TensorFlow Serving's batching waits
    up to a timeout instead; a timer would add its wait to every request here, where most
    of a request's time is the call). One batch holds at most ``max_images``.
    """

    def __init__(self, predict, max_images: int = 64):
        self._predict, self._max = predict, max_images
        self._waiting: list[_Waiting] = []
        self._lock = threading.Lock()  # guards _waiting and _busy, never held during a call
        self._busy = False
        self.calls = 0  # predictor calls so far (the tests count them)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        me = _Waiting(pixels)
        with self._lock:
            self._waiting.append(me)
            lead, self._busy = not self._busy, True
        if not lead:
            me.woken.wait()  # answered, or handed the lead
        if not me.done:
            self._lead_until(me)
        if me.error is not None:
            raise me.error
        return me.result

    def _lead_until(self, me: _Waiting) -> None:
        try:
            while not me.done:
                with self._lock:
                    batch = self._take()
                self._run(batch)
        finally:  # whatever happened, the lead passes on: a stuck lead would hang every later request
            with self._lock:
                if self._waiting:
                    self._waiting[0].woken.set()  # the next leader; the predictor stays busy
                else:
                    self._busy = False

    def _take(self) -> list[_Waiting]:
        """The oldest waiting callers, up to ``max_images`` images (at least one caller)."""
        batch, images = [], 0
        while self._waiting and (not batch or images + len(self._waiting[0].pixels) <= self._max):
            batch.append(self._waiting.pop(0))
            images += len(batch[-1].pixels)
        return batch

    def _run(self, batch: list[_Waiting]) -> None:
        self.calls += 1
        try:
            out = self._predict(np.concatenate([w.pixels for w in batch]))
            for w, part in zip(batch, _rows_of(out, np.cumsum([len(w.pixels) for w in batch]))):
                w.result = part
        except Exception as e:  # noqa: BLE001 (each caller re-raises it)
            for w in batch:
                w.error = e
        finally:  # every caller of the batch is answered, even if the call was cut short
            for w in batch:
                if w.result is None and w.error is None:
                    w.error = RuntimeError("the prediction was interrupted")
                w.done = True
                w.woken.set()


def _rows_of(out, ends: np.ndarray) -> list:
    """Each caller's rows of a batch's output: an array, or a tuple of arrays (None for each caller when None)."""
    if isinstance(out, tuple):
        return list(zip(*(_rows_of(o, ends) if o is not None else [None] * len(ends) for o in out)))
    return np.split(out, ends[:-1])


class _Waiting:
    """One caller's images and, once their batch has run, its answer."""

    def __init__(self, pixels: np.ndarray):
        self.pixels, self.result, self.error, self.done = pixels, None, None, False
        self.woken = threading.Event()


class ServedModel:
    """The served model: its name, metadata and a predictor that batches concurrent requests."""

    def __init__(self, model_path: Path, classify: ClassifyConfig):
        self.path = Path(model_path)
        self.name = self.path.name.split(".")[0]
        self.predictor = open_model(self.path)
        self.metadata = self.predictor.metadata
        self.classify = classify
        unknown.check_predictor(self.predictor, classify.unknown)  # --unknown without a detector: refused at start
        # LiteRT's time grows with the batch (bench/serve_bench.py), so batching would only
        # enlarge its memory arena; Keras' time is mostly per call (bench/README.md, "serve").
        self.batcher = Batcher(self.predictor.predict, max_images=1 if self.predictor.runtime == "litert" else 64)

    def probabilities(self, images: list[bytes], config: ServeConfig = ServeConfig()) -> np.ndarray:  # noqa: B008 (frozen)
        """The images' probabilities (:meth:`predict`)."""
        return self.predict(images, config)[0]

    def predict(self, images: list[bytes], config: ServeConfig = ServeConfig()) -> tuple:  # noqa: B008 (frozen)
        """Decode and predict: the probabilities and the distances (None without a detector). ValueError names the
        first image that cannot be read, TooMuchWork an image or a request over the pixel bounds (read from the
        headers, before decoding)."""
        size = self.metadata["image_size"]
        per_image, per_request = config.max_megapixels * 1e6, config.max_request_megapixels * 1e6
        names = [f"image {i}" for i in range(len(images))] if len(images) > 1 else ["the image"]
        total = 0
        for which, content in zip(names, images):
            pixels = _read(pixels_to_decode, content, size, which)
            if pixels > per_image:
                raise TooMuchWork(
                    f"{which} decodes to {pixels / 1e6:.1f} megapixels, more than {config.max_megapixels:g} (--max_megapixels)"
                )
            total += pixels
        if total > per_request:
            raise TooMuchWork(
                f"the images decode to {total / 1e6:.1f} megapixels in all, more than {config.max_request_megapixels:g} "
                "(--max_request_megapixels): send fewer or smaller images"
            )
        return self.batcher(np.stack([_read(decode_stream, content, size, which) for which, content in zip(names, images)]))


def _read(reader, content: bytes, size: int, which: str):
    """``reader`` (the header's pixels, or the decoder) on one uploaded image; ValueError names ``which``."""
    try:
        return reader(io.BytesIO(content), size)
    except ValueError as e:
        raise ValueError(f"cannot read {which}: {e}") from None


class TooMuchWork(ValueError):
    """A request whose images would cost more decoding than the server allows one request (413)."""


# ---------------------------------------------------------------- the endpoints
# Module-level Starlette endpoints: the model and the settings are the app's state
# (``request.app.state.model``, ``.config``), set by :func:`build_app`.


async def _body(request) -> bytes:
    """The request body (a body over --max_body_mb is refused with 413 as it arrives: guards.BodyGuard)."""
    return b"".join([chunk async for chunk in request.stream()])


async def _image_of(request) -> tuple[bytes, str]:
    """The uploaded image and its name: a multipart form's first file, or the raw body."""
    from starlette.exceptions import HTTPException

    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        limit = request.app.state.config.max_body_bytes  # the whole body's limit is guards.BodyGuard's
        async with request.form(max_files=1, max_fields=8, max_part_size=limit) as form:
            upload = next((v for v in form.values() if hasattr(v, "read")), None)
            if upload is None:
                raise HTTPException(400, "the form holds no file: send the image as a file field")
            return await upload.read(), upload.filename or "upload"
    return await _body(request), "upload"


async def _predicted(request, images: list[bytes]) -> list[tuple]:
    """Each image's probabilities and its distance (None without a detector)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    try:
        probabilities, distances = await run_in_threadpool(request.app.state.model.predict, images, request.app.state.config)
        return list(zip(probabilities, [None] * len(images) if distances is None else distances))
    except TooMuchWork as e:
        raise HTTPException(413, str(e)) from None
    except ValueError as e:
        raise HTTPException(400, str(e)) from None


async def classify_endpoint(request):
    """``POST /classify``: one image, the same JSON as ``--mode classify --json``."""
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    model = request.app.state.model
    content, name = await _image_of(request)
    if not content:
        raise HTTPException(400, "the body is empty: send an image (raw bytes or a multipart upload)")
    probabilities, distance = (await _predicted(request, [content]))[0]
    top = top_classes(probabilities, model.metadata["class_names"], model.classify.top_k)
    labels = multilabel.answer_of(probabilities, model.metadata, model.classify.min_confidence)
    novelty = unknown.novelty(distance, model.metadata)
    # The model's file name, never its path: where it lies on the server's disk is for the server's own log.
    where = (name, model.path.name, model.predictor.runtime)
    result = ClassifyResult(*where, top, model.classify.min_confidence, None, labels, novelty, model.classify.unknown)
    return JSONResponse(result.as_dict())


def _check_name(model: ServedModel, name: str) -> None:
    from starlette.exceptions import HTTPException

    if name != model.name:
        raise HTTPException(404, f"Servable not found for request: Latest({name}); this server has {model.name}")


async def status_endpoint(request):
    """``GET /v1/models/<name>``: TensorFlow Serving's model status."""
    from starlette.responses import JSONResponse

    _check_name(request.app.state.model, request.path_params["name"])
    state = {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    return JSONResponse({"model_version_status": [state]})


async def predict_endpoint(request):
    """``POST /v1/models/<name>:predict``: TensorFlow Serving's REST predict."""
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    model = request.app.state.model
    name, _, verb = request.path_params["target"].partition(":")
    _check_name(model, name)
    if verb != "predict":
        raise HTTPException(404, f"unknown method {verb or '(none)'}: this server answers :predict")
    try:
        payload = json.loads(await _body(request))
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
        raise HTTPException(400, 'the body is not JSON: send {"instances": [{"b64": "..."}]}') from None
    images, columnar = instances_of(payload)
    rows = [predict_row(p, d, model) for p, d in await _predicted(request, images)]
    if columnar:
        keys = tuple(rows[0]) if rows else ("probabilities", "classes", "scores")
        return JSONResponse({"outputs": {key: [r[key] for r in rows] for key in keys}})
    return JSONResponse({"predictions": rows})


def predict_row(probabilities: np.ndarray, distance, model: ServedModel) -> dict:
    """One instance of a :predict answer; a multi-label model adds the labels at or above their thresholds,
    a model with an unknown detector the distance (``unknown.novelty``)."""
    names = model.metadata["class_names"]
    row = {
        "probabilities": probabilities.tolist(),
        "classes": names[int(probabilities.argmax())],
        "scores": float(probabilities.max()),
    }
    labels = multilabel.answer_of(probabilities, model.metadata, model.classify.min_confidence)
    return row | ({"labels": labels} if labels is not None else {}) | (unknown.novelty(distance, model.metadata) or {})


async def healthz_endpoint(request):
    from starlette.responses import JSONResponse

    model = request.app.state.model
    return JSONResponse({"status": "ok", "model": model.name, "runtime": model.predictor.runtime})


async def page_endpoint(request):
    from starlette.responses import HTMLResponse

    return HTMLResponse(UPLOAD_PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": PAGE_POLICY})


def _error(status: int, message: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _http_error(request, exc):
    return _error(exc.status_code, str(exc.detail), exc.headers)


async def _unexpected(request, exc: Exception):
    log.error(f"{request.method} {request.url.path}: {type(exc).__name__}: {exc}")
    return _error(500, "internal error (the server log says more)")


async def _disconnected(request, exc):
    return _error(400, "the client went away before sending the whole body")


def build_app(model: ServedModel, config: ServeConfig):
    """The ASGI application serving ``model``: every error is a JSON ``{"error": ...}`` with its status."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.routing import Route

    routes = [
        Route("/", page_endpoint),
        Route("/healthz", healthz_endpoint),
        Route("/classify", classify_endpoint, methods=["POST"]),
        Route("/v1/models/{name}", status_endpoint),
        Route("/v1/models/{target:path}", predict_endpoint, methods=["POST"]),
    ]
    handlers = {HTTPException: _http_error, ClientDisconnect: _disconnected, Exception: _unexpected}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.model, app.state.config = model, config
    from .guards import BodyGuard, RequestLog

    return RequestLog(BodyGuard(app, config.max_body_bytes, config.request_timeout))


PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; connect-src 'self'; "
    "form-action 'none'; base-uri 'none'"
)


def instances_of(payload) -> tuple[list[bytes], bool]:
    """The images of a TensorFlow Serving request, and whether it is columnar (``inputs``).

    Accepted: ``{"instances": [{"b64": ...}, ...]}``, ``{"instances": [{"image_bytes":
    {"b64": ...}}]}`` (the SavedModel's input name), and ``{"inputs": ...}`` with either.
    """
    from starlette.exceptions import HTTPException

    if not isinstance(payload, dict) or ("instances" in payload) == ("inputs" in payload):
        raise HTTPException(400, 'send {"instances": [{"b64": "<base64 image>"}, ...]} (or "inputs")')
    columnar = "inputs" in payload
    items = payload["inputs"] if columnar else payload["instances"]
    if isinstance(items, dict) and "image_bytes" in items:
        items = items["image_bytes"]
    if not isinstance(items, list) or not items:
        raise HTTPException(400, '"instances" must be a non-empty list of {"b64": "<base64 image>"}')
    if len(items) > 64:
        raise HTTPException(413, "at most 64 instances per request")
    images = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("image_bytes"), dict):
            item = item["image_bytes"]
        if not isinstance(item, dict) or not isinstance(item.get("b64"), str):
            raise HTTPException(400, f'instance {i} is not {{"b64": "<base64 image>"}}')
        try:
            images.append(base64.b64decode(item["b64"], validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"instance {i}: b64 is not valid base64") from None
    return images, columnar


def serve(model_path, config: ServeConfig | None = None, classify: ClassifyConfig | None = None) -> None:
    """Serve ``model_path`` until SIGTERM or Ctrl-C; in-flight requests finish first."""
    import uvicorn

    from .guards import GuardedHttpTools

    config = config or ServeConfig()
    model = ServedModel(Path(model_path), classify or ClassifyConfig())
    app = build_app(model, config)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
        sock.listen(2048)  # connections wait in the backlog from now on, even before uvicorn accepts them
    except OSError as e:
        sock.close()
        raise DataError(f"cannot listen on {config.host}:{config.port}: {e.strerror} (--host, --port)") from None
    host, port = sock.getsockname()[:2]
    log.info(
        f"Serving {model.path} ({len(model.metadata['class_names'])} classes, {model.predictor.runtime}) "
        f"on http://{host}:{port}/ (TensorFlow Serving API at /v1/models/{model.name}); Ctrl-C or SIGTERM stops"
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            http=functools.partial(GuardedHttpTools, head_timeout=config.request_timeout),  # guards.py
            ws="none",  # no WebSocket endpoint: an Upgrade header is ignored (guards.GuardedHttpTools)
            log_config=None,  # our logger: one line per request (guards.RequestLog)
            access_log=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=config.request_timeout,
            limit_concurrency=config.max_connections,
        )
    )
    # uvicorn stops on SIGTERM or SIGINT after the requests in flight, then raises the
    # signal again for the handlers it found: make those no-ops, so that a clean stop
    # exits 0 (the CLI's own handlers would turn it into an interrupted run).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    server.run(sockets=[sock])
    log.info("Stopped: every request in flight was answered")
