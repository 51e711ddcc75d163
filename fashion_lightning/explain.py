"""Why the CNN wins, as pictures and measurements on one offline page: the CNN's filters and feature maps, test
accuracy of shifted images and where each model looks, against the dense baseline:
``python -m fashion_lightning.explain ckpt_path=<CNN .ckpt> [against=<dense .ckpt>]``."""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import matplotlib
import torch
from hydra.utils import instantiate
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import Tensor
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.utils import make_grid

from fashion_lightning.app import (
    CONFIG_DIR,
    DATA_PATHS,
    load_trained,
    reported_as_one_line,
    run_dir_of,
    set_up_process,
    with_launch_paths,
    write_figure,
    write_json,
    write_text,
)
from fashion_lightning.data.datamodule import CLASS_NAMES, to_input
from fashion_lightning.errors import UserError
from fashion_lightning.lit.checkpoints import trained_model
from fashion_lightning.lit.classifier import ImageClassifier
from fashion_lightning.lit.models import CNN, DenseBaseline
from fashion_lightning.nets.tutorial import ConvNet

OUTPUTS = ("index.html", "shift.json", "filters.png", "feature_maps.png", "shift.png", "attributions.png")
"""What the app writes; ``index.html`` first in the list, as it is removed first and written last."""
EXTRA = "pip install 'fashion_lightning[explain]'"
"""What installs Captum, for the attributions."""
EVAL_BATCH = 1000
"""Images per forward pass in the shift test, as `fashion_lightning.report.predict_test_set` batches them: shift 0
is then the very computation ``evaluate`` reports."""
MAX_SHIFT = 27
"""The largest shift that leaves any of a 28-pixel image in the frame."""
IG_STEPS = 32
"""Integrated Gradients' steps from the black image to the test image."""
SAME = 0.01
"""Accuracy drops closer than this (one point) count as equal in the shift test's verdict."""
INVARIANT = 0.9
"""The share of its test accuracy a model must keep at the largest shift for the verdict to call it invariant."""
LONG = {"CNN": "the CNN", "dense": "the dense model"}
"""The models' names in sentences."""


@dataclass
class Trained:
    """A checkpoint's trained model, whether it reads pixels / 255, and the name the page gives it."""

    path: Path
    model: ImageClassifier
    scale: bool
    name: str

    @property
    def params(self) -> int:
        """The network's parameter count."""
        return sum(p.numel() for p in self.model.net.parameters())

    def inputs(self, images: Tensor) -> Tensor:
        """uint8 images (N, 28, 28) as this model's input (N, 1, 28, 28)."""
        return to_input(images, self.scale)


def load_models(cfg: DictConfig) -> tuple[Trained, Trained | None]:
    """The CNN of ``cfg.ckpt_path`` and the dense baseline of ``cfg.against`` (None when not given)."""
    path, model, scale = load_trained(cfg, "explain")
    if isinstance(model, DenseBaseline):
        raise UserError(f"ckpt_path={str(path)!r} is a dense baseline, which has no filters or feature maps; pass a "
                        f"CNN checkpoint as ckpt_path and this one as against={path}")
    cnn = Trained(path, model, scale, "CNN")
    if not cfg.against:
        return cnn, None
    path = Path(cfg.against).expanduser()
    try:
        model, scale = trained_model(path)
    except UserError as err:  # its messages name the file as ckpt_path=
        raise UserError(str(err).replace("ckpt_path=", "against=", 1)) from None
    if isinstance(model, CNN):
        raise UserError(f"against={str(path)!r} is a CNN; against takes the dense baseline's checkpoint (python -m "
                        "fashion_lightning.train experiment=seed_dense)")
    return cnn, Trained(path, model, scale, "dense")


def check_max_shift(value: object) -> int:
    """``max_shift`` if it is an integer in 1..`MAX_SHIFT`, else a `UserError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHIFT:
        raise UserError(f"max_shift must be an integer in 1..{MAX_SHIFT} (the test moves images by -max_shift.."
                        f"max_shift pixels), got {value!r}")
    return value


def one_per_class(labels: Tensor) -> Tensor:
    """The index of the first test image of each class, in class order (classes absent from ``labels`` skipped)."""
    return torch.stack([(labels == c).nonzero()[0, 0] for c in range(len(CLASS_NAMES)) if (labels == c).any()])


# The CNN's insides: its filters, and the maps they make of an image


def plain_convnet(net: ConvNet) -> ConvNet:
    """A plain `ConvNet` with ``net``'s weights: a `FusedConvNet` computes conv, ReLU and pool in one kernel, where
    no feature extractor can see them apart."""
    plain = ConvNet(net.conv.out_channels, net.conv.kernel_size[0], net.fc.out_features, net.out.out_features)
    plain.load_state_dict(net.state_dict())
    return plain.eval()


@torch.inference_mode()
def feature_maps(net: ConvNet, x: Tensor) -> dict[str, Tensor]:
    """The plain network's own activations for images ``x`` (N, 1, 28, 28), by torchvision's feature extraction:
    ``relu`` (N, filters, 28, 28) after conv + ReLU, ``pool`` (N, filters, 14, 14) after max-pool."""
    return create_feature_extractor(net, {"relu": "relu", "pool": "pool"})(x)


def grid_shape(n: int) -> tuple[int, int]:
    """Rows and columns of a grid of ``n`` panels, at most 8 across."""
    cols = min(n, 8)
    return math.ceil(n / cols), cols


def plot_filters(weight: Tensor) -> Figure:
    """The conv kernels (filters, 1, k, k), one small signed image each on one shared symmetric colour scale
    (red positive, blue negative), in filter order, with a colour bar."""
    kernels = weight.detach().float()[:, 0].numpy()
    rows, cols = grid_shape(len(kernels))
    top = float(abs(kernels).max()) or 1.0
    fig = Figure(figsize=(1.1 * cols + 1.2, 1.1 * rows + 0.6), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    norm = Normalize(-top, top)
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < len(kernels):
            image = ax.imshow(kernels[i], cmap="RdBu_r", norm=norm, interpolation="nearest")
            ax.set_title(f"filter {i}", fontsize=8)
    fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label="weight")
    fig.suptitle(f"the {len(kernels)} learned {kernels.shape[1]}x{kernels.shape[2]} conv filters (one shared scale)")
    return fig


def tiled(maps: Tensor, cols: int) -> Tensor:
    """Maps (C, H, W) as one mosaic, row-major, ``cols`` across, a 1-pixel NaN border around each: map ``j`` at rows
    ``1 + (j // cols) * (H + 1)``, columns ``1 + (j % cols) * (W + 1)``."""
    return make_grid(maps.unsqueeze(1), nrow=cols, padding=1, pad_value=float("nan"))[0]


def plot_feature_maps(images: Tensor, maps: dict[str, Tensor], labels: list[str]) -> Figure:
    """One row per image (N, 28, 28): the image, its maps after conv + ReLU and after max-pool (each a mosaic of
    `tiled` filters, on the row's one square-root scale, 0 to its largest activation, so weak responses show)."""
    n, filters = maps["relu"].shape[:2]
    rows, cols = grid_shape(filters)
    aspect = (cols * 29 + 1) / (rows * 29 + 1)
    height = 2.3
    fig = Figure(figsize=(height * (1 + 2 * aspect) + 0.8, height * n + 0.6), dpi=100)
    axes = fig.subplots(n, 3, squeeze=False, gridspec_kw={"width_ratios": [1, aspect, aspect]})
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="white")
    for i, (image_ax, relu_ax, pool_ax) in enumerate(axes):
        image_ax.imshow(images[i].numpy(), cmap="gray", interpolation="nearest")
        top = float(maps["relu"][i].max()) or 1.0
        for ax, key in ((relu_ax, "relu"), (pool_ax, "pool")):
            ax.imshow(tiled(maps[key][i], cols).numpy(), cmap=cmap, norm=PowerNorm(0.5, 0, top),
                      interpolation="nearest")
        for ax in (image_ax, relu_ax, pool_ax):
            ax.set_xticks([])
            ax.set_yticks([])
        image_ax.set_ylabel(labels[i], fontsize=9)
    size, pooled = maps["relu"].shape[-1], maps["pool"].shape[-1]
    for ax, title in zip(axes[0], ("test image", f"after conv + ReLU: {filters} maps of {size}x{size}",
                                   f"after 2x2 max-pool: {filters} maps of {pooled}x{pooled}"), strict=True):
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# The shift test: test accuracy of every test image moved by d pixels


def shifted(images: Tensor, dx: int, dy: int) -> Tensor:
    """Images (..., H, W) moved ``dx`` pixels right and ``dy`` down (negative: left, up); what comes in is 0."""
    h, w = images.shape[-2:]
    out = torch.zeros_like(images)
    if abs(dx) < w and abs(dy) < h:
        out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
            images[..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out


@torch.inference_mode()
def accuracy(trained: Trained, images: Tensor, labels: Tensor) -> float:
    """Test accuracy of uint8 images as ``evaluate`` computes it: the model's predicted class, batch by batch."""
    model = trained.model.eval()
    preds = torch.cat([model.predict_step(trained.inputs(images[i : i + EVAL_BATCH]))[1]
                       for i in range(0, len(images), EVAL_BATCH)])
    return (preds == labels).float().mean().item()


def shift_curves(trained: Trained, images: Tensor, labels: Tensor, shifts: list[int]) -> dict[str, list[float]]:
    """Accuracy at every shift, ``horizontal`` (positive: right) and ``vertical`` (positive: down); shift 0 once."""
    at_zero = accuracy(trained, images, labels)
    return {direction: [at_zero if d == 0 else accuracy(trained, shifted(images, *move(d)), labels) for d in shifts]
            for direction, move in (("horizontal", lambda d: (d, 0)), ("vertical", lambda d: (0, d)))}


def plot_shift(shifts: list[int], curves: dict[str, dict[str, list[float]]]) -> Figure:
    """Accuracy against the shift, one curve per model and direction."""
    fig = Figure(figsize=(8, 4.8), dpi=100)
    ax = fig.subplots()
    for (name, by_direction), color in zip(curves.items(), ("tab:blue", "tab:orange"), strict=False):
        for direction, style in (("horizontal", "-o"), ("vertical", "--s")):
            ax.plot(shifts, by_direction[direction], style, color=color, label=f"{name}, {direction}")
    ax.set_xticks(shifts)
    ax.set_xlabel("shift in pixels (horizontal: + right; vertical: + down; zero fill)")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy of shifted test images")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def mean_at(curves: dict[str, list[float]], shifts: list[int], k: int) -> float:
    """Mean accuracy over the four moves by ``k`` pixels: left, right, up, down (``k`` = 0: the test accuracy)."""
    return sum(curve[shifts.index(d)] for curve in curves.values() for d in (-k, k)) / 4


def pixels(k: int) -> str:
    """``1 pixel``, ``4 pixels``."""
    return f"{k} pixel{'s' * (k != 1)}"


def compared(drop: dict[str, float], k: int) -> str:
    """How the CNN's accuracy drop at ``k`` pixels compares with the dense model's, `SAME` counting as equal."""
    gap = 100 * abs(drop["CNN"] - drop["dense"])
    if gap < 100 * SAME:
        return f"at {pixels(k)} the CNN loses about as much as the dense model ({gap:.1f} points apart)"
    return f"at {pixels(k)} the CNN loses {gap:.1f} points {'less' if drop['CNN'] < drop['dense'] else 'more'} " \
           "than the dense model"


def shift_findings(shifts: list[int], curves: dict[str, dict[str, list[float]]]) -> list[str]:
    """What the curves show, in sentences with their numbers: each model's accuracy moved by 1 pixel and by the
    largest shift, the CNN's loss against the dense model's, and whether that is the tolerance the tutorial claims."""
    far = max(shifts)
    steps = [1, far] if far > 1 else [1]
    kept = {name: {k: mean_at(c, shifts, k) for k in [0, *steps]} for name, c in curves.items()}
    said = [f"Moved by {pixels(k)} (the mean of left, right, up and down), "
            + " and ".join(f"{LONG[name]}'s test accuracy goes from {acc[0]:.4f} to {acc[k]:.4f} "
                           f"({100 * (acc[k] - acc[0]):+.1f} points)" for name, acc in kept.items()) + "."
            for k in steps]
    share = {name: acc[far] / acc[0] for name, acc in kept.items()}
    if "dense" not in curves:
        return [*said, f"At {pixels(far)} the CNN keeps {share['CNN']:.0%} of its test accuracy; the dense model's "
                       "curves, to compare, need its checkpoint: against=<dense .ckpt>."]
    drops = {k: {name: acc[0] - acc[k] for name, acc in kept.items()} for k in steps}
    comparison = "; ".join(compared(drops[k], k) for k in steps)
    said.append(comparison[0].upper() + comparison[1:] + ".")
    keeps = (f"at {pixels(far)} the CNN keeps {share['CNN']:.0%} of its test accuracy and the dense model "
             f"{share['dense']:.0%}")
    if drops[1]["CNN"] >= drops[1]["dense"] - SAME:
        said.append(f"So on these checkpoints pooling buys no measurable tolerance of position beyond the dense "
                    f"model's, whatever the tutorial says: {keeps}.")
    elif share["CNN"] < INVARIANT:
        said.append(f"So pooling buys tolerance of small moves, as the tutorial says, but no invariance: {keeps}; a "
                    "2x2 max-pool absorbs a 1-pixel move at most, and the dense layer after it weighs every "
                    "position apart.")
    else:
        said.append(f"So pooling buys tolerance of position, as the tutorial says: {keeps}.")
    behind = sorted({d for direction in ("horizontal", "vertical") for d, cnn, dense
                     in zip(shifts, curves["CNN"][direction], curves["dense"][direction], strict=True) if cnn <= dense})
    said.append("The CNN stays the more accurate model at every shift tried." if not behind else
                f"The dense model is as accurate as the CNN or more at shifts {behind}.")
    return said


# Attributions: where each model looks (Captum, the optional extra)


def integrated_gradients() -> type | None:
    """Captum's ``IntegratedGradients``; None without the ``explain`` extra (imported here alone, so the rest of the
    app runs without Captum)."""
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        return None
    return IntegratedGradients


def attributions(method: type, trained: Trained, images: Tensor) -> tuple[Tensor, Tensor]:
    """Integrated Gradients of each image's predicted class, from the black image (the background) to the image, in
    the model's input pixels; returns (attributions (N, 28, 28), predicted classes (N,))."""
    model = trained.model.eval()
    x = trained.inputs(images)
    with torch.no_grad():
        preds = model.predict_step(x)[1]
    found = method(model.evaluate).attribute(x, baselines=torch.zeros_like(x), target=preds, n_steps=IG_STEPS)
    return found.detach()[:, 0], preds


def plot_attributions(images: Tensor, labels: Tensor, found: dict[str, tuple[Tensor, Tensor]]) -> Figure:
    """Five test images a block: a row of the images with their classes, then a row per model of its attributions
    for its predicted class (red raises that class's score, blue lowers it; each panel its own symmetric scale), titled
    with the prediction, green if right, red if wrong, the image's outline drawn over."""
    n, cols, per_block = len(images), min(len(images), 5), 1 + len(found)
    blocks = math.ceil(n / cols)
    fig = Figure(figsize=(2.1 * cols + 0.5, 2.2 * per_block * blocks), dpi=100)
    axes = fig.subplots(per_block * blocks, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for j in range(n):
        top_row, col = per_block * (j // cols), j % cols
        image = images[j].float().numpy()
        axes[top_row, col].imshow(image, cmap="gray", interpolation="nearest")
        axes[top_row, col].set_title(CLASS_NAMES[labels[j]], fontsize=10)
        for row, (attr, preds) in enumerate(found.values(), start=top_row + 1):
            top = float(attr[j].abs().max()) or 1.0
            ax = axes[row, col]
            ax.imshow(attr[j].numpy(), cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest")
            ax.contour(image, levels=[0.25 * image.max()], colors="black", linewidths=0.5)
            right = bool(preds[j] == labels[j])
            ax.set_title(f"{'' if right else 'x '}{CLASS_NAMES[preds[j]]}", fontsize=10,
                         color="darkgreen" if right else "red")
    for block in range(blocks):
        for row, name in enumerate(("test image", *found)):
            axes[per_block * block + row, 0].set_ylabel(name, fontsize=10)
    for j in range(n, blocks * cols):  # the last block's empty places
        for row in range(per_block):
            axes[per_block * (j // cols) + row, j % cols].axis("off")
    fig.tight_layout()
    return fig


# The page


def sections(cnn: Trained, shifts: list[int], findings: list[str], attributed: bool,
             dense_given: bool) -> list[dict[str, Any]]:
    """The page's sections: a title, the picture (None where it is missing), two sentences on what it shows (or
    why it is missing) and any further lines."""
    conv = cnn.model.net.conv
    filters, k, far = conv.out_channels, conv.kernel_size[0], max(shifts)
    found = [
        {"title": "The filters", "picture": "filters.png", "text": [
            f"The CNN's {filters} learned {k}x{k} convolution kernels, drawn from its conv layer's weights on one "
            "shared scale: a red weight adds the pixel under it, a blue one subtracts it.",
            "A kernel with red beside blue responds to an edge along that line; one of a single colour to "
            "brightness or darkness as a whole."]},
        {"title": "What each filter picks out, and what pooling keeps", "picture": "feature_maps.png", "text": [
            f"For the first test image of each class: the image, its {filters} feature maps after the convolution "
            "and ReLU (the tutorial's image copies, one per filter in filters.png's order, bright where the filter "
            "responds), and the same maps after the 2x2 max-pool, each row on one square-root colour scale.",
            "Each map keeps the image's layout and lights up a different part of it (edges on one side, outlines, "
            "flat areas); pooling halves the resolution and keeps each 2x2 block's strongest response, which is "
            "all the dense layer after it reads."]},
        {"title": "Shifted test images", "picture": "shift.png", "text": [
            f"Test accuracy when every test image is moved by -{far}..{far} pixels horizontally (solid) or "
            "vertically (dashed), the emptied border filled with black; at shift 0 it is each model's test "
            "accuracy.",
            "The tutorial credits convolution and pooling with finding a feature wherever it sits: the flatter a "
            "curve, the better a model tolerates a move.", *findings],
         "extra": ['<p>The numbers: <a href="shift.json">shift.json</a>.</p>']},
        {"title": "Where each model looks", "picture": "attributions.png" if attributed else None, "text": [
            f"Integrated Gradients (Captum, {IG_STEPS} steps from a black image) of each model's predicted class, "
            "for the same test images as above, titled with the prediction (red with an x: a mistake).",
            "Red pixels raise that class's score and blue ones lower it, each panel on its own scale; the black "
            "line is the item's outline."] if attributed else [
            f"Attributions need Captum, which is not installed: {EXTRA}, then run this again."]},
    ]
    if not dense_given:
        found.append({"title": "What needs the dense model", "text": [
            "The dense baseline's row in the table, its shift curves and its attributions need its checkpoint: add "
            "against=<dense .ckpt>, e.g. the last.ckpt of python -m fashion_lightning.train experiment=seed_dense."]})
    return found


def _relative_link(target: Path, out: Path) -> str:
    return Path(os.path.relpath(target.resolve(), out.resolve())).as_posix()


def model_rows(models: list[Trained], tutorial: DictConfig, test_acc: dict[str, float], out: Path) -> list[str]:
    """The table's rows: each model's parameters and test accuracy in the tutorial and in this run, with a link to
    its run's report where there is one."""
    rows = []
    for kind, name in (("CNN", "CNN"), ("DenseBaseline", "dense")):
        theirs = tutorial.get(kind, {})
        cells = [name, f"{theirs.get('params', 0):,}", html.escape(str(theirs.get("test_acc", "?")))]
        m = next((m for m in models if m.name == name), None)
        if m is None:
            cells += ["-", "-", "no checkpoint given (against=&lt;dense .ckpt&gt;)"]
        else:
            report = run_dir_of(m.path) / "report" / "report.md"
            link = (f'<a href="{html.escape(_relative_link(report, out))}">report.md</a>' if report.is_file()
                    else "no report/ in its run directory")
            cells += [f"{m.params:,}", f"{test_acc[name]:.4f}", f"{link}, <code>{html.escape(str(m.path))}</code>"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return rows


def page(rows: list[str], parts: list[dict[str, Any]], n_images: int) -> str:
    """``index.html``: the table of models beside the tutorial's figures, then the sections (`sections`); it links
    only the pictures and files written next to it, and the runs' reports that exist."""
    body = []
    for part in parts:
        body.append(f"<h2>{html.escape(part['title'])}</h2>")
        if part.get("picture"):
            body.append(f'<img src="{part["picture"]}" alt="{html.escape(part["title"])}">')
        body += [f"<p>{html.escape(sentence)}</p>" for sentence in part["text"]]
        body += part.get("extra", [])
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', "<title>Why the CNN wins</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
        "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}code{font-size:.85em}</style>",
        "</head><body>", "<h1>Why the CNN wins: the tutorial's argument as pictures and measurements</h1>",
        f"<p>Test accuracy on the {n_images:,} test images, as <code>python -m fashion_lightning.evaluate</code> "
        "reports it, beside the tutorial's own figures (Keras).</p>",
        "<table><tr><th>model</th><th>parameters, tutorial</th><th>test accuracy, tutorial</th>"
        "<th>parameters, this run</th><th>test accuracy, this run</th><th>this run's report, checkpoint</th></tr>",
        *rows, "</table>", *body, "</body></html>", ""])


def explain(cfg: DictConfig) -> dict[str, Any]:
    """Write the page and its pictures into ``cfg.out_dir`` (default: ``explain/`` in the CNN's run directory) and
    return what it measured. Everything is checked and loaded before anything is written; then an earlier run's
    files go, ``index.html`` first, and each file is written whole, ``index.html`` last: a run that fails midway
    never leaves a finished-looking page."""
    cfg = with_launch_paths(cfg, "ckpt_path", "against", "out_dir", *DATA_PATHS)
    shifts = list(range(-check_max_shift(cfg.max_shift), cfg.max_shift + 1))
    cnn, dense = load_models(cfg)
    models = [m for m in (cnn, dense) if m is not None]
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    images, labels = datamodule.test_set.images, datamodule.test_set.labels
    out = Path(cfg.out_dir) if cfg.out_dir else run_dir_of(cnn.path) / "explain"
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)

    picked = one_per_class(labels)
    examples = images[picked]
    write_figure(plot_filters(cnn.model.net.conv.weight), out / "filters.png")
    maps = feature_maps(plain_convnet(cnn.model.net), cnn.inputs(examples))
    write_figure(plot_feature_maps(examples, maps, [CLASS_NAMES[c] for c in labels[picked]]), out / "feature_maps.png")

    curves = {m.name: shift_curves(m, images, labels, shifts) for m in models}
    test_acc = {name: c["horizontal"][shifts.index(0)] for name, c in curves.items()}
    findings = shift_findings(shifts, curves)
    write_figure(plot_shift(shifts, curves), out / "shift.png")
    write_json(out / "shift.json", {
        "shifts": shifts, "fill": 0, "directions": {"horizontal": "positive: right", "vertical": "positive: down"},
        "n_images": len(labels), "findings": findings,
        "models": {m.name: {"checkpoint": str(m.path), "test_acc": test_acc[m.name], **curves[m.name]}
                   for m in models}})

    method = integrated_gradients()
    if method is not None:
        found = {m.name: attributions(method, m, examples) for m in models}
        write_figure(plot_attributions(examples, labels[picked], found), out / "attributions.png")
    parts = sections(cnn, shifts, findings, method is not None, dense is not None)
    write_text(out / "index.html", page(model_rows(models, cfg.tutorial, test_acc, out), parts, len(labels)))
    print(f"test accuracy {', '.join(f'{n} {a:.4f}' for n, a in test_acc.items())}; page: {out / 'index.html'}")
    return {"out_dir": str(out), "test_acc": test_acc, "shifts": shifts, "curves": curves, "findings": findings,
            "files": [name for name in OUTPUTS if (out / name).is_file()]}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="explain")
def main(cfg: DictConfig) -> None:
    with reported_as_one_line():
        explain(cfg)


if __name__ == "__main__":
    set_up_process()
    main()
