"""benchmarks.gpu_check as a dry run on the CPU, on the test architectures with small settings: it
finishes, and its table has every check of every model, the float32 ones passing. No GPU runs in
CI; this keeps the check a GPU will run first from rotting."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.gpu_check import COLUMNS
from harness.servers import REPO

MODELS = {"test_vit": 4, "test_sam2.1_hiera": 5}  # checks: automatic, prompts, image_id, large image (, video)
DRY_RUN = ["--device", "cpu", "--models", ",".join(MODELS), "--points-per-side", "2", "--frames", "2",
           "--large-megapixels", "0.3"]  # fmt: skip


def test_the_gpu_check_runs_on_the_cpu_and_every_float32_row_passes():
    ran = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *DRY_RUN], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    lines = ran.stdout.splitlines()
    assert "| " + " | ".join(COLUMNS) + " |" in lines
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| test_")]
    assert all(len(row) == len(COLUMNS) for row in rows), rows
    dtypes = {row[1] for row in rows}
    assert "float32" in dtypes or "float32 (= auto)" in dtypes
    for model, checks in MODELS.items():
        assert sum(row[0] == model for row in rows) == checks * len(dtypes), (model, rows)
    assert {row[4] for row in rows} <= {"pass", "stated", "-"}, rows
    float32 = [row for row in rows if row[1].startswith("float32") and row[4] != "-"]
    assert float32 and all(row[4] == "pass" for row in float32)
    assert "a dry run" in ran.stdout
