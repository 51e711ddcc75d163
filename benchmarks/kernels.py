"""Does the fused CNN pay? `FusedConvNet` against `ConvNet`, same weights and batches, outside Lightning.

    python benchmarks/kernels.py [--batch-size 32] [--steps 100] [--repeats 5]

Prints the median milliseconds per training step (forward, loss, backward, fused Adam) and per 1,000-image
inference batch, the two networks alternating so that machine noise hits them alike. Synthetic batches: the cost
does not depend on pixel values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashion_lightning import ConvNet, keras_init_
from fashion_lightning.nets.fused import FusedConvNet


def time_steps(net: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    optimizer = torch.optim.Adam(net.parameters(), fused=True)
    start = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batches) * 1e3


def time_inference(net: nn.Module, images: Tensor, repeats: int = 10) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(repeats):
            net(images)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.batch_size
    batches = [(torch.rand(n, 1, 28, 28) * (torch.rand(n, 1, 28, 28) > 0.5), torch.randint(0, 10, (n,)))
               for _ in range(args.steps)]
    images = torch.rand(1000, 1, 28, 28)
    nets = {"FusedConvNet": FusedConvNet, "ConvNet": ConvNet}
    train: dict[str, list[float]] = {name: [] for name in nets}
    infer: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, cls in nets.items():
            torch.manual_seed(0)
            net = keras_init_(cls())
            train[name].append(time_steps(net, batches))
            infer[name].append(time_inference(net, images))
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    for what, times, unit in (("training", train, f"ms/step (batch {n})"), ("inference", infer, "ms/1,000 images")):
        medians = {name: statistics.median(t[1:]) for name, t in times.items()}
        for name, ms in medians.items():
            print(f"{what:>9} {name:>11}: {ms:7.3f} {unit}, {ms / medians['ConvNet']:.2f} of ConvNet's, "
                  f"median of {args.repeats}")


if __name__ == "__main__":
    main()
