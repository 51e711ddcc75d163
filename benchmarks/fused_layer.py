"""Does the fused conv-pool-ReLU pay? The CNN fused vs through the standard modules, same weights and batches.

    python benchmarks/fused_layer.py [--batch-size 32] [--steps 300] [--repeats 5]

Prints the median milliseconds per training step (forward, backward, fused Adam) and per 1,000-image
inference batch of ``ConvNet`` as it runs on a CPU (``ConvPoolReLU``) and of the same network through
``nn.Conv2d``, ``nn.MaxPool2d`` and ReLU, alternating the two so that machine noise hits both alike.
Synthetic batches: the cost does not depend on pixel values. ``tune_process()`` is applied, as in training.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fashion_lightning import ConvNet, keras_init_
from fashion_lightning.runtime import tune_process


def standard_forward(net: ConvNet, x: torch.Tensor) -> torch.Tensor:
    return net.out(net.fc(net.flatten(net.pool(net.conv(x)).relu())).relu())


def time_steps(net: ConvNet, forward, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    optimizer = torch.optim.Adam(net.parameters(), fused=True)
    start = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batches) * 1e3


def time_inference(forward, images: torch.Tensor, repeats: int = 10) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(repeats):
            forward(images)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tune_process()
    torch.manual_seed(0)
    batches = [(torch.rand(args.batch_size, 1, 28, 28) * (torch.rand(args.batch_size, 1, 28, 28) > 0.5),
                torch.randint(0, 10, (args.batch_size,))) for _ in range(args.steps)]
    images = torch.rand(1000, 1, 28, 28)
    train: dict[str, list[float]] = {"fused": [], "standard modules": []}
    infer: dict[str, list[float]] = {"fused": [], "standard modules": []}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for name in train:
            net = keras_init_(ConvNet())
            forward = net if name == "fused" else (lambda x, n=net: standard_forward(n, x))
            train[name].append(time_steps(net, forward, batches))
            infer[name].append(time_inference(forward, images))
    for what, times, unit in (("training", train, f"ms/step (batch {args.batch_size})"),
                              ("inference", infer, "ms per 1,000 images")):
        medians = {name: statistics.median(t[1:]) for name, t in times.items()}
        for name, ms in medians.items():
            print(f"{what:>9} {name:>16}: {ms:.3f} {unit}, median of {args.repeats}")
        print(f"{what:>9} speed-up: {medians['standard modules'] / medians['fused']:.2f}x")

if __name__ == "__main__":
    main()
