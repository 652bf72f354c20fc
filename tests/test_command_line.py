"""The command lines as a user meets them: typos, refusals, SIGTERM, the run's log, and
nothing written outside the run directory and the cache."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from dpdit.cli import EXIT_SIGTERM, unknown_setting
from dpdit.logs import silence_harmless_notices
from dpdit.train import train
from helpers import FAST

ROOT = Path(__file__).resolve().parents[1]


def command(*arguments: str, module: str | None = None) -> list[str]:
    program = ["-m", module] if module else [str(ROOT / "train.py")]
    return [sys.executable, *program, *arguments]


def environment(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "DPDIT_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}


@pytest.mark.parametrize(
    "arguments, nearest",
    [
        (["privacy.target_epsilonn=3"], "privacy.target_epsilon"),
        (["trainer.max_step=100"], "trainer.max_steps"),
        (["model=dit_s_2", "model.dept=3"], "model.depth"),
        (["-m", "seed=1,2", "data.batch_sise=8"], "data.batch_size"),
    ],
)
def test_a_mistyped_setting_gets_the_nearest_valid_key(arguments, nearest):
    message = unknown_setting("train", arguments)
    assert message is not None and f"did you mean {nearest}?" in message


@pytest.mark.parametrize(
    "arguments",
    [
        ["privacy.target_epsilon=3", "trainer.max_steps=5"],
        ["experiment=dpdm_mnist", "data.root=/x"],
        ["+privacy.anything=1", "hydra.run.dir=/tmp/x"],
        ['prior.overrides=["trainer.max_steps=5"]'],
        ["logger=csv", "logger.csv.name=x"],
    ],
)
def test_valid_settings_pass_the_check(arguments):
    assert unknown_setting("train", arguments) is None


@pytest.mark.slow
def test_a_refused_run_writes_nothing(tmp_path):
    """A typo and a bad value: one line naming the setting, status 1, and no run directory."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    for arguments, message in (
        (["trainer.max_step=100"], "did you mean trainer.max_steps?"),
        (["prior=none", "privacy.target_epsilon=-1"], "privacy.target_epsilon=-1 must be positive"),
    ):
        done = subprocess.run(command(*arguments), cwd=cwd, env=environment(tmp_path), capture_output=True, text=True)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert list(cwd.iterdir()) == []


def wait_for_steps(run: Path, process: subprocess.Popen, steps: int, timeout: float = 240.0) -> None:
    """Wait until the run's CSV log shows `steps` training steps (by the learning rate, logged
    in every privacy.statistics mode)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        for metrics in run.glob("csv/*/metrics.csv"):
            with open(metrics) as file:
                if sum(1 for row in csv.DictReader(file) if row.get("train/lr")) >= steps:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"no {steps} steps in {timeout} s")


RUN_UNTIL_STOPPED = [
    *[o for o in FAST if not o.startswith("trainer.max_steps")],
    "trainer.max_steps=100000",
    "+logger.csv.flush_logs_every_n_steps=1",
    "trainer.log_every_n_steps=1",
]


@pytest.mark.slow
def test_sigterm_stops_training_after_a_step_saves_it_and_exits_non_zero(tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        command(*RUN_UNTIL_STOPPED, f"hydra.run.dir={run}"),
        cwd=tmp_path,
        env=environment(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(run, process, 2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_SIGTERM
    assert (
        "stopped by SIGTERM after step" in stderr
        and f"resume with ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in stderr
    )
    report = json.loads((run / "privacy_report.json").read_text())
    assert report["stopped"].startswith("signal: stopped by SIGTERM") and report["steps"] >= 2
    log = (run / "train.log").read_text()
    assert "DP-SGD: noise multiplier" in log and "stopped by SIGTERM after step" in log and "Seed set to 0" in log


@pytest.mark.slow
def test_sigterm_stops_an_audit_with_no_report_and_says_so(tmp_path):
    run = tmp_path / "audit"
    process = subprocess.Popen(
        command(
            *RUN_UNTIL_STOPPED,
            "audit.canaries=20",
            "audit.guesses=[10,20]",
            f"hydra.run.dir={run}",
            module="dpdit.audit",
        ),
        cwd=tmp_path,
        env=environment(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(run, process, 1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_SIGTERM
    assert "no audit_report.json was written" in stderr and not (run / "audit_report.json").exists()


def test_a_pretrained_run_on_generated_images_writes_nothing_outside_its_directory_and_the_cache(
    make_config, tiny_pipeline, tmp_path, monkeypatch
):
    """Latents of data without a root (fake, digits) are cached under paths.cache_dir."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    train(
        make_config(
            "prior=none",
            "model=pretrained",
            f"model.name_or_path={tiny_pipeline}",
            f"model.vae_name_or_path={tiny_pipeline}",
            "data=fake",
            "data.size=16",
            "data.image_size=16",
            "data.num_classes=3",
            "data.batch_size=8",
            "data.physical_batch_size=4",
            "trainer.max_steps=1",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            "sample.num_per_class=1",
            "sample.steps=2",
            fast=False,
        )
    )
    assert list(cwd.iterdir()) == []
    assert list((tmp_path / "cache" / "latents").glob("*.pt"))


def test_a_run_raises_no_library_notice_that_says_nothing_about_it(make_config, capfd):
    """Every command silences the same notices, each by its message (a checkpoint every step
    under manual optimisation, every accountant in the report, the W&B logger), and the run
    shows no other."""
    with warnings.catch_warnings(record=True) as caught:
        # pytest's blanket filters out; every other warning shows
        warnings.filters[:] = [f for f in warnings.filters if f[1] is not None]
        warnings.filterwarnings("always", append=True)
        silence_harmless_notices()
        train(
            make_config("callbacks.model_checkpoint.every_n_train_steps=1", "logger=default", "privacy.accountant=rdp")
        )
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert "wandb: WARNING" not in capfd.readouterr().err
