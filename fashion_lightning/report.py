"""The evaluation report: test-set predictions, per-class table, confusion matrix, samples and curves as PNGs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torchmetrics.functional.classification import multiclass_confusion_matrix
from torchvision.utils import make_grid

from fashion_lightning.app import write_figure, write_json, write_text
from fashion_lightning.data.datamodule import CLASS_NAMES, BatchLoader, FashionMNISTDataModule, to_input
from fashion_lightning.lit.classifier import ImageClassifier

METRICS_CSV = "logs/metrics.csv"
"""Where the CSV logger (conf/logger/csv.yaml) writes per-epoch metrics, relative to the run directory."""


@torch.inference_mode()
def predict_test_set(model: ImageClassifier, datamodule: FashionMNISTDataModule) -> tuple[Tensor, Tensor, Tensor]:
    """Class probabilities (N, 10), the scaled images (N, 1, 28, 28) and labels (N,) of the official test set."""
    datamodule.setup("test")
    images, labels = datamodule.test_set.images, datamodule.test_set.labels
    loader = BatchLoader(images, labels, 1000, scale=datamodule.hparams.scale)
    model = model.eval().cpu()
    probs = torch.cat([model.predict_step(x)[0] for x, _ in loader])
    pixels = to_input(images, datamodule.hparams.scale)
    return probs, pixels, labels


def class_table(confusion: Tensor) -> list[dict[str, Any]]:
    """Per-class support, precision, recall (the class's own accuracy) and F1 from a confusion matrix."""
    rows = []
    for i, name in enumerate(CLASS_NAMES):
        tp, support, predicted = confusion[i, i].item(), confusion[i].sum().item(), confusion[:, i].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "support": support, "precision": precision, "recall": recall, "f1": f1})
    return rows


def plot_confusion(confusion: Tensor, path: Path) -> None:
    """Counts in cells, class names on both axes."""
    fig = Figure(figsize=(9, 8), dpi=100)
    ax = fig.subplots()
    ax.imshow(confusion.numpy(), cmap="Blues")
    ticks = range(len(CLASS_NAMES))
    ax.set_xticks(ticks, CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = confusion.max().item() / 2
    for (i, j), count in zip(((i, j) for i in ticks for j in ticks), confusion.flatten().tolist(), strict=True):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color="white" if count > threshold else "black")
    ax.set_title("Confusion matrix (test set)")
    fig.tight_layout()
    write_figure(fig, path)


def plot_samples(pixels: Tensor, labels: Tensor, preds: Tensor, path: Path, n: int = 36) -> None:
    """A grid of test images captioned true/predicted; mistakes in red. Shows every mistake it can fit.

    One picture of all the tiles (`torchvision.utils.make_grid`) on one axes: a subplot per image costs seconds."""
    wrong = (preds != labels).nonzero().flatten()
    right = (preds == labels).nonzero().flatten()
    k = min(len(wrong), n // 2)
    chosen = torch.cat([wrong[:k], right[: n - k]]).sort().values
    cols, pad, caption = 6, 2, 12  # pixels between tiles, and above each for its caption
    tiles = F.pad(pixels[chosen], (0, 0, caption, 0), value=1.0)  # white caption space above each image
    grid = make_grid(tiles, nrow=cols, padding=pad, pad_value=1.0)[0]
    width, title = 9.6, 0.4  # inches: the grid's width, and the title's strip above it
    height = width * grid.shape[0] / grid.shape[1]
    fig = Figure(figsize=(width, height + title), dpi=100)
    ax = fig.add_axes((0.0, 0.0, 1.0, height / (height + title)))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.axis("off")
    step_x, step_y = 28 + pad, 28 + caption + pad
    for i, idx in enumerate(chosen.tolist()):
        ok = bool(preds[idx] == labels[idx])
        ax.text(pad + (i % cols) * step_x + 14, pad + (i // cols) * step_y + caption / 2,
                f"{CLASS_NAMES[labels[idx]]}\n{'' if ok else 'x '}{CLASS_NAMES[preds[idx]]}", fontsize=7,
                ha="center", va="center", color="black" if ok else "red")
    fig.suptitle("test images: true (top) / predicted (bottom, red = mistake)", fontsize=9)
    write_figure(fig, path)


def read_epoch_metrics(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch series (epoch, value) of every logged ``train/``/``val/`` metric in a Lightning metrics.csv."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith(("train/", "val/")) and value not in ("", None):
                    series.setdefault(key, []).append((int(float(row["epoch"])), float(value)))
    return series


def plot_curves(metrics_csv: Path, path: Path) -> None:
    """Train and validation loss and accuracy per epoch."""
    series = read_epoch_metrics(metrics_csv)
    fig = Figure(figsize=(10, 4), dpi=100)
    for axis, what in zip(fig.subplots(1, 2), ("loss", "acc"), strict=True):
        for split in ("train", "val"):
            points = series.get(f"{split}/{what}", [])
            axis.plot([e + 1 for e, _ in points], [v for _, v in points], marker="o", label=split)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title("accuracy" if what == "acc" else "loss")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    write_figure(fig, path)


def write_report(model: ImageClassifier, datamodule: FashionMNISTDataModule, out_dir: str | Path,
                 metrics_csv: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on the test set and write ``out_dir``: report.md, report.json and the PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for done in ("report.md", "report.json"):  # written last: a report that fails midway never looks finished
        (out / done).unlink(missing_ok=True)
    probs, pixels, labels = predict_test_set(model, datamodule)
    preds = probs.argmax(dim=1)
    confusion = multiclass_confusion_matrix(preds, labels, len(CLASS_NAMES))
    rows = class_table(confusion)
    summary = {
        "test_acc": (preds == labels).float().mean().item(),
        "test_loss": F.nll_loss(probs.clamp_min(1e-12).log(), labels).item(),
        "n": len(labels),
        "per_class": rows,
        "confusion_matrix": confusion.tolist(),
    }
    plot_confusion(confusion, out / "confusion_matrix.png")
    plot_samples(pixels, labels, preds, out / "samples.png")
    pictures = ["confusion_matrix.png", "samples.png"]
    if metrics_csv is not None and Path(metrics_csv).is_file():
        plot_curves(Path(metrics_csv), out / "curves.png")
        pictures.append("curves.png")
    table = ["| class | support | precision | recall (class accuracy) | F1 |", "|---|---:|---:|---:|---:|"]
    table += [f"| {r['class']} | {r['support']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} |"
              for r in rows]
    text = [f"# Evaluation report: {type(model).__name__}", "",
            f"Test accuracy **{summary['test_acc']:.4f}**, mean cross-entropy loss {summary['test_loss']:.4f} "
            f"on the {summary['n']:,} official test images.", "", *table, "",
            *[f"![{p[:-4]}]({p})" for p in pictures], ""]
    write_text(out / "report.md", "\n".join(text))
    write_json(out / "report.json", summary)
    return summary
