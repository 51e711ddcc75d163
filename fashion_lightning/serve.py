"""Serve a trained checkpoint over HTTP with LitServe: ``python -m fashion_lightning.serve ckpt_path=... port=8000``.

- ``POST /predict``: image files as the multipart form field ``file`` (one or several; any format Pillow reads, made
  to look like Fashion-MNIST exactly as ``predict`` does), or JSON ``{"pixels": ...}`` with one 28x28 image or a list
  of them (0-255, light on dark, taken as they are). Answers ``{"predictions": [{"prediction", "probability",
  "top"}, ...]}``, one per image; with the form field or JSON key ``return_input`` true, each also carries the
  28x28 ``input`` the model saw. A bad input gets a 4xx JSON ``{"detail": ...}`` naming the problem.
- ``GET /``: a page to try it (pick, drop or draw an image); ``GET /health``; ``GET /info``: model, classes,
  checkpoint.

Requests from many clients are batched into one forward pass (``max_batch_size``, ``batch_timeout``).

A killed inference worker (``kill -9``, the OOM killer) is started again: LitServe's ``restart_workers`` (0.2.x)
replaces it within about 2 s, ``/health`` answering 503 until the new one has loaded the model. Requests that
arrive meanwhile wait in the queue and are answered by the new worker; one the dead worker had taken is answered
504 after ``2 * timeout`` seconds instead of never (`FrontDoor`).

With an API key (``api_key``, by default ``$FASHION_LIGHTNING_API_KEY``), every request but ``GET /`` (the page)
and ``GET /health`` must carry it in the ``X-API-Key`` header, else 401; listening beyond 127.0.0.1 without a key
is refused unless ``allow_no_key=true``.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from fashion_lightning.app import (
    CONFIG_DIR,
    load_trained,
    probabilities,
    ranked,
    reported_as_one_line,
    set_up_process,
    with_launch_paths,
)
from fashion_lightning.data import images
from fashion_lightning.data.datamodule import CLASS_NAMES
from fashion_lightning.data.images import ImageError, open_image
from fashion_lightning.errors import UserError, check_positive_int
from fashion_lightning.lit.checkpoints import trained_model

try:  # the serve extra
    import litserve as ls
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.requests import Request
    from starlette.types import ASGIApp, Receive, Scope, Send
except ModuleNotFoundError as missing:
    if __name__ == "__main__":
        sys.exit('error: serving needs the serve extra: pip install "fashion_lightning[serve]"')
    raise ModuleNotFoundError('fashion_lightning.serve needs the serve extra: pip install "fashion_lightning[serve]"'
                              ) from missing

PAGE = files("fashion_lightning").joinpath("serve_page.html")


@dataclass
class Rejected:
    """A request that cannot be answered: the HTTP status and what was wrong with it."""

    status: int
    detail: str


@dataclass
class Images:
    """A request's images, (N, 28, 28) uint8, and whether the answer shows them."""

    pixels: torch.Tensor
    return_input: bool


def truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


def pixels_from_json(value: Any) -> torch.Tensor:
    """JSON pixel values -> (N, 28, 28) uint8, rounded; a `ValueError` names what is wrong."""
    if not isinstance(value, list):
        raise ValueError("'pixels' must be numbers in a 28x28 array or a list of them")
    try:
        array = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError("'pixels' must be numbers in a 28x28 array or a list of them") from None
    shape = tuple(array.shape)
    array = array[None] if array.dim() == 2 else array
    if array.dim() != 3 or array.shape[1:] != (28, 28) or len(array) == 0:
        raise ValueError(f"'pixels' must be 28x28 or N x 28 x 28, got shape {shape}")
    if not torch.isfinite(array).all():
        raise ValueError("'pixels' must be finite numbers (found NaN or infinity)")
    if array.min() < 0 or array.max() > 255:
        raise ValueError(f"'pixels' must lie in 0-255, got {array.min():g} to {array.max():g}")
    return array.round().to(torch.uint8)


class FashionMNISTAPI(ls.LitAPI):
    """The LitServe API of a fashion_lightning checkpoint: decode (in the inference worker), batch, predict."""

    def __init__(self, ckpt_path: str, top_k: int = 3, invert: str = "auto", max_images: int = 64,
                 max_megapixels: float = 64, max_batch_size: int = 16, batch_timeout: float = 0.002,
                 threads: int = 1) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.ckpt_path, self.top_k, self.invert, self.max_images, self.max_megapixels, self.threads = (
            ckpt_path, top_k, invert, max_images, max_megapixels, threads)

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.model, self.scale = trained_model(self.ckpt_path)
        self.model.to(device)

    def decode_request(self, request):  # no annotation: LitServe would read it as the request type
        """A multipart form or a JSON body -> `Images`; a bad one -> `Rejected` (so that a batch's other requests
        are still answered: LitServe fails a whole batch on an exception)."""
        try:
            if isinstance(request, dict):
                if "pixels" not in request:
                    return Rejected(400, "JSON must hold 'pixels': a 28x28 array of 0-255 values or a list of them")
                pixels = pixels_from_json(request["pixels"])
                if len(pixels) > self.max_images:
                    return Rejected(413, f"at most {self.max_images} images a request, got {len(pixels)}")
                return Images(pixels, truthy(request.get("return_input")))
            uploads = request.getlist("file")
            if not uploads:
                return Rejected(400, "no image: send it as the multipart form field 'file'")
            if len(uploads) > self.max_images:
                return Rejected(413, f"at most {self.max_images} images a request, got {len(uploads)}")
            if any(isinstance(upload, str) for upload in uploads):
                return Rejected(400, "form field 'file' holds text, not a file")
            files = [(upload.filename or f"file {i + 1}", upload.file.read()) for i, upload in enumerate(uploads)]
            megapixels = sum(images.pixel_count(data) for _, data in files) / 1e6
            if megapixels > self.max_megapixels:
                return Rejected(413, f"{megapixels:.1f} megapixels in one request; at most {self.max_megapixels:g}")
            pixels = []
            for name, data in files:
                try:
                    pixels.append(open_image(io.BytesIO(data), self.invert))
                except ImageError as err:
                    status = {images.NotAnImage: 415, images.ImageTooLarge: 413}.get(type(err), 400)
                    return Rejected(status, f"{name}: {err}")
            return Images(torch.stack(pixels), truthy(request.get("return_input")))
        except ValueError as err:
            return Rejected(400, str(err))
        except Exception as err:  # noqa: BLE001 - a request must never fail the other requests batched with it
            return Rejected(400, f"unreadable request ({type(err).__name__}: {err})")

    def batch(self, inputs: list[Images | Rejected]) -> list[Images | Rejected]:
        return inputs  # `predict` concatenates the good ones

    def predict(self, x: Any) -> Any:
        """One forward pass over every image of the batch (or of the one request, unbatched)."""
        requests = x if isinstance(x, list) else [x]
        good = [r for r in requests if isinstance(r, Images)]
        probs = iter(probabilities(self.model, torch.cat([r.pixels for r in good]).to(self.model.device), self.scale)
                     .cpu().split([len(r.pixels) for r in good]) if good else ())
        answers = [(r, next(probs)) if isinstance(r, Images) else r for r in requests]
        return answers if isinstance(x, list) else answers[0]

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output):  # no annotation: LitServe would read it as the response type
        """An answer -> 200 ``{"predictions": [...]}``; a `Rejected` -> its 4xx ``{"detail": ...}``."""
        if isinstance(output, Rejected):
            return JSONResponse({"detail": output.detail}, status_code=output.status)
        request, probs = output
        answers = [ranked(p, self.top_k) for p in probs]
        if request.return_input:
            for answer, pixels in zip(answers, request.pixels, strict=True):
                answer["input"] = pixels.tolist()
        return JSONResponse({"predictions": answers})


class FrontDoor:
    """ASGI middleware in front of LitServe's routes: ``GET /`` answers the page; with an API key, any other request
    but ``GET /health`` without it is refused with a 401 before its body is read; a ``POST /predict`` body that is
    too large, of another content type, or not parseable is refused with a 4xx here (LitServe would answer such
    bodies with a 500). The body is then handed on unchanged, and a request LitServe has not answered within
    ``answer_within`` seconds (one taken by a worker that died: LitServe would wait for it forever) gets a 504."""

    def __init__(self, app: ASGIApp, page: bytes, max_bytes: int, api_key: str | None, answer_within: float) -> None:
        self.app, self.page, self.max_bytes, self.answer_within = app, page, max_bytes, answer_within
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            return await HTMLResponse(self.page)(scope, receive, send)
        if self.api_key and scope["path"] != "/health" and not self.authorized(scope):
            detail = "missing or wrong API key: send it in the X-API-Key header"
            return await JSONResponse({"detail": detail}, status_code=401)(scope, receive, send)
        if scope["path"] != "/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, problem = await self.read_body(receive)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        if problem is None:
            problem = await self.check(Request(scope, replay), body)
            replayed = False
        if problem is not None:
            return await JSONResponse({"detail": problem.detail}, status_code=problem.status)(scope, receive, send)
        await self.answered_in_time(scope, replay, send)

    def authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"x-api-key", b"")
        return hmac.compare_digest(given, self.api_key)

    async def answered_in_time(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, watched), self.answer_within)
        except asyncio.TimeoutError:
            if started:
                raise
            detail = f"no answer in {self.answer_within:g} s (the inference worker died or is overloaded); try again"
            await JSONResponse({"detail": detail}, status_code=504)(scope, receive, send)

    async def read_body(self, receive: Receive) -> tuple[bytes, Rejected | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", Rejected(400, "the client went away")
            size += len(message.get("body", b""))
            if size <= self.max_bytes:
                chunks.append(message.get("body", b""))
            if not message.get("more_body", False) or size > 4 * self.max_bytes:  # read on: the client hears us
                break
        if size > self.max_bytes:
            return b"", Rejected(413, f"request body over {self.max_bytes / 2**20:g} MB")
        return b"".join(chunks), None

    @staticmethod
    async def check(request: Request, body: bytes) -> Rejected | None:
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("multipart/form-data"):
            try:
                async with request.form():
                    return None
            except Exception as err:  # noqa: BLE001 - starlette's parser errors: a malformed form
                return Rejected(400, f"malformed multipart form ({getattr(err, 'detail', err)})")
        if content_type.split(";")[0].strip() == "application/json":
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError) as err:
                return Rejected(400, f"malformed JSON ({type(err).__name__}: {err})"[:300])
            return None if isinstance(payload, dict) else Rejected(400, "JSON must be an object: {\"pixels\": ...}")
        return Rejected(415, f"content type {content_type or 'none'!r}: send an image as the multipart form field "
                             "'file', or JSON {\"pixels\": ...}")


def build_server(cfg: DictConfig) -> ls.LitServer:
    """A `LitServer` for ``cfg`` (see ``conf/serve.yaml``), its model checked before any process starts."""
    cfg = with_launch_paths(cfg, "ckpt_path")
    if cfg.invert not in images.INVERT:
        raise UserError(f"invert must be one of {', '.join(images.INVERT)}, got {cfg.invert!r}")
    for key in ("top_k", "max_images", "max_batch_size", "workers", "threads"):
        check_positive_int(key, cfg[key])
    for key in ("max_upload_mb", "max_megapixels", "batch_timeout", "timeout"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int | float) or not cfg[key] > 0:
            raise UserError(f"{key} must be a positive number, got {cfg[key]!r}")
    if cfg.batch_timeout >= cfg.timeout:
        raise UserError(f"batch_timeout must be less than timeout ({cfg.timeout:g} s), got {cfg.batch_timeout:g}")
    path, model, scale = load_trained(cfg, "serve")
    api = FashionMNISTAPI(str(path.resolve()), cfg.top_k, cfg.invert, cfg.max_images,
                          cfg.max_megapixels, cfg.max_batch_size, float(cfg.batch_timeout), cfg.threads)
    info = {"name": type(model).__name__, "classes": list(CLASS_NAMES), "checkpoint": api.ckpt_path,
            "parameters": sum(p.numel() for p in model.parameters()), "scaled_inputs": scale, "top_k": cfg.top_k,
            "max_images": cfg.max_images, "max_upload_mb": cfg.max_upload_mb}
    page = PAGE.read_bytes()
    door = {"page": page, "max_bytes": int(cfg.max_upload_mb * 2**20), "api_key": cfg.api_key,
            "answer_within": 2 * float(cfg.timeout)}
    return ls.LitServer(api, accelerator="cpu", workers_per_device=cfg.workers, model_metadata=info,
                        timeout=float(cfg.timeout), restart_workers=True, middlewares=[(FrontDoor, door)])


def check_access(cfg: DictConfig) -> None:
    """A `UserError` for an unusable ``api_key`` (not a non-empty string, or not what an HTTP header carries intact;
    the key itself never shown), or for a server listening beyond 127.0.0.1 without one unless ``allow_no_key`` says
    so (then a warning on stderr)."""
    key = cfg.api_key
    if key is not None and (not isinstance(key, str) or not key):
        got = "an empty string" if key == "" else f"a value of type {type(key).__name__}"
        raise UserError(f"api_key (or $FASHION_LIGHTNING_API_KEY) must be a non-empty string or null, got {got}")
    if key is not None and not (key.isascii() and key.isprintable() and key == key.strip()):
        raise UserError("api_key (or $FASHION_LIGHTNING_API_KEY) must be printable ASCII without leading or trailing "
                        "spaces: clients send it in an HTTP header")
    if key is None and cfg.host in ("0.0.0.0", "::"):
        if not cfg.allow_no_key:
            raise UserError(f"host={cfg.host} listens beyond this machine without an API key; set "
                            "FASHION_LIGHTNING_API_KEY, or allow_no_key=true to serve it open")
        print(f"warning: host={cfg.host} without an API key: anyone who reaches the port can use it",
              file=sys.stderr)


def check_port(host: str, port: Any) -> None:
    """A clear error now for a port LitServe could not listen on (it would fail inside a child process)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535:
        raise UserError(f"port must be an integer in 1024-65535, got {port!r}")
    if host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise UserError(f"host must be 127.0.0.1, 0.0.0.0 or ::, got {host!r}")
    with socket.socket(socket.AF_INET6 if host == "::" else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a just-stopped server's port is free
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} is already in use on {host}; choose another: port=8001") from None
            raise


@contextmanager
def in_background(ckpt_path: str | Path, *overrides: str, timeout: float = 180) -> Iterator[str]:
    """``python -m fashion_lightning.serve`` for ``ckpt_path`` (and ``overrides``, e.g. ``max_batch_size=1``) as a
    background process on a free port; yields its URL once ``/health`` answers, and stops it (its workers too) on
    exit. A server that exits (the end of its log in the message) or stays unhealthy for ``timeout`` seconds raises
    `RuntimeError`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tempfile.TemporaryFile()  # not a pipe: a server that logs much must never block on it
    command = [sys.executable, "-m", "fashion_lightning.serve", f"ckpt_path={ckpt_path}", f"port={port}", *overrides]
    process = subprocess.Popen(command, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited ({process.returncode}): {log.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not become healthy in {timeout:g} s") from None
                time.sleep(0.25)
        yield url
    finally:  # the whole process group: LitServe's workers and queue manager too, even if the server died
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)  # LitServe's graceful shutdown
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    with reported_as_one_line():
        check_access(cfg)
        check_port(cfg.host, cfg.port)
        server = build_server(cfg)
    server.run(host=cfg.host, port=cfg.port, generate_client_file=False, log_level=cfg.log_level)


if __name__ == "__main__":
    set_up_process()
    main()
