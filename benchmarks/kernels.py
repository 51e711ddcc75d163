"""Do the fast option's kernels pay? Each network through them against the standard modules, same weights and batches.

    python benchmarks/kernels.py [--model cnn|dense] [--batch-size 32] [--steps 300] [--repeats 5]

Prints the median milliseconds per training step (forward, loss, backward, fused Adam) and per 1,000-image
inference batch, the variants alternating so that machine noise hits them alike:
- ``fast``: what the fast loop runs, `networks.loss_and_grads` (the dense net by hand, without autograd) or
  `networks.logits` (the CNN through ``ConvPoolReLU`` and ``LinearReLU``) with autograd, and Adam's fused kernel
  called directly (`private.fused_adam_step`);
- for the CNN, ``ConvPoolReLU only``: the dense layers through ``nn.Linear`` + ReLU;
- ``standard modules``: the network's own forward (``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.Linear``, ReLU), autograd.
Synthetic batches (raw 0-255 pixels for the dense net, as ``seed_dense`` trains): the cost does not depend on pixel
values. The fast option's process settings (`tune_process`) apply to all of them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashion_lightning import ConvNet, DenseNet, keras_init_
from fashion_lightning.fast import kernels, networks, private, tune_process

Forward = Callable[[Tensor], Tensor]


def cnn_variants(net: ConvNet) -> dict[str, Forward]:
    def conv_only(x: Tensor) -> Tensor:
        h = kernels.ConvPoolReLU.apply(x, net.conv.weight, net.conv.bias)
        return net.out(F.relu(net.fc(h)))

    return {"fast": lambda x: networks.logits(net, x), "ConvPoolReLU only": conv_only, "standard modules": net}


def dense_variants(net: DenseNet) -> dict[str, Forward]:
    return {"fast": lambda x: networks.logits(net, x), "standard modules": net}


def time_steps(net: nn.Module, forward: Forward, batches: list[tuple[Tensor, Tensor]], fast: bool) -> float:
    """Milliseconds per step; ``fast``: the fast loop's step (the dense net by hand, Adam's kernel called directly)."""
    optimizer = torch.optim.Adam(net.parameters(), fused=True)
    start = time.perf_counter()
    for x, y in batches:
        if not fast or networks.loss_and_grads(net, x, y) is None:
            loss = F.cross_entropy(forward(x), y)
            optimizer.zero_grad()
            loss.backward()
        if not (fast and private.fused_adam_step(optimizer)):
            optimizer.step()
    return (time.perf_counter() - start) / len(batches) * 1e3


def time_inference(forward: Forward, images: Tensor, repeats: int = 10) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(repeats):
            forward(images)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["cnn", "dense"], default="cnn")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tune_process()
    torch.manual_seed(0)
    scale = 255.0 if args.model == "dense" else 1.0
    batches = [(scale * torch.rand(args.batch_size, 1, 28, 28) * (torch.rand(args.batch_size, 1, 28, 28) > 0.5),
                torch.randint(0, 10, (args.batch_size,))) for _ in range(args.steps)]
    images = scale * torch.rand(1000, 1, 28, 28)
    cls, variants = (ConvNet, cnn_variants) if args.model == "cnn" else (DenseNet, dense_variants)
    names = list(variants(cls()))
    train: dict[str, list[float]] = {name: [] for name in names}
    infer: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for name in names:
            net = keras_init_(cls())
            forward = variants(net)[name]
            train[name].append(time_steps(net, forward, batches, fast=name == "fast"))
            infer[name].append(time_inference(forward, images))
    print(f"AVX-512: {kernels.AVX512}, so the fast kernels' GEMMs run on {'oneDNN' if kernels.ONEDNN else 'MKL'}")
    for what, times, unit in (("training", train, f"ms/step (batch {args.batch_size})"),
                              ("inference", infer, "ms per 1,000 images")):
        medians = {name: statistics.median(t[1:]) for name, t in times.items()}
        for name, ms in medians.items():
            speedup = medians["standard modules"] / ms
            print(f"{args.model} {what:>9} {name:>18}: {ms:7.3f} {unit}, {speedup:.2f}x the standard modules,"
                  f" median of {args.repeats}")


if __name__ == "__main__":
    main()
