"""python -m fashion_lightning.export: ONNX and TorchScript files with softmax outputs, verified against PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_lit_checkpoints_io import small_disk

from fashion_lightning import FashionMNISTDataModule
from fashion_lightning import export as export_app
from fashion_lightning.app import CONFIG_DIR
from fashion_lightning.lit.checkpoints import load_model


def export(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashion_lightning.export", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_round_trip(fmt: str, trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    done = export(f"ckpt_path={ckpt}", f"format={fmt}", f"output={out}", f"paths.data_dir={data_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "probabilities match PyTorch within" in done.stdout
    info = json.loads(out.with_suffix(out.suffix + ".json").read_text())
    assert info["max_abs_difference_vs_pytorch"] <= 1e-5 and info["classes"][0] == "T-shirt/top"

    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    dm.setup()
    x = dm.test_set.images[:64].unsqueeze(1).float() / 255
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        probs = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    else:
        probs = torch.jit.load(str(out))(x)
    with torch.no_grad():
        expected = load_model(ckpt)(x).softmax(1)
    assert probs.shape == (64, 10) and torch.allclose(probs.sum(1), torch.ones(64), atol=1e-5)
    assert torch.allclose(probs, expected, atol=1e-5)


def test_a_model_evaluated_with_flips_exports_with_them(trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["eval_flip"] = True
    ckpt, out = tmp_path / "flip.ckpt", tmp_path / "flip.pt"
    torch.save(checkpoint, ckpt)
    done = export(f"ckpt_path={ckpt}", "format=torchscript", f"output={out}", f"paths.data_dir={data_dir}",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    x = torch.rand(16, 1, 28, 28)
    net = load_model(ckpt).net
    with torch.no_grad():
        probs, plain = torch.jit.load(str(out))(x), net(x).softmax(1)
        flipped = ((net(x) + net(x.flip(3))) / 2).softmax(1)
    torch.testing.assert_close(probs, flipped, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(probs, plain, atol=1e-4)


def test_export_default_goes_into_the_run_directory(trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    done = export(f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "format=torchscript",
                  f"paths.data_dir={data_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (trained_run / "export" / "model.pt").is_file()


@pytest.mark.parametrize(("args", "message"), [(["format=tflite"], "format must be one of onnx, torchscript"),
                                               (["ckpt_path=nope.ckpt"], "does not exist"),
                                               ([], "ckpt_path is required")])
def test_export_bad_input(args: list[str], message: str, trained_run: Path, tmp_path: Path) -> None:
    ckpt = [f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}"] if not any("ckpt" in a for a in args) else []
    done = export(*(ckpt if args != [] else []), *args, cwd=tmp_path)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.glob("**/*.onnx"))


def test_a_model_that_fails_the_check_replaces_nothing(trained_run: Path, data_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The check fails (here: a tolerance nothing meets): an earlier export under the name stays whole, beside no
    half-written or unchecked file."""
    out = tmp_path / "model.pt"
    out.write_bytes(b"an earlier export")
    out.with_suffix(".pt.json").write_text("{}")
    monkeypatch.setattr(export_app, "TOLERANCE", -1.0)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
                                           "format=torchscript", f"output={out}", f"paths.data_dir={data_dir}"])
    with pytest.raises(export_app.UserError, match="differs from PyTorch by .* nothing was written"):
        export_app.export(cfg)
    assert out.read_bytes() == b"an earlier export" and out.with_suffix(".pt.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json"]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_export_on_a_full_disk_is_one_clear_error_and_keeps_the_earlier_one(fmt: str, trained_run: Path,
                                                                              data_dir: Path, tmp_path: Path) -> None:
    """The 3.2 MB model on a 1 MB disk: TorchScript's own file writer aborted the process (c10::Error, exit 134)."""
    with small_disk(tmp_path / "disk", 1 << 20) as folder:
        out = folder / f"model{export_app.FORMATS[fmt]}"
        sidecar = out.with_suffix(out.suffix + ".json")
        out.write_bytes(b"an earlier export")
        sidecar.write_text("{}")
        done = export(f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}", f"format={fmt}", f"output={out}",
                      f"paths.data_dir={data_dir}", cwd=tmp_path)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(f"error: cannot use {out}: No space left on device")
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert out.read_bytes() == b"an earlier export" and sidecar.read_text() == "{}"
        assert sorted(p.name for p in folder.iterdir()) == sorted([out.name, sidecar.name])
