"""The comparison page: recipes per architecture, their spread over seeds, and per-class accuracy side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import one_line_error
from fashion_lightning import CLASS_NAMES, UserError
from fashion_lightning.app import CONFIG_DIR
from fashion_lightning.compare import compare

RECIPES = {  # (model, recipe): test accuracies of three seeds, and how the CNN beats the dense net on shirts
    ("fashion_lightning.CNN", "seed_cnn"): [0.912, 0.915, 0.918],
    ("fashion_lightning.CNN", "best_cnn"): [0.930, 0.932, 0.934],
    ("fashion_lightning.DenseBaseline", "seed_dense"): [0.880, 0.882, 0.884],
    ("fashion_lightning.DenseBaseline", "best_dense"): [0.899, 0.901, 0.903],
}


def write_runs(root: Path) -> None:
    for (model, recipe), accs in RECIPES.items():
        for seed, acc in enumerate(accs, 1):
            run = root / recipe / str(seed)
            (run / "report").mkdir(parents=True)
            shirt = 0.80 if "CNN" in model else 0.70
            per_class = [{"class": name, "recall": shirt if name == "Shirt" else acc} for name in CLASS_NAMES]
            (run / "report" / "report.json").write_text(json.dumps({"per_class": per_class}))
            (run / "results.json").write_text(json.dumps({
                "model": model, "recipe": recipe, "test_acc": acc, "seed": seed, "epoch_time_s": [10.0, 20.0],
                "params": 804_554 if "CNN" in model else 29_898}))
    trial = root / "tune" / "trial_0000"  # a search trial, never tested: not a result
    trial.mkdir(parents=True)
    (trial / "results.json").write_text(json.dumps({"model": "fashion_lightning.CNN", "recipe": "x-trial",
                                                    "tested": None}))


def compose_compare(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("compare", overrides=list(overrides))


def test_the_page_sets_each_tutorial_recipe_against_the_best(tmp_path: Path, trained_run: Path) -> None:
    write_runs(tmp_path / "runs")
    result = compare(compose_compare(f"runs=[{tmp_path / 'runs'}]", f"out_dir={tmp_path / 'page'}"))
    rows = {(r["architecture"], r["role"]): r for r in result["rows"]}
    assert set(rows) == {("CNN", "tutorial"), ("CNN", "best"), ("DenseBaseline", "tutorial"),
                         ("DenseBaseline", "best")}
    best = rows["CNN", "best"]
    assert best["recipe"] == "best_cnn" and best["runs"] == 3 and best["params"] == 804_554
    assert best["test_acc_mean"] == pytest.approx(0.932) and best["test_acc_std"] == pytest.approx(0.002)
    assert (best["test_acc_min"], best["test_acc_max"], best["train_time_s"]) == (0.930, 0.934, 30.0)
    assert rows["DenseBaseline", "tutorial"]["test_acc_mean"] == pytest.approx(0.882)
    page = (tmp_path / "page" / "compare.md").read_text()
    assert "| CNN | best_cnn | best | 3 | 804,554 | 0.9320 ± 0.0020 | 0.9300-0.9340 | 30 s |" in page
    assert "| Shirt | 0.800 | 0.800 | 0.700 | 0.700 |" in page  # CNN recipes first, then the dense ones
    for picture in ("accuracy_vs_time.png", "accuracy_vs_params.png", "per_class.png"):
        assert (tmp_path / "page" / picture).stat().st_size > 10_000 and f"({picture})" in page


def test_a_real_run_directory_reads(tmp_path: Path, trained_run: Path) -> None:
    shutil.copytree(trained_run, tmp_path / "runs" / "real")
    (row,) = compare(compose_compare(f"runs=[{tmp_path / 'runs'}]", f"out_dir={tmp_path / 'page'}"))["rows"]
    results = json.loads((trained_run / "results.json").read_text())
    assert (row["architecture"], row["recipe"], row["role"]) == ("CNN", "custom", "best")
    assert row["test_acc_mean"] == results["test_acc"] and row["params"] == 804_554
    assert "| Shirt |" in (tmp_path / "page" / "compare.md").read_text()


def test_no_runs_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no tested run"):
        compare(compose_compare(f"runs=[{tmp_path}]", f"out_dir={tmp_path / 'page'}"))
    with pytest.raises(UserError, match="is not a folder of runs"):
        compare(compose_compare(f"runs=[{tmp_path / 'missing'}]", f"out_dir={tmp_path / 'page'}"))


def test_runs_given_as_one_folder_reads_that_folder(tmp_path: Path) -> None:
    write_runs(tmp_path / "runs")
    result = compare(compose_compare(f"runs={tmp_path / 'runs'}", f"out_dir={tmp_path / 'page'}"))
    assert len(result["rows"]) == 4
    with pytest.raises(UserError, match=f"compare.runs names '{tmp_path / 'missing'}', which is not a folder"):
        compare(compose_compare(f"runs={tmp_path / 'missing'}", f"out_dir={tmp_path / 'page'}"))


@pytest.mark.parametrize(("text", "message"), [('{"model": "fashion_lightning.CNN", "test_a', "is not readable JSON"),
                                               ("[0.91]", "holds JSON but not an object of results")])
def test_a_results_file_that_is_not_results_is_one_clear_error(text: str, message: str, tmp_path: Path) -> None:
    write_runs(tmp_path / "runs")
    (tmp_path / "runs" / "seed_cnn" / "1" / "results.json").write_text(text)  # truncated, or another program's
    with pytest.raises(UserError, match=message):
        compare(compose_compare(f"runs=[{tmp_path / 'runs'}]", f"out_dir={tmp_path / 'page'}"))


def test_an_output_folder_that_is_a_file_is_one_clear_error(tmp_path: Path, capsys) -> None:
    write_runs(tmp_path / "runs")
    (tmp_path / "page").write_text("a file where the page's folder should be")
    cfg = compose_compare(f"runs=[{tmp_path / 'runs'}]", f"out_dir={tmp_path / 'page'}")
    err = one_line_error(lambda: compare(cfg), capsys)
    assert err.startswith(f"error: cannot use {tmp_path / 'page'}: File exists (a file where a folder is needed)")
