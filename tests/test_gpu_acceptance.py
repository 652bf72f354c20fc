"""The GPU acceptance script, at tiny sizes on the CPU (`--cpu-smoke`): every part runs
and lands in its JSON and markdown table."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_acceptance.py"


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_writes_its_tables(tmp_path):
    output = tmp_path / "acceptance"
    env = {"DPDIT_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    finished = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--output", str(output)], capture_output=True, text=True, env=env
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads((output / "acceptance.json").read_text())
    profiles = [r for r in result["records"] if r["part"] == "profile"]
    assert {(r["precision"], r["mode"]) for r in profiles} == {
        ("32-true", "vanilla"),
        ("32-true", "bookkeeping"),
        ("bf16-mixed", "bookkeeping"),
    }
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 for r in profiles)
    assert (
        next(r for r in profiles if r["mode"] == "bookkeeping" and r["precision"] == "32-true")["vs_vanilla"][
            "step_time"
        ]
        > 0
    )
    (largest,) = [r for r in result["records"] if r["part"] == "max_batch"]
    assert largest["batch_size"] == 2 and largest["tries"][0]["batch_size"] == 2
    runs = {r["name"]: r for r in result["records"] if r["part"] == "train"}
    assert len(runs) == 3
    for run in runs.values():
        assert run["loss_finite"] and math.isfinite(run["last_loss"])
        assert run["epsilon"] > 0 and run["steps_per_s"] > 0 and run["peak_bytes"] > 0
    assert runs["pretrained XL/2, finetune=lora"]["steps"] == 2 and runs["dit_s_2, font digits 32 px"]["steps"] == 3
    table = (output / "acceptance.md").read_text()
    assert "largest that fits: 2" in table and "finetune=full" in table and "python train.py" in table
    # a second run into the same folder would overwrite the first: refused
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--output", str(output)], capture_output=True, text=True, env=env
    )
    assert again.returncode != 0 and "already holds an acceptance run" in again.stderr
