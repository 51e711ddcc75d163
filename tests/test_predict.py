"""python -m fashion_lightning.predict: image files of any kind, test-set items, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import huge_png, one_line_error, save_variants, synthetic_split
from fashion_lightning import UserError
from fashion_lightning.app import CONFIG_DIR
from fashion_lightning.predict import parse_test_items, predict


def run_predict(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashion_lightning.predict", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def class_image(label: int) -> np.ndarray:
    """A clean 28x28 light-on-dark image of a synthetic class."""
    images, labels = synthetic_split(200, seed=5)
    return images[labels == label][0]


def test_test_index_specs() -> None:
    assert parse_test_items("test:7") == [7] and parse_test_items("test:0-3") == [0, 1, 2, 3]
    for bad in ("test:x", "test:5-2", "test:10000"):
        with pytest.raises(UserError, match="use test:N or test:A-B"):
            parse_test_items(bad)


def test_predicts_files_and_test_items(trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    files = save_variants(tmp_path)
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    done = run_predict(f"ckpt_path={ckpt}", f"inputs=[{','.join(files)},test:0-3]", "format=json",
                       f"paths.data_dir={data_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["input"] for r in results] == [*files, "test:0", "test:1", "test:2", "test:3"]
    for r in results:
        assert len(r["top"]) == 3 and r["top"][0]["class"] == r["prediction"]
        assert r["top"][0]["probability"] >= r["top"][1]["probability"] >= r["top"][2]["probability"]
    assert len({r["prediction"] for r in results[:3]}) == 1  # the same image in any form, the same answer
    assert all(r["prediction"] == r["label"] for r in results[3:])
    table = run_predict(f"ckpt_path={ckpt}", "inputs=[light_on_dark.png]", cwd=tmp_path)
    assert table.returncode == 0 and "light_on_dark.png" in table.stdout and "prediction" in table.stdout


def test_bad_inputs_reported_each_and_the_rest_predicted(trained_run: Path, tmp_path: Path) -> None:
    Image.fromarray(class_image(3)).save(tmp_path / "good.png")
    (tmp_path / "notes.png").write_text("not an image")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "bomb.png").write_bytes(huge_png())  # 20000x20000: past Pillow's decompression-bomb limit
    (tmp_path / "wide.png").write_bytes(huge_png(10_000, 10_000))  # past Pillow's warning, short of its error
    inputs = "inputs=[missing.png,notes.png,cut.png,bomb.png,wide.png,good.png]"
    done = run_predict(f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}", inputs, "format=json", cwd=tmp_path)
    assert done.returncode == 1 and "Warning" not in done.stderr, done.stderr  # each input's error is in its row
    results = {r["input"]: r for r in json.loads(done.stdout)}
    assert results["missing.png"]["error"] == "no such file"
    assert results["notes.png"]["error"].startswith("not an image")
    assert results["cut.png"]["error"].startswith("corrupt image")
    assert results["bomb.png"]["error"].startswith("image too large (over ")
    assert results["wide.png"]["error"] == "image too large (10000x10000 pixels; at most 4096 a side)"
    assert "prediction" in results["good.png"]


@pytest.mark.parametrize(("ckpt", "message"), [("missing.ckpt", "does not exist"),
                                               ("junk.ckpt", "is not a readable checkpoint")])
def test_bad_checkpoint_is_one_clear_error(ckpt: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "junk.ckpt").write_text("junk")
    done = run_predict(f"ckpt_path={ckpt}", "inputs=[x.png]", cwd=tmp_path)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["top_k=0"], "top_k must be a positive integer, got 0"),
    (["top_k=abc"], "top_k must be a positive integer, got 'abc'"),
    (["top_k=2.5"], "top_k must be a positive integer, got 2.5"),
    (["invert=bogus"], "invert must be one of auto, always, never, got 'bogus'"),
    (["format=csv"], "format must be table or json, got 'csv'"),
    (["inputs=[]"], "inputs names no image"),
    ([], "inputs names no image"),  # inputs left unset
])
def test_bad_settings_are_one_clear_error(args: list[str], message: str, trained_run: Path, capsys) -> None:
    """The app's error handler around predict, in-process; before any input is read or predicted."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("predict", overrides=[f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}", *args,
                                            *(["inputs=[test:0]"] if args and "inputs" not in args[0] else [])])
    assert message in one_line_error(lambda: predict(cfg), capsys)
