"""Two first runs extracting into one empty data_dir at once: both succeed and leave the same, verified files."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_idx_files import count_hashing

from fashion_lightning.data.idx_files import IDX_FILES, ensure_raw_files

# imports first, then waits for the parent's go: both children extract at the same moment
CHILD = """\
import sys
from fashion_lightning.data.idx_files import ensure_raw_files
print("ready", flush=True)
sys.stdin.readline()
ensure_raw_files(sys.argv[1], sys.argv[2], download=False)
"""


def test_two_first_runs_at_once_both_succeed(fmnist_source: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    runs = [subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(fmnist_source)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
            for _ in range(2)]
    try:
        for run in runs:  # the barrier: both are ready before either goes
            assert run.stdout.readline() == "ready\n", run.communicate(timeout=60)[1]
        for run in runs:
            run.stdin.write("go\n")
            run.stdin.flush()
        errors = [run.communicate(timeout=300)[1] for run in runs]
    finally:
        for run in runs:
            run.kill()
    assert [run.returncode for run in runs] == [0, 0], errors
    raw = data / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_FILES)
    for name in IDX_FILES:
        with gzip.open(fmnist_source / f"{name}.gz") as src:
            assert (raw / name).read_bytes() == src.read(), name
    hashed = count_hashing(monkeypatch)
    ensure_raw_files(data, str(fmnist_source), download=False)  # verified when extracted: nothing to hash again
    assert hashed == []
