"""python -m fashion_lightning.serve: answers as `predict` gives them, every bad input a 4xx, many clients at once."""

from __future__ import annotations

import ast
import http.client
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from conftest import huge_png, synthetic_split
from fashion_lightning.app import CONFIG_DIR, probabilities
from fashion_lightning.data.datamodule import CLASS_NAMES
from fashion_lightning.data.images import open_image
from fashion_lightning.lit.checkpoints import trained_model
from fashion_lightning.predict import predict

requests = pytest.importorskip("requests", reason="the serve tests need requests (pip install -e '.[test]')")
serve = pytest.importorskip("fashion_lightning.serve", reason="needs the serve extra: pip install -e '.[serve]'")
pixels_from_json = serve.pixels_from_json
ROOT = Path(__file__).resolve().parents[1]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def items() -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Twenty synthetic test-like images as PNG files, their pixels and labels."""
    images, labels = synthetic_split(20, seed=11)
    return [png(image) for image in images], images, labels


def ask(url: str, *files: bytes, **fields: str) -> requests.Response:
    return requests.post(f"{url}/predict", files=[("file", (f"item{i}.png", f)) for i, f in enumerate(files)],
                         data=fields, timeout=60)


def same_answer(mine: dict, theirs: dict) -> bool:
    """The same classes in the same order, probabilities equal up to float rounding (batches of other sizes)."""
    return (mine["prediction"] == theirs["prediction"]
            and [t["class"] for t in mine["top"]] == [t["class"] for t in theirs["top"]]
            and [t["probability"] for t in mine["top"]] == pytest.approx([t["probability"] for t in theirs["top"]],
                                                                        rel=1e-5))


def test_answers_as_predict_does(server_url: str, trained_run: Path, items: tuple, tmp_path: Path) -> None:
    files = items[0]
    for i, data in enumerate(files[:8]):
        (tmp_path / f"{i}.png").write_bytes(data)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("predict", overrides=[f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
                                            f"inputs=[{','.join(str(tmp_path / f'{i}.png') for i in range(8))}]"])
    expected = predict(cfg)
    served = [ask(server_url, data).json()["predictions"][0] for data in files[:8]]
    assert all(same_answer(mine, theirs) for mine, theirs in zip(served, expected, strict=True))


def test_several_images_in_one_request_and_the_input_shown(server_url: str, items: tuple) -> None:
    files, _, _ = items
    response = ask(server_url, *files[:5], return_input="true")
    assert response.status_code == 200
    together = response.json()["predictions"]
    alone = [ask(server_url, data).json()["predictions"][0] for data in files[:5]]
    assert all(same_answer(t, a) and len(t["top"]) == 3 for t, a in zip(together, alone, strict=True))
    for answer, data in zip(together, files[:5], strict=True):  # what the model saw: predict's preprocessing
        assert torch.equal(torch.tensor(answer["input"], dtype=torch.uint8), open_image(io.BytesIO(data)))
    assert "input" not in alone[0]


def test_json_pixels_taken_as_they_are(server_url: str, trained_run: Path, items: tuple) -> None:
    _, images, labels = items
    everything = requests.post(f"{server_url}/predict", json={"pixels": images.tolist()}, timeout=60).json()
    hits = [answer["prediction"] == CLASS_NAMES[label] for answer, label in zip(everything["predictions"], labels,
                                                                                 strict=True)]
    assert sum(hits) >= 18, hits  # known inputs: images like those it was trained on
    model, scale = trained_model(trained_run / "checkpoints" / "best.ckpt")
    expected = probabilities(model, torch.from_numpy(images[:3]), scale)
    one = requests.post(f"{server_url}/predict", json={"pixels": images[0].tolist()}, timeout=60).json()
    three = requests.post(f"{server_url}/predict", json={"pixels": images[:3].tolist()}, timeout=60).json()
    assert len(one["predictions"]) == 1 and len(three["predictions"]) == 3
    for answer, probs in zip(three["predictions"], expected, strict=True):
        assert answer["prediction"] == CLASS_NAMES[int(probs.argmax())]
        assert answer["probability"] == pytest.approx(float(probs.max()), rel=1e-5)
    assert same_answer(one["predictions"][0], three["predictions"][0])


def test_json_pixel_checks() -> None:
    assert torch.equal(pixels_from_json([[0.4] * 28] * 27 + [[254.6] * 28]),
                       torch.tensor([[[0] * 28] * 27 + [[255] * 28]], dtype=torch.uint8))
    assert pixels_from_json([[[7] * 28] * 28] * 2).shape == (2, 28, 28)
    for bad, message in (([[1, 2], [3, 4]], "got shape (2, 2)"), ([[float("nan")] * 28] * 28, "finite"),
                         ([[300] * 28] * 28, "0-255, got 300 to 300"), ("pixels", "must be numbers"),
                         ([[[1] * 28] * 3] * 28, "got shape (28, 3, 28)"), ([], "got shape (0,)")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            pixels_from_json(bad)


def big_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def bad_requests(good: bytes) -> list[tuple[str, dict, int, str]]:
    """(case, requests.post keyword arguments, expected status, part of the expected detail)."""
    pixels = np.zeros((28, 28)).tolist()
    return [
        ("text as an image", {"files": {"file": ("notes.png", b"just some text")}}, 415, "notes.png: not an image"),
        ("truncated PNG", {"files": {"file": ("cut.png", good[: len(good) // 2])}}, 400, "cut.png: corrupt image"),
        ("empty file", {"files": {"file": ("empty.png", b"")}}, 415, "not an image"),
        ("huge image", {"files": {"file": ("wide.png", big_png(5000, 8))}}, 413, "image too large (5000x8"),
        ("decompression bomb", {"files": {"file": ("bomb.png", huge_png())}}, 413, "bomb.png: image too large"),
        ("a side too long", {"files": {"file": ("tall.png", huge_png(4000, 20_000))}}, 413,
         "tall.png: image too large (4000x20000 pixels"),
        ("over the size limit", {"files": {"file": ("big.png", good + b"\0" * (7 * 2**19))}}, 413, "over 3 MB"),
        ("too many pixels", {"files": [("file", (f"{i}.png", big_png(4096, 4096))) for i in range(4)]}, 413,
         "67.1 megapixels in one request; at most 64"),
        ("no file field", {"files": {"picture": ("a.png", good)}}, 400, "multipart form field 'file'"),
        ("too many images", {"files": [("file", ("a.png", good))] * 65}, 413, "at most 64 images"),
        ("JSON of the wrong shape", {"json": {"pixels": [[1, 2], [3, 4]]}}, 400, "got shape (2, 2)"),
        ("JSON with NaN", {"data": '{"pixels": [' + ",".join(["[" + ",".join(["NaN"] * 28) + "]"] * 28) + "]}",
                           "headers": {"Content-Type": "application/json"}}, 400, "finite"),
        ("JSON out of range", {"json": {"pixels": (np.array(pixels) - 1).tolist()}}, 400, "0-255"),
        ("JSON number too large", {"json": {"pixels": [[10**400] * 28] * 28}}, 400, "must be numbers"),
        ("JSON nested too deep", {"data": "[" * 100_000, "headers": {"Content-Type": "application/json"}}, 400,
         "malformed JSON (RecursionError"),
        ("JSON without pixels", {"json": {"image": pixels}}, 400, "must hold 'pixels'"),
        ("JSON not an object", {"json": [pixels]}, 400, "must be an object"),
        ("malformed JSON", {"data": "{pixels: ", "headers": {"Content-Type": "application/json"}}, 400,
         "malformed JSON"),
        ("raw image body", {"data": good, "headers": {"Content-Type": "image/png"}}, 415, "content type 'image/png'"),
        ("malformed multipart", {"data": b"--x\r\nnonsense", "headers": {"Content-Type": "multipart/form-data"}},
         400, "malformed multipart form"),
    ]


def test_bad_inputs_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server_url: str, items: tuple) -> None:
    good = items[0][0]
    for case, kwargs, status, detail in bad_requests(good):
        response = requests.post(f"{server_url}/predict", timeout=60, **kwargs)
        assert response.status_code == status, (case, response.status_code, response.text)
        assert detail in response.json()["detail"], (case, response.json())
    assert ask(server_url, good).status_code == 200


def test_large_uploads_within_the_limit_are_answered(server_url: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1500), dtype=np.uint8)  # a 2.1 MB PNG
    response = ask(server_url, png(noise))
    assert response.status_code == 200 and len(response.json()["predictions"]) == 1
    upper = requests.post(f"{server_url}/predict", json={"pixels": np.zeros((28, 28)).tolist()},
                          headers={"Content-Type": "Application/JSON"}, timeout=60)
    assert upper.status_code == 200


def test_many_clients_each_get_their_own_answer(server_url: str, items: tuple) -> None:
    files, _, _ = items
    alone = [ask(server_url, data).json()["predictions"][0] for data in files]
    bad = {"files": {"file": ("notes.png", b"not an image")}}

    def one(i: int) -> tuple[int, int, dict]:
        if i % 5 == 4:  # bad requests in the same batches as good ones
            response = requests.post(f"{server_url}/predict", timeout=60, **bad)
            return i, response.status_code, response.json()
        response = ask(server_url, files[i % len(files)])
        return i, response.status_code, response.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(160)))
    for i, status, body in results:
        if i % 5 == 4:
            assert status == 415 and "not an image" in body["detail"]
        else:
            assert status == 200 and same_answer(body["predictions"][0], alone[i % len(files)]), i


def test_health_info_and_page(server_url: str, trained_run: Path) -> None:
    assert requests.get(f"{server_url}/health", timeout=10).status_code == 200
    info = requests.get(f"{server_url}/info", timeout=10).json()["model"]
    assert info["name"] == "CNN" and info["classes"] == list(CLASS_NAMES) and info["parameters"] == 804_554
    assert Path(info["checkpoint"]) == (trained_run / "checkpoints" / "best.ckpt").resolve()
    page = requests.get(server_url, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<canvas id="canvas"' in page.text and "https://" not in page.text  # no CDN: works offline


def run_serve(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashion_lightning.serve", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_bad_start_is_one_clear_line(tmp_path: Path, trained_run: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.ckpt")
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    for args, message in (([], "ckpt_path is required: python -m fashion_lightning.serve ckpt_path="),
                          (["ckpt_path=missing.ckpt"], "ckpt_path='missing.ckpt' does not exist"),
                          (["ckpt_path=foreign.ckpt"], "is not a fashion_lightning checkpoint"),
                          ([f"ckpt_path={ckpt}", "api_key=''"], "api_key (or $FASHION_LIGHTNING_API_KEY) must be a "
                                                               "non-empty string or null, got an empty string"),
                          ([f"ckpt_path={ckpt}", "host=0.0.0.0"], "host=0.0.0.0 listens beyond this machine without "
                                                                  "an API key; set FASHION_LIGHTNING_API_KEY"),
                          ([f"ckpt_path={ckpt}", "port=80"], "port must be an integer in 1024-65535, got 80"),
                          ([f"ckpt_path={ckpt}", "invert=maybe"], "invert must be one of auto, always, never")):
        done = run_serve(*args, cwd=tmp_path)
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


def test_an_api_key_must_be_what_a_header_carries() -> None:
    for key in ("s\u00e9cret", " s3cret", "s3cret\n", "s3\tcret"):
        cfg = OmegaConf.create({"api_key": key, "host": "127.0.0.1", "allow_no_key": False})
        with pytest.raises(serve.UserError, match="must be printable ASCII") as info:
            serve.check_access(cfg)
        assert key not in str(info.value)  # the key itself is never shown
    serve.check_access(OmegaConf.create({"api_key": "a key-with_\\odd~chars", "host": "::", "allow_no_key": False}))


def test_a_port_in_use_is_one_clear_line(tmp_path: Path, server_url: str, trained_run: Path) -> None:
    port = server_url.rsplit(":", 1)[1]
    done = run_serve(f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}", f"port={port}", cwd=tmp_path)
    assert done.returncode == 1 and f"port {port} is already in use" in done.stderr, done.stderr



KEY = {"X-API-Key": "k3y-for-the-test"}


@pytest.fixture(scope="module")
def guarded_url(trained_run: Path) -> Iterator[str]:
    """A server of its own (its worker is killed) with an API key from the environment, and ``timeout=2``."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FASHION_LIGHTNING_API_KEY", KEY["X-API-Key"])  # the server inherits it
        with serve.in_background(trained_run / "checkpoints" / "best.ckpt", "timeout=2") as url:
            yield url


def test_an_api_key_is_asked_of_every_request_but_the_page_and_health(guarded_url: str) -> None:
    url, pixels = guarded_url, {"pixels": np.zeros((28, 28)).tolist()}
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
        response = requests.post(f"{url}/predict", json=pixels, headers=headers, timeout=60)
        assert response.status_code == 401 and "X-API-Key" in response.json()["detail"], headers
    malformed = requests.post(f"{url}/predict", data="{pixels: ", headers={"Content-Type": "application/json"},
                              timeout=60)
    assert malformed.status_code == 401  # refused before its body is read
    assert [requests.get(f"{url}/{path}", timeout=10).status_code for path in ("info", "openapi.json")] == [401] * 2
    answer = requests.post(f"{url}/predict", json=pixels, headers=KEY, timeout=60)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
    assert requests.get(f"{url}/info", headers=KEY, timeout=10).status_code == 200
    assert [requests.get(f"{url}{path}", timeout=10).status_code for path in ("/", "/health")] == [200, 200]


def test_serve_load_sends_the_api_key(guarded_url: str, items: tuple) -> None:
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    assert "X-API-Key" not in serve_load.request_headers(None)
    body = serve_load.multipart(items[0][0])
    connection = http.client.HTTPConnection("127.0.0.1", int(guarded_url.rsplit(":", 1)[1]), timeout=60)
    try:
        with pytest.raises(RuntimeError, match="HTTP 401"):
            serve_load.post(connection, body, serve_load.request_headers(None))
        connection.close()
        answer = serve_load.post(connection, body, serve_load.request_headers(KEY["X-API-Key"]))
        assert len(answer["predictions"]) == 1
    finally:
        connection.close()


def readme_clients() -> dict[str, str]:
    """The README's client examples: the bash and the python block under its '## Serving' heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Serving\n", 1)[1].split("\n## ", 1)[0]
    blocks = dict(re.findall(r"^```(bash|python)\n(.*?)^```$", section, re.S | re.M))
    assert set(blocks) == {"bash", "python"} and len(re.findall("^```[a-z]", section, re.M)) == 2, section
    assert all(block.count("http://127.0.0.1:8000") == 1 for block in blocks.values()), blocks
    return blocks


def test_the_readme_client_examples_work_as_written(server_url: str, guarded_url: str, items: tuple,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Both blocks, as written but for the server's port, against a server without a key (none set) and one with
    (the key set as the server has it; and unset: refused)."""
    (tmp_path / "shirt.png").write_bytes(items[0][0])
    monkeypatch.chdir(tmp_path)
    expected = ask(server_url, items[0][0]).json()["predictions"][0]
    for url, key in ((server_url, None), (guarded_url, KEY["X-API-Key"]), (guarded_url, None)):
        blocks = {name: code.replace("http://127.0.0.1:8000", url) for name, code in readme_clients().items()}
        env = {k: v for k, v in os.environ.items() if k != "FASHION_LIGHTNING_API_KEY"}
        if key:
            env["FASHION_LIGHTNING_API_KEY"] = key
            monkeypatch.setenv("FASHION_LIGHTNING_API_KEY", key)
        else:
            monkeypatch.delenv("FASHION_LIGHTNING_API_KEY", raising=False)
        refused = url == guarded_url and key is None
        if shutil.which("curl"):
            done = subprocess.run(["bash", "-e", "-c", blocks["bash"]], env=env, capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0, done.stderr
            answer = json.loads(done.stdout)
            if refused:
                assert "X-API-Key" in answer["detail"], answer
            else:
                assert same_answer(answer["predictions"][0], expected), answer
        if refused:
            with pytest.raises(requests.HTTPError, match="401"):
                exec(compile(blocks["python"], "README.md", "exec"), {})
        else:
            exec(compile(blocks["python"], "README.md", "exec"), {})
            assert same_answer(ast.literal_eval(capsys.readouterr().out), expected)


def inference_workers(url: str) -> list[int]:
    """The pids of the inference workers of the server at ``url``: the processes that LitServe spawned (not forked)
    from it, read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        with suppress(OSError, IndexError, ValueError):  # a process that ended meanwhile; not a process
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            table[int(entry.name)] = parent, (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
    server = {pid for pid, (_, args) in table.items()
              if "fashion_lightning.serve" in args and f"port={url.rsplit(':', 1)[1]}" in args}
    return [pid for pid, (parent, args) in table.items() if parent in server and any("spawn_main" in a for a in args)]


def test_a_killed_inference_worker_is_started_again_and_no_request_hangs(guarded_url: str, items: tuple) -> None:
    url, good = guarded_url, {"file": ("item.png", items[0][0])}
    expected = requests.post(f"{url}/predict", files=good, headers=KEY, timeout=60).json()["predictions"][0]
    (worker,) = inference_workers(url)
    stop, answered = threading.Event(), threading.Semaphore(0)

    def client() -> list[tuple[int, float]]:  # requests before, during and after the kill
        answers = []
        while not stop.is_set():
            start = time.monotonic()
            status = requests.post(f"{url}/predict", files=good, headers=KEY, timeout=60).status_code
            answers.append((status, time.monotonic() - start))
            answered.release()
        return answers

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client) for _ in range(4)]
        assert all(answered.acquire(timeout=60) for _ in range(8))  # the worker busy with their requests
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not (inference_workers(url) not in ([], [worker])
                   and requests.get(f"{url}/health", timeout=10).status_code == 200):
            assert time.monotonic() < deadline, "no new inference worker ready 90 s after the kill"
            time.sleep(0.2)
        stop.set()
        answers = [answer for c in clients for answer in c.result()]
    assert {status for status, _ in answers} <= {200, 504}, answers  # 504: taken by the dead worker, or queued
    assert max(seconds for _, seconds in answers) < 10, answers  # twice timeout=2, and slack: none hangs
    again = requests.post(f"{url}/predict", files=good, headers=KEY, timeout=60)
    assert again.status_code == 200 and same_answer(again.json()["predictions"][0], expected)
