"""How far each architecture goes: ``python -m fashion_lightning.compare`` reads finished runs and writes one page.

Runs are grouped by architecture and recipe (``results.json``'s ``model`` and ``recipe``). For each architecture the
page sets the tutorial's recipe against the best other recipe found (by mean test accuracy over its seeds), with
the spread over seeds, and draws test accuracy against training time and against parameters, and the per-class
accuracy of both architectures side by side (from each run's ``report/report.json``).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from matplotlib.figure import Figure
from omegaconf import DictConfig

from fashion_lightning.app import (
    CONFIG_DIR,
    as_list,
    reported_as_one_line,
    set_up_process,
    with_launch_paths,
    write_figure,
    write_json,
    write_text,
)
from fashion_lightning.data.datamodule import CLASS_NAMES
from fashion_lightning.errors import UserError


@dataclass
class Recipe:
    """The tested runs of one recipe on one architecture."""

    architecture: str
    name: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accs(self) -> list[float]:
        return [r["test_acc"] for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.mean(self.accs)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accs) if len(self.runs) > 1 else 0.0

    @property
    def train_time(self) -> float:
        """Median seconds of training epochs (validation and set-up excluded) per run: robust to a run slowed by
        another process."""
        return statistics.median(sum(r["epoch_time_s"]) for r in self.runs)

    @property
    def params(self) -> int:
        return self.runs[0]["params"]

    def per_class(self) -> list[float] | None:
        """Mean per-class test accuracy (recall) over the runs that wrote a report; None without any."""
        tables = [r["per_class"] for r in self.runs if r.get("per_class")]
        if not tables:
            return None
        return [statistics.mean(t[i]["recall"] for t in tables) for i in range(len(CLASS_NAMES))]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; one clear error for a file that is not one (truncated, or another program's)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} is not readable JSON ({type(err).__name__}: {err}); move it out of compare.runs "
                        "or delete it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds JSON but not an object of results; move it out of compare.runs or delete it")
    return data


def read_runs(folders: list[str]) -> dict[tuple[str, str], Recipe]:
    """Every tested run under ``folders`` (a ``results.json`` with a test accuracy), by (architecture, recipe)."""
    recipes: dict[tuple[str, str], Recipe] = {}
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"compare.runs names {folder!r}, which is not a folder of runs")
        for path in sorted(Path(folder).rglob("results.json")):
            results = read_json(path)
            if results.get("test_acc") is None or "model" not in results:
                continue  # a search trial (never tested) or another file of that name
            report = path.parent / "report" / "report.json"
            if report.is_file():
                results["per_class"] = read_json(report).get("per_class")
            arch = results["model"].rsplit(".", 1)[-1]
            key = (arch, results.get("recipe", "custom"))
            recipes.setdefault(key, Recipe(*key)).runs.append(results)
    if not recipes:
        raise UserError(f"no tested run (results.json with test_acc) under {', '.join(map(str, folders))}; "
                        "train some first, e.g. python -m fashion_lightning.train -m experiment=seed_cnn seed=1,2,3")
    return recipes


def pairs(recipes: dict[tuple[str, str], Recipe],
          tutorial: dict[str, str]) -> dict[str, tuple[Recipe | None, Recipe | None]]:
    """Per architecture: (the tutorial's recipe, the best other recipe by mean test accuracy), either may be None."""
    out = {}
    for arch in sorted({a for a, _ in recipes}):
        own = recipes.get((arch, tutorial.get(arch, "")))
        others = [r for (a, n), r in recipes.items() if a == arch and r is not own]
        out[arch] = (own, max(others, key=lambda r: r.mean, default=None))
    return out


def plot_accuracy_against(recipes: dict[tuple[str, str], Recipe], x: str, path: Path) -> None:
    """Test accuracy of each run (dots) and each recipe's mean ± std (bars) against ``x``: "time" or "params"."""
    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.subplots()
    for recipe in recipes.values():
        xs = [sum(r["epoch_time_s"]) if x == "time" else r["params"] for r in recipe.runs]
        dots = ax.scatter(xs, recipe.accs, s=14, alpha=0.5)
        ax.errorbar(statistics.mean(xs), recipe.mean, yerr=recipe.std, fmt="o", color=dots.get_facecolor()[0],
                    capsize=4, label=f"{recipe.architecture} {recipe.name} (n={len(recipe.runs)})")
    ax.set_xlabel("training time, s (epochs only)" if x == "time" else "parameters")
    if x == "params":
        ax.set_xscale("log")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(fig, path)


def plot_per_class(shown: dict[str, list[float]], path: Path) -> None:
    """Grouped bars: the per-class test accuracies of each recipe (by label) in ``shown``."""
    fig = Figure(figsize=(11, 5), dpi=100)
    ax = fig.subplots()
    width = 0.8 / len(shown)
    for i, (label, accuracies) in enumerate(shown.items()):
        ax.bar([c + (i - (len(shown) - 1) / 2) * width for c in range(len(CLASS_NAMES))], accuracies, width,
               label=label)
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=30, ha="right")
    ax.set_ylabel("test accuracy of the class")
    ax.set_ylim(0.5, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(fig, path)


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Write ``cfg.out_dir``/compare.md and its PNGs from the runs under ``cfg.runs``; return the table's rows."""
    cfg = with_launch_paths(cfg, "paths.output_root", "runs", "out_dir")
    recipes = read_runs(as_list(cfg.runs))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = pairs(recipes, dict(cfg.tutorial))
    rows = [{"architecture": r.architecture, "recipe": r.name, "role": role, "runs": len(r.runs), "params": r.params,
             "test_acc_mean": r.mean, "test_acc_std": r.std, "test_acc_min": min(r.accs),
             "test_acc_max": max(r.accs), "train_time_s": r.train_time}
            for arch, (own, best) in chosen.items()
            for role, r in (("tutorial", own), ("best", best)) if r is not None]
    text = ["# How far each architecture goes", "",
            "Test accuracy on the 10,000 official test images, mean ± standard deviation over seeds (min-max); "
            "training time is the median over the runs of their training epochs' seconds (validation and set-up "
            "excluded).", "",
            "| architecture | recipe | role | runs | parameters | test accuracy | min-max | training time |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    text += [f"| {r['architecture']} | {r['recipe']} | {r['role']} | {r['runs']} | {r['params']:,} | "
             f"{r['test_acc_mean']:.4f} ± {r['test_acc_std']:.4f} | {r['test_acc_min']:.4f}-{r['test_acc_max']:.4f} "
             f"| {r['train_time_s']:.0f} s |" for r in rows]
    plot_accuracy_against(recipes, "time", out / "accuracy_vs_time.png")
    plot_accuracy_against(recipes, "params", out / "accuracy_vs_params.png")
    text += ["", "![accuracy against training time](accuracy_vs_time.png)", "",
             "![accuracy against parameters](accuracy_vs_params.png)", ""]
    per_class = {f"{r.architecture} {r.name}": r.per_class() for pair in chosen.values() for r in pair if r}
    shown = {label: accuracies for label, accuracies in per_class.items() if accuracies is not None}
    if shown:
        plot_per_class(shown, out / "per_class.png")
        text += ["## Per class", "", "| class | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]
        text += [f"| {name} | " + " | ".join(f"{c[i]:.3f}" for c in shown.values()) + " |"
                 for i, name in enumerate(CLASS_NAMES)]
        text += ["", "![per-class accuracy](per_class.png)", ""]
    write_text(out / "compare.md", "\n".join(text))
    write_json(out / "compare.json", rows)
    return {"rows": rows, "page": str(out / "compare.md")}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compare")
def main(cfg: DictConfig) -> None:
    with reported_as_one_line():
        result = compare(cfg)
    print(f"compared {len(result['rows'])} recipes: {result['page']}")


if __name__ == "__main__":
    set_up_process()
    main()
