"""Load on ``python -m fashion_lightning.serve``: N concurrent clients, each posting one image per request.

    python benchmarks/serve_load.py --ckpt outputs/runs/<time>/checkpoints/best.ckpt   # starts a server itself
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 16 --seconds 20
    python benchmarks/serve_load.py --ckpt ... max_batch_size=1 workers=2     # the server's settings
    FASHION_LIGHTNING_API_KEY=... python benchmarks/serve_load.py --url ...   # a server with an API key

Each client (a thread with its own keep-alive connection) posts test-set images as PNG files in the multipart field
``file``, one per request, back to back; every answer is checked against the class the server gave that image when
asked alone before the load. Prints predictions/s and the p50 / p99 latency over the timed window (after a warm-up),
and the errors, if any. The test images come from the real data (``--data-dir``, else the app's) or, without it,
synthetic ones. A server's API key (``--api-key``, by default ``$FASHION_LIGHTNING_API_KEY``, as the server reads it)
goes in every request's ``X-API-Key`` header; with ``--ckpt`` the server started is given the same key.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image

BOUNDARY = "fashionlightningload"
KEY_VARIABLE = "FASHION_LIGHTNING_API_KEY"  # the server's, conf/serve.yaml


def multipart(png: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"item.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def test_pngs(n: int, data_dir: str | None) -> list[bytes]:
    """``n`` test images as PNG files: the real test set where it can be read, else synthetic blocks."""
    try:
        from fashion_lightning.data.idx_files import ensure_raw_files, load_split

        folder = data_dir or "data"
        ensure_raw_files(folder, download=False)
        images = load_split(folder, train=False)[0][:n].numpy()
    except Exception:  # noqa: BLE001 - no real data: the cost of serving does not depend on it
        rng = np.random.default_rng(0)
        images = (np.kron(rng.random((n, 7, 7)) > 0.5, np.ones((4, 4))) * 200).astype(np.uint8)
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def request_headers(api_key: str | None) -> dict[str, str]:
    """The headers of every request: the multipart body's type, and the server's API key if there is one."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    if api_key:
        headers["X-API-Key"] = api_key
    return headers


def post(connection: http.client.HTTPConnection, body: bytes, headers: dict[str, str]) -> dict:
    connection.request("POST", "/predict", body, headers)
    response = connection.getresponse()
    payload = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
    return json.loads(payload)


def client(url: str, bodies: list[bytes], headers: dict[str, str], expected: list[str], start: int,
           stop_at: list[float], warm_until: float, latencies: list[float], errors: list[str]) -> None:
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    i = start
    while time.perf_counter() < stop_at[0]:
        k = i % len(bodies)
        begin = time.perf_counter()
        try:
            answer = post(connection, bodies[k], headers)["predictions"][0]["prediction"]
            if answer != expected[k]:
                errors.append(f"image {k}: {answer} under load, {expected[k]} alone")
        except Exception as err:  # noqa: BLE001 - counted and reported
            errors.append(repr(err))
            connection.close()
            connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
        end = time.perf_counter()
        if begin >= warm_until and end <= stop_at[0]:
            latencies.append(end - begin)
        i += 1
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--ckpt", help="a checkpoint: start a server for it on a free port, and stop it after")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="timed window, after --warmup")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before timing")
    parser.add_argument("--images", type=int, default=256, help="distinct test images the clients cycle through")
    parser.add_argument("--data-dir", default=None, help="where the real Fashion-MNIST files are (paths.data_dir)")
    parser.add_argument("--api-key", default=os.environ.get(KEY_VARIABLE) or None,
                        help=f"the server's API key, sent as X-API-Key (default: ${KEY_VARIABLE}; prefer the variable: "
                             "a command line is visible to other users)")
    parser.add_argument("overrides", nargs="*", help="with --ckpt: the server's settings, e.g. max_batch_size=1")
    args = parser.parse_args()
    for name in ("clients", "images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be positive and --warmup not negative")
    if args.overrides and not args.ckpt:
        parser.error("server settings need --ckpt (this script then starts the server)")
    key = args.api_key
    if key is not None and not (key.isascii() and key.isprintable() and key and key == key.strip()):
        parser.error("--api-key must be printable ASCII without leading or trailing spaces (it goes in a header)")
    headers = request_headers(key)
    with ExitStack() as stack:
        if args.ckpt:
            from fashion_lightning.serve import in_background

            if key:  # the server reads its key from the environment it inherits
                os.environ[KEY_VARIABLE] = key
            url = stack.enter_context(in_background(Path(args.ckpt).resolve(), *args.overrides))
        else:
            url = args.url.rstrip("/")
        bodies = [multipart(png) for png in test_pngs(args.images, args.data_dir)]
        parsed = urlparse(url)
        solo = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
        try:
            expected = [post(solo, body, headers)["predictions"][0]["prediction"] for body in bodies]
        except (RuntimeError, OSError) as err:  # one clear line: a wrong key, a wrong URL
            hint = f" (give the server's key: ${KEY_VARIABLE} or --api-key)" if "HTTP 401" in str(err) else ""
            raise SystemExit(f"error: {url}/predict: {err}{hint}") from None
        solo.close()
        latencies: list[float] = []
        errors: list[str] = []
        now = time.perf_counter()
        warm_until, stop_at = now + args.warmup, [now + args.warmup + args.seconds]
        threads = [threading.Thread(target=client, args=(url, bodies, headers, expected, c * 7, stop_at, warm_until,
                                                         latencies, errors)) for c in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if not latencies:
        raise SystemExit(f"no request completed in the timed window; errors: {errors[:3]}")
    ms = sorted(1000 * t for t in latencies)
    print(f"{args.clients} clients, {args.seconds:g} s timed after {args.warmup:g} s warm-up, one PNG per request: "
          f"{len(ms) / args.seconds:.0f} predictions/s, latency p50 {statistics.median(ms):.1f} ms, "
          f"p99 {ms[min(len(ms) - 1, int(0.99 * len(ms)))]:.1f} ms, max {ms[-1]:.1f} ms; "
          f"{len(errors)} errors{': ' + errors[0] if errors else ''}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
