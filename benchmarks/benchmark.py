"""The app's default and its speed options side by side, each a whole process: the training app, a plain PyTorch
loop of the same math, and the tutorial's own Keras code.

    python benchmarks/benchmark.py                       # seed_cnn, seed_dense, fast_cnn; seeds 0,1,2; CPU
    python benchmarks/benchmark.py --recipes seed_cnn --seeds 0 --epochs 1
    python benchmarks/benchmark.py --keras-python /path/to/venv-with-tensorflow/bin/python
    python benchmarks/benchmark.py --device cuda --out benchmarks/results-gpu.md

For each recipe and seed, the processes run in turn (so that the machine's drift hits them alike):
- ``app, <option>``: ``python -m fashion_lightning.train experiment=<recipe>`` plus the option's overrides
  (`OPTIONS`: ``default`` none, ``reference`` the tutorial's plain networks, ``grouped`` 64 batches a step),
  everything the command does (start-up, data, training, validation, test, checkpoints, report);
- ``plain, <option>``: this script's own loop (``--plain``), the same network (the CNN fused or plain, as the
  option builds it), initialisation, optimizer, schedule and batches in the same order, with nothing but forward,
  loss, backward, the optimizer step and a running accuracy;
- ``keras`` (seed_cnn and seed_dense): ``keras_tutorial.py``, the tutorial's recipe in TensorFlow, run by
  ``--keras-python`` (default: this interpreter); without TensorFlow there it says so and leaves the path out.

s/epoch: the median over epochs of the training steps' wall time (validation excluded); whole s: the process from
start to exit; CPU s: user + system; peak MiB: the process's largest resident set. Lightning / plain divides the
app's s/epoch by the plain loop's, option by option; whole / Keras divides each seed's whole-run time by that of
Keras's run of the same seed, run next to it, and gives the median over the seeds.
The real data is needed: ``apt-get install dataset-fashion-mnist`` or ``--data-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ("seed_cnn", "seed_dense", "fast_cnn")
OPTIONS = {"default": [], "reference": ["model.fused=false"], "grouped": ["steps_per_execution=64"]}
"""The app's options compared: the default (the fused network, one batch a step), the tutorial's plain networks, and
grouped steps (Keras' steps_per_execution)."""
PATHS = ("app, default", "app, grouped", "app, reference", "plain, default", "plain, reference", "keras")
KERAS = Path(__file__).with_name("keras_tutorial.py")


def overrides(recipe: str, speed: str, seed: int, args: argparse.Namespace) -> list[str]:
    extra = [f"experiment={recipe}", *OPTIONS[speed], f"seed={seed}",
             f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}"]
    if args.data_dir:
        extra.append(f"paths.data_dir={args.data_dir}")
    if args.epochs:
        extra.append(f"trainer.max_epochs={args.epochs}")
    return extra


def plain(recipe: str, speed: str, seed: int, args: argparse.Namespace) -> dict:
    """The plain loop (``--plain``): what the app's training computes, without Lightning."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fashion_lightning.app import CONFIG_DIR
    from fashion_lightning.data.datamodule import BatchLoader

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides(recipe, speed, seed, args))
    L.seed_everything(cfg.seed, verbose=False)  # as train(cfg) does, before building the data and the model
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    datamodule.setup()
    device = torch.device(args.device)
    net, hp, dhp = model.net.to(device), model.hparams, datamodule.hparams  # the app's network: fused or plain
    optimizer = torch.optim.Adam(net.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                 weight_decay=hp.weight_decay, fused=True)
    images, labels = (t.to(device) for t in (datamodule.train_set.images, datamodule.train_set.labels))
    loader = BatchLoader(images, labels, dhp.batch_size, shuffle=True, seed=dhp.seed, scale=dhp.scale)
    epochs = cfg.trainer.max_epochs
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=epochs * len(loader))
                 if hp.schedule == "onecycle" else None)
    times, train_acc = [], 0.0
    for _ in range(epochs):
        correct = torch.zeros((), device=device)
        start = time.perf_counter()
        for x, y in loader:
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            correct += (logits.detach().argmax(1) == y).sum()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        train_acc = correct.item() / len(labels)
    test_x, test_y = datamodule.test_set.images, datamodule.test_set.labels
    with torch.no_grad():
        hits = sum(int((net(x).argmax(1) == y).sum())
                   for x, y in BatchLoader(test_x.to(device), test_y.to(device), 1000, scale=dhp.scale))
    return {"epoch_time_s": times, "test_acc": hits / len(test_y), "train_acc": train_acc}


def measure(command: list[str], cwd: Path) -> tuple[str, dict]:
    """Run ``command`` as a process; its stdout, and its wall seconds, CPU seconds and peak resident MiB."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return stdout, {"whole_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}


def run(path: str, recipe: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict:
    kind, _, speed = path.partition(", ")
    if kind == "keras":
        flags = ["--data-dir", args.data_dir] if args.data_dir else []
        flags += ["--epochs", str(args.epochs)] if args.epochs else []
        stdout, usage = measure([args.keras_python, str(KERAS), recipe, "--seed", str(seed), *flags], workdir)
        results = json.loads(stdout.strip().splitlines()[-1])
    elif kind == "plain":
        flags = ["--data-dir", args.data_dir] if args.data_dir else []
        flags += ["--epochs", str(args.epochs)] if args.epochs else []
        stdout, usage = measure([sys.executable, __file__, "--plain", recipe, speed, str(seed), "--device",
                                 args.device, *flags], workdir)
        results = json.loads(stdout.strip().splitlines()[-1])
    else:
        root = workdir / f"{recipe}-{speed}-{seed}"
        _, usage = measure([sys.executable, "-m", "fashion_lightning.train", *overrides(recipe, speed, seed, args),
                            f"paths.output_root={root}"], workdir)
        (results_file,) = root.glob("runs/*/results.json")
        results = json.loads(results_file.read_text())
    return {**usage, "s_epoch": statistics.median(results["epoch_time_s"]), "test_acc": results["test_acc"],
            "train_acc": results.get("train_acc")}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def table(runs: dict[tuple[str, str], list[dict]], title: str) -> str:
    lines = [title, "", "| recipe | path | s/epoch | whole s | CPU s | peak MiB | test acc, mean (min-max) | "
             "final-epoch train acc | Lightning / plain | whole / Keras |",
             "|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for (recipe, path), results in runs.items():
        if not results:
            continue
        med = {key: statistics.median(r[key] for r in results) for key in ("s_epoch", "whole_s", "cpu_s", "peak_mib")}
        plain_runs = runs.get((recipe, path.replace("app", "plain")), []) if path.startswith("app") else []
        ratio = med["s_epoch"] / statistics.median(r["s_epoch"] for r in plain_runs) if plain_runs else None
        keras_runs = runs.get((recipe, "keras"), [])
        pairs = [r["whole_s"] / k["whole_s"] for r, k in zip(results, keras_runs, strict=False)]  # seed by seed
        to_keras = statistics.median(pairs) if pairs else None
        lines.append(f"| {recipe} | {path} | {med['s_epoch']:.2f} | {med['whole_s']:.1f} | {med['cpu_s']:.1f} | "
                     f"{med['peak_mib']:,.0f} | {spread([r['test_acc'] for r in results])} | "
                     f"{spread([r['train_acc'] for r in results])} | {'' if ratio is None else f'{ratio:.3f}'} | "
                     f"{'' if to_keras is None else f'{to_keras:.3f}'} |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    """The CPU's model name and the kernel set torch picks on it (they differ between machines of one kind)."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'CPU'}, {torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--paths", default=",".join(p.replace(", ", ":") for p in PATHS),
                        help="comma-separated, of app:default, app:grouped, app:reference, plain:default, "
                             "plain:reference, keras")
    parser.add_argument("--keras-python", default=sys.executable,
                        help="an interpreter with TensorFlow for the keras path (default: this one)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; accuracy is reported over them")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epoch count")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data-dir", default=None, help="paths.data_dir (default: the app's)")
    parser.add_argument("--out", default="benchmarks/results.md", help="where to write the Markdown table")
    parser.add_argument("--plain", nargs=3, metavar=("RECIPE", "SPEED", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        recipe, speed, seed = args.plain
        print(json.dumps(plain(recipe, speed, int(seed), args)))
        return
    recipes, seeds = args.recipes.split(","), [int(s) for s in args.seeds.split(",")]
    paths = [p.replace(":", ", ") for p in args.paths.split(",")]
    if bad := [r for r in recipes if r not in RECIPES] + [p for p in paths if p not in PATHS]:
        parser.error(f"unknown recipe or path {bad[0]!r}; choose from {', '.join(RECIPES)} and {', '.join(PATHS)}")
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())
    if "keras" in paths and subprocess.run([args.keras_python, "-c", "import tensorflow"],
                                           capture_output=True).returncode != 0:
        print(f"no TensorFlow for {args.keras_python}: the keras path is left out "
              "(pip install tensorflow-cpu there, or pass --keras-python)", flush=True)
        paths.remove("keras")
    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    title = (f"Device: {args.device} ({device}), torch {torch.__version__}, {os.cpu_count()} CPUs, seeds {args.seeds}, "
             f"{time.strftime('%Y-%m-%d')}; `python benchmarks/benchmark.py {' '.join(sys.argv[1:])}`".rstrip())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, str], list[dict]] = {(r, p): [] for r in recipes for p in paths}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            for seed in seeds:
                for path in paths:
                    if path == "keras" and recipe not in ("seed_cnn", "seed_dense"):
                        continue  # the tutorial has no such recipe
                    runs[recipe, path].append(run(path, recipe, seed, args, Path(tmp)))
                    print(recipe, path, seed, runs[recipe, path][-1], flush=True)
                out.write_text(table(runs, title))  # after each seed: a run cut short keeps what it measured
    print(table(runs, title))


if __name__ == "__main__":
    main()
