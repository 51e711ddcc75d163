"""Side by side, in one process: the tutorial's recipes through the training app vs a plain PyTorch loop.

    python benchmarks/benchmark.py                                   # seed_cnn, seed_dense, dense_scaled, fast_cnn
    python benchmarks/benchmark.py --recipes seed_cnn --seeds 0 --epochs 1
    python benchmarks/benchmark.py --device cuda --out benchmarks/results-gpu.md

Each Lightning run is ``fashion_lightning.train.train(cfg)`` on the composed config, the code path of
``python -m fashion_lightning.train experiment=...`` (progress bar and CSV logging included). The plain loop
trains the same network (same init, same Adam settings, same batches in the same order from the same
in-memory tensors) with ``module.loss_and_grads`` (zero_grad and backward, or the network's own loss and
gradients, ``DenseNet.loss_and_grads``, exactly as the training module) and ``optimizer.step()``, plus running
accuracy/loss sums, nothing else: the ratio is Lightning's own cost. s/epoch is the median over epochs of
the training steps' wall time (validation excluded); peak memory is the process's peak resident set during
the run (CPU) or peak allocated CUDA memory (GPU). The real data is needed: ``apt-get install
dataset-fashion-mnist`` or ``--data-dir``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fashion_lightning.data import BatchLoader
from fashion_lightning.module import loss_and_grads
from fashion_lightning.runtime import tune_process
from fashion_lightning.train import CONFIG_DIR, train

RECIPES = {
    "seed_cnn": ["experiment=seed_cnn"],
    "seed_dense": ["experiment=seed_dense"],
    "dense_scaled": ["experiment=seed_dense", "data.scale=true"],  # the honest architecture comparison
    "fast_cnn": ["experiment=fast_cnn"],
}


class PeakMemory:
    """Peak resident memory (CPU) or peak allocated memory (CUDA) while the ``with`` block runs, in MiB."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self._stop = device, 0.0, threading.Event()

    def _rss(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()


def compose_recipe(recipe: str, seed: int, args: argparse.Namespace, out: Path) -> object:
    overrides = [*RECIPES[recipe], f"seed={seed}", f"paths.output_dir={out}", f"paths.output_root={out.parent}",
                 "report=false", f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}"]
    if args.data_dir:
        overrides.append(f"paths.data_dir={args.data_dir}")
    if args.epochs:
        overrides.append(f"trainer.max_epochs={args.epochs}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def lightning_run(cfg: object, device: str) -> dict:
    with PeakMemory(device) as memory:
        results = train(cfg)
    return {"s_epoch": statistics.median(results["epoch_time_s"]), "test_acc": results["test_acc"],
            "train_acc": results.get("train_acc"), "peak_mib": memory.peak, "whole_s": results["wall_time_s"]}


def plain_run(cfg: object, device: str) -> dict:
    """The identical math, per batch as the training module computes it, as a bare loop: same init (same seed),
    same optimizer, same batches."""
    torch.manual_seed(cfg.seed)
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    datamodule.setup()
    net = model.net.to(device)
    hp = model.hparams
    optimizer = torch.optim.Adam(net.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                 weight_decay=hp.weight_decay, fused=True)
    dhp = datamodule.hparams
    images, labels = (t.to(device) for t in datamodule.train_set)
    loader = BatchLoader(images, labels, dhp.batch_size, shuffle=True, seed=dhp.seed, scale=dhp.scale)
    times, train_acc = [], 0.0
    with PeakMemory(device) as memory:
        for _ in range(cfg.trainer.max_epochs):
            correct = torch.zeros((), device=device)
            loss_sum = torch.zeros((), device=device)
            start = time.perf_counter()
            for x, y in loader:
                loss, logits = loss_and_grads(net, x, y, optimizer)
                optimizer.step()
                correct += (logits.detach().argmax(1) == y).sum()
                loss_sum += loss.detach() * len(y)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            train_acc = correct.item() / len(labels)
        test_x, test_y = (t.to(device) for t in datamodule.test_set)
        with torch.no_grad():
            hits = sum(int((net(x).argmax(1) == y).sum()) for x, y in
                       BatchLoader(test_x, test_y, 1000, scale=dhp.scale))
    return {"s_epoch": statistics.median(times), "test_acc": hits / len(test_y), "train_acc": train_acc,
            "peak_mib": memory.peak, "whole_s": None}


def cli_wall_time(recipe: str, args: argparse.Namespace, out: Path) -> float:
    """The whole ``python -m fashion_lightning.train experiment=...`` command: start-up, data, fit, test, report."""
    command = [sys.executable, "-m", "fashion_lightning.train", *RECIPES[recipe], f"paths.output_root={out}",
               f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}"]
    if args.data_dir:
        command.append(f"paths.data_dir={args.data_dir}")
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} (min {min(values):.4f}, max {max(values):.4f})"


def recipe_rows(recipe: str, runs: dict[str, list[dict]], n_train: int, whole: list[float]) -> list[dict]:
    """The table's rows for one recipe: per path, medians of the runs' s/epoch, accuracy over the seeds."""
    medians = {k: statistics.median(r["s_epoch"] for r in v) for k, v in runs.items() if v}
    return [{
        "recipe": recipe, "path": path, "s_epoch": medians[path], "img_s": n_train / medians[path],
        "peak": max(r["peak_mib"] for r in results),
        "test": spread([r["test_acc"] for r in results]),
        "train": spread([r["train_acc"] for r in results if r["train_acc"] is not None]),
        "run_s": statistics.median(r["whole_s"] for r in results) if path == "lightning" else None,
        "cli_s": statistics.median(whole) if whole and path == "lightning" else None,
        "ratio": medians["lightning"] / medians["plain"] if path == "lightning" and "plain" in medians else None,
    } for path, results in runs.items() if results]


def markdown(rows: list[dict], title: str) -> str:
    header = ("| recipe | path | s/epoch (median) | images/s | peak MiB | test acc (mean, min-max) | "
              "final-epoch train acc | train() s | whole CLI run s | Lightning / plain |\n"
              "|---|---|---:|---:|---:|---|---|---:|---:|---:|\n")
    lines = [f"| {r['recipe']} | {r['path']} | {r['s_epoch']:.2f} | {r['img_s']:,.0f} | {r['peak']:,.0f} | "
             f"{r['test']} | {r['train']} | {fmt(r['run_s'], '.1f')} | {fmt(r['cli_s'], '.1f')} | "
             f"{fmt(r['ratio'], '.3f')} |" for r in rows]
    return f"{title}\n\n{header}" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; accuracy is reported over them")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epoch count")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data-dir", default=None, help="paths.data_dir (default: the app's)")
    parser.add_argument("--cli-runs", type=int, default=1, help="whole CLI runs of seed_cnn to time end to end")
    parser.add_argument("--out", default="benchmarks/results.md", help="where to write the Markdown table")
    args = parser.parse_args()
    tune_process()  # train() applies it too; here it holds for the plain loop whichever runs first
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'CPU'}"
    title = (f"Device: {args.device} ({device_name}), torch {torch.__version__}, {os.cpu_count()} CPUs, "
             f"seeds {args.seeds}, {time.strftime('%Y-%m-%d')}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            runs: dict[str, list[dict]] = {"lightning": [], "plain": []}
            for seed in seeds:
                cfg = compose_recipe(recipe, seed, args, Path(tmp) / f"{recipe}-{seed}")
                runs["lightning"].append(lightning_run(cfg, args.device))
                if cfg.model.schedule == "constant":
                    runs["plain"].append(plain_run(cfg, args.device))
                print(recipe, seed, {k: v[-1] for k, v in runs.items() if v}, flush=True)
            n_train = 60_000 - cfg.data.val_split if cfg.data.val_split else 60_000
            whole = [cli_wall_time(recipe, args, Path(tmp) / "cli") for _ in range(args.cli_runs)] \
                if recipe == "seed_cnn" else []
            rows += recipe_rows(recipe, runs, n_train, whole)
            out.write_text(markdown(rows, title))  # after each recipe: a cut-short run keeps what it measured
    print(markdown(rows, title))


if __name__ == "__main__":
    main()
