"""python -m fashion_lightning.explain: the CNN's filters and feature maps, the shift test, attributions, one page."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from conftest import compose_train, one_line_error, quick_overrides
from fashion_lightning import FashionMNISTDataModule, explain
from fashion_lightning.app import CONFIG_DIR
from fashion_lightning.data.datamodule import to_input
from fashion_lightning.evaluate import evaluate
from fashion_lightning.lit.checkpoints import trained_model
from fashion_lightning.nets import ConvNet, FusedConvNet, keras_init_


def compose_app(name: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def cnn_ckpt(trained_run: Path) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def dense_ckpt(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense baseline trained briefly on the synthetic data (raw 0-255 pixels, as the tutorial's dense run)."""
    from fashion_lightning.train import train

    out = tmp_path_factory.mktemp("dense") / "run"
    train(compose_train(*quick_overrides(data_dir, out), "model=dense", "data.scale=false", "test=false"))
    return out / "checkpoints" / "last.ckpt"


def explain_cfg(data_dir: Path, out: Path, *overrides: str) -> DictConfig:
    shift = [] if any(o.startswith("max_shift=") for o in overrides) else ["max_shift=1"]
    return compose_app("explain", f"paths.data_dir={data_dir}", "data.download=false", f"out_dir={out}", *shift,
                       *overrides)


def test_filters_png_draws_the_conv_weights() -> None:
    """Filters set by hand are drawn as they are, in order, on one symmetric scale; any count and kernel size."""
    kernels = np.zeros((10, 5, 5), dtype=np.float32)
    for i in range(10):
        kernels[i, i % 5, :] = -1.0  # filter i: a dark row i % 5
        kernels[i, :, i % 5] = 0.5 * i  # crossed by a light column of strength i / 2
    net = ConvNet(filters=10, kernel_size=5)
    with torch.no_grad():
        net.conv.weight.copy_(torch.from_numpy(kernels)[:, None])
    fig = explain.plot_filters(net.conv.weight)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 10 and len(fig.axes) == 2 * 8 + 1  # ten of a 2x8 grid drawn, and the colour bar
    for i, ax in enumerate(panels[:10]):
        drawn = ax.images[0]
        np.testing.assert_array_equal(drawn.get_array(), kernels[i])
        assert (drawn.norm.vmin, drawn.norm.vmax) == (-4.5, 4.5)


def test_feature_maps_are_the_networks_own_activations() -> None:
    """What feature_maps.png draws is what the network computes: its ReLU output (the max-pool's input) and the
    max-pool's output, as hooks on the network see them, tiled filter by filter."""
    net = keras_init_(FusedConvNet(filters=6, kernel_size=3, hidden=16)).eval()
    images = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    x = to_input(images)
    plain = explain.plain_convnet(net)
    seen = {}
    plain.pool.register_forward_hook(lambda m, args, out: seen.update(relu=args[0], pool=out))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net(x), rtol=0, atol=1e-5)
    maps = explain.feature_maps(explain.plain_convnet(net), x)
    torch.testing.assert_close(maps["relu"], seen["relu"], rtol=0, atol=0)
    torch.testing.assert_close(maps["pool"], seen["pool"], rtol=0, atol=0)
    fig = explain.plot_feature_maps(images, maps, ["a", "b"])
    axes = [ax for ax in fig.axes if ax.images]
    for i in range(2):
        np.testing.assert_array_equal(axes[3 * i].images[0].get_array(), images[i].numpy())
        for ax, key, size in ((axes[3 * i + 1], "relu", 28), (axes[3 * i + 2], "pool", 14)):
            mosaic = ax.images[0].get_array()
            for j in range(6):  # six filters: one row of six tiles
                tile = mosaic[1 : 1 + size, 1 + j * (size + 1) : 1 + j * (size + 1) + size]
                np.testing.assert_array_equal(tile, maps[key][i, j].numpy())


def test_shifted_moves_images_and_fills_with_zero() -> None:
    image = torch.arange(1, 10).reshape(1, 3, 3)
    assert explain.shifted(image, 1, 0).tolist() == [[[0, 1, 2], [0, 4, 5], [0, 7, 8]]]
    assert explain.shifted(image, -1, 0).tolist() == [[[2, 3, 0], [5, 6, 0], [8, 9, 0]]]
    assert explain.shifted(image, 0, 2).tolist() == [[[0, 0, 0], [0, 0, 0], [1, 2, 3]]]
    assert explain.shifted(image, 0, -1).tolist() == [[[4, 5, 6], [7, 8, 9], [0, 0, 0]]]
    assert explain.shifted(image, 0, 0).tolist() == image.tolist()
    assert explain.shifted(image, 3, 0).sum() == 0


def test_shift_curves_match_a_hand_computation(cnn_ckpt: Path, data_dir: Path) -> None:
    """On 40 test images, accuracy after each shift equals the count of right answers for images shifted pixel by
    pixel in Python."""
    datamodule = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    datamodule.setup("test")
    images, labels = datamodule.test_set.images[:40], datamodule.test_set.labels[:40]
    model, scale = trained_model(cnn_ckpt)
    trained = explain.Trained(cnn_ckpt, model, scale, "CNN")
    shifts = [-2, -1, 0, 1, 2]
    curves = explain.shift_curves(trained, images, labels, shifts)
    for direction in ("horizontal", "vertical"):
        for d, acc in zip(shifts, curves[direction], strict=True):
            moved = np.zeros((40, 28, 28), dtype=np.uint8)
            for r in range(28):
                for c in range(28):
                    src_r, src_c = (r, c - d) if direction == "horizontal" else (r - d, c)
                    if 0 <= src_r < 28 and 0 <= src_c < 28:
                        moved[:, r, c] = images[:, src_r, src_c].numpy()
            with torch.no_grad():
                preds = model(to_input(torch.from_numpy(moved), scale)).argmax(1)
            assert acc == pytest.approx(int((preds == labels).sum()) / 40, abs=1e-7), (direction, d)
    assert curves["horizontal"][2] == curves["vertical"][2]


@pytest.mark.parametrize(("cnn", "dense", "verdict"), [
    ([0.90, 0.95, 0.90], [0.60, 0.85, 0.60], "pooling buys tolerance of position, as the tutorial says"),
    ([0.50, 0.91, 0.50], [0.40, 0.85, 0.40], "pooling buys tolerance of small moves, as the tutorial says, but no "
                                             "invariance"),
    ([0.81, 0.91, 0.81], [0.75, 0.85, 0.75], "no measurable tolerance of position beyond the dense model's"),
    ([0.60, 0.91, 0.60], [0.75, 0.85, 0.75], "no measurable tolerance of position beyond the dense model's"),
])
def test_findings_say_what_the_numbers_show(cnn: list[float], dense: list[float], verdict: str) -> None:
    """The shift test's sentences follow the curves, whichever way they fall, with their numbers."""
    findings = " ".join(explain.shift_findings([-1, 0, 1], {"CNN": {"horizontal": cnn, "vertical": cnn},
                                                            "dense": {"horizontal": dense, "vertical": dense}}))
    assert verdict in findings
    assert f"from {cnn[1]:.4f} to {cnn[0]:.4f} ({100 * (cnn[0] - cnn[1]):+.1f} points)" in findings
    assert ("The CNN stays the more accurate model" in findings) == (cnn[0] > dense[0])


def hrefs(page: str) -> list[str]:
    return re.findall(r'(?:href|src)="([^"]+)"', page)


def test_page_of_both_models(cnn_ckpt: Path, dense_ckpt: Path, data_dir: Path, tmp_path: Path) -> None:
    """Every picture and shift.json; shift 0 is exactly evaluate's test accuracy; the page links only files that
    exist, the CNN's report among them."""
    pytest.importorskip("captum")
    out = tmp_path / "explain"
    result = explain.explain(explain_cfg(data_dir, out, f"ckpt_path={cnn_ckpt}", f"against={dense_ckpt}"))
    assert sorted(result["files"]) == sorted(explain.OUTPUTS)
    shift = json.loads((out / "shift.json").read_text())
    assert shift["shifts"] == [-1, 0, 1] and set(shift["models"]) == {"CNN", "dense"}
    for name, ckpt in (("CNN", cnn_ckpt), ("dense", dense_ckpt)):
        measured = evaluate(compose_app("evaluate", f"ckpt_path={ckpt}", f"paths.data_dir={data_dir}",
                                        f"report_dir={tmp_path / name}"))
        curves = shift["models"][name]
        assert curves["test_acc"] == curves["horizontal"][1] == curves["vertical"][1] == measured["test_acc"]
    page = (out / "index.html").read_text()
    links = hrefs(page)
    assert {"filters.png", "feature_maps.png", "shift.png", "attributions.png", "shift.json"} <= set(links)
    assert any(link.endswith("report/report.md") for link in links)
    assert all((out / link).is_file() for link in links), links
    assert "91.58 %" in page and "804,554" in page and "29,898" in page
    assert "https://" not in page and "http://" not in page
    assert all(html.escape(finding) in page for finding in shift["findings"])


def test_cnn_alone_says_what_needs_the_dense_model(cnn_ckpt: Path, data_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without against= and without Captum, into the default folder (explain/ in the run directory): the CNN's
    parts, and a line for each missing one; an earlier run's attributions.png is not left beside them."""
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # import captum.attr raises ImportError
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(cnn_ckpt, run / "checkpoints" / "last.ckpt")
    out = run / "explain"
    out.mkdir()
    (out / "attributions.png").write_bytes(b"an earlier run's")
    cfg = compose_app("explain", f"paths.data_dir={data_dir}", "data.download=false", "max_shift=1",
                      f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    result = explain.explain(cfg)
    assert result["out_dir"] == str(out)
    assert sorted(result["files"]) == ["feature_maps.png", "filters.png", "index.html", "shift.json", "shift.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(result["files"])
    page = (out / "index.html").read_text()
    assert "pip install &#x27;fashion_lightning[explain]&#x27;" in page
    assert page.count("against=") >= 2 and "attributions.png" not in page
    assert all((out / link).is_file() for link in hrefs(page))
    assert set(json.loads((out / "shift.json").read_text())["models"]) == {"CNN"}


@pytest.mark.parametrize(("args", "message"), [
    (["ckpt_path=missing.ckpt"], "does not exist"),
    (["ckpt_path={not_ours}"], "not a fashion_lightning checkpoint"),
    (["ckpt_path={cnn}", "against=missing.ckpt"], "against='missing.ckpt' does not exist"),
    (["ckpt_path={cnn}", "against={cnn}"], "against takes the dense baseline"),
    (["ckpt_path={dense}"], "has no filters or feature maps; pass a CNN checkpoint as ckpt_path and this one as "
                            "against="),
    (["ckpt_path={cnn}", "max_shift=-1"], "max_shift must be an integer in 1..27"),
    (["ckpt_path={cnn}", "max_shift=0"], "max_shift must be an integer in 1..27"),
    (["ckpt_path={cnn}", "max_shift=abc"], "max_shift must be an integer in 1..27"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(args: list[str], message: str, cnn_ckpt: Path,
                                                        dense_ckpt: Path, data_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    not_ours = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, not_ours)
    args = [a.format(cnn=cnn_ckpt, dense=dense_ckpt, not_ours=not_ours) for a in args]
    out = tmp_path / "explain"
    assert message in one_line_error(lambda: explain.explain(explain_cfg(data_dir, out, *args)), capsys)
    assert not out.exists()


def test_a_run_that_fails_midway_leaves_no_finished_page(cnn_ckpt: Path, data_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """An earlier run's files go before anything is drawn: a full disk while drawing is one error line, and no
    index.html (nor anything else of the earlier run) is left."""
    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "explain" / "filters.png"))

    out = tmp_path / "explain"
    out.mkdir()
    for name in explain.OUTPUTS:
        (out / name).write_text("an earlier run's")
    monkeypatch.setattr(explain, "plot_filters", disk_full)
    cfg = explain_cfg(data_dir, out, f"ckpt_path={cnn_ckpt}")
    assert "No space left" in one_line_error(lambda: explain.explain(cfg), capsys)
    assert list(out.iterdir()) == []


def test_help() -> None:
    done = subprocess.run([sys.executable, "-m", "fashion_lightning.explain", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fashion_lightning.explain" in done.stdout and "against" in done.stdout and "max_shift" in done.stdout
