"""SLURM: the launcher config's sbatch script, ranks read from SLURM, and a requeue on the
time-limit signal that resumes exactly where an uninterrupted run would be."""

import json
import os
import signal

import pytest
import submitit
import torch
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from dpdit.build import make_trainer, setup
from dpdit.cli import ConfigError, Interrupted
from dpdit.cluster import Requeued
from dpdit.distributed import DPDDPStrategy
from dpdit.module import DiffusionModule
from dpdit.train import train
from helpers import compose_config


def compose_train(*overrides, hydra=False):
    return compose_config("train", *overrides, hydra=hydra)


class Submitted(Exception):
    pass


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`srun` and `scontrol` on PATH that only record their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("srun", "scontrol"):
        (bin_dir / command).write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / command}.log\n')
        (bin_dir / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_slurm_launcher_renders_one_task_per_gpu(tmp_path, fake_slurm, monkeypatch):
    cfg = compose_train(
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "trainer.devices=4",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=proj",
        "hydra.launcher.timeout_min=90",
        f"hydra.sweep.dir={tmp_path}",
        hydra=True,
    )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    launcher = SlurmLauncher(**params)
    launcher.config = cfg
    scripts = []

    def render(executor, function, *job_arguments):
        scripts.append(executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "0"))
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", render)
    with pytest.raises(Submitted):
        launcher.launch([["trainer=ddp"]], initial_job_idx=0)
    script = scripts[0]
    for line in [
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--time=90",
        "--partition=gpu",
        "--account=proj",
        "--signal=USR2@300",
        "--cpus-per-task=8",
    ]:
        assert f"#SBATCH {line}\n" in script, line
    assert "\nsrun " in script


def test_lightning_reads_the_ranks_from_slurm(monkeypatch, tmp_path):
    # Lightning's SLURM environment exports MASTER_ADDR/PORT: keep them out of later tests.
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(
        SLURM_NTASKS=8,
        SLURM_NTASKS_PER_NODE=4,
        SLURM_PROCID=5,
        SLURM_LOCALID=1,
        SLURM_NODEID=1,
        SLURM_JOB_NAME="train",
        SLURM_NODELIST="gpu[01-02]",
        SLURM_JOB_ID=123,
    ).items():
        monkeypatch.setenv(key, str(value))
    cfg = compose_train(
        "trainer.num_nodes=2", "trainer.devices=4", "trainer.accelerator=cpu", f"paths.output_dir={tmp_path}"
    )
    trainer = make_trainer(cfg.trainer, [], [])
    # strategy=auto with several processes becomes the DP strategy
    assert isinstance(trainer.strategy, DPDDPStrategy)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (5, 1, 1, 8)
    assert trainer.strategy.cluster_environment.main_address == "gpu01"


def test_a_gradient_averaging_strategy_is_refused(make_config):
    with pytest.raises(ConfigError, match="trainer.strategy=ddp on 2 processes.*trainer=ddp"):
        setup(make_config("trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"))


def test_sigterm_between_the_step_hooks_saves_after_the_next_step(make_config, monkeypatch, tmp_path):
    """SIGTERM arriving after the callbacks' batch-end hooks still stops with a checkpoint
    (Lightning's own handler would end the run there with status 0 and save nothing)."""

    def sigterm_after_the_callbacks(self, outputs, batch, batch_idx):
        if self.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(DiffusionModule, "on_train_batch_end", sigterm_after_the_callbacks, raising=False)
    with pytest.raises(Interrupted, match="stopped by SIGTERM after step 3"):
        train(make_config("trainer.max_steps=5", name="run"))
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_time_limit_signal_saves_requeues_and_resumes_like_an_uninterrupted_run(
    make_config, fake_slurm, monkeypatch, tmp_path, fixed_secret
):
    overrides = ("trainer.max_steps=5", "callbacks.model_checkpoint.every_n_train_steps=1000")
    uninterrupted = make_config(*overrides, name="uninterrupted")
    train(uninterrupted)

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    signal_at_step = 2

    def signal_during_step(self, batch, batch_idx):
        if self.global_step == signal_at_step:
            os.kill(os.getpid(), signal.SIGUSR2)  # what SLURM sends signal_delay_s before the limit

    with monkeypatch.context() as patch:
        patch.setattr(DiffusionModule, "on_train_batch_start", signal_during_step, raising=False)
        with pytest.raises(Requeued, match="after step 3.*requeued SLURM job 77"):
            train(make_config(*overrides, name="job"))
    assert (fake_slurm / "scontrol.log").read_text().split() == ["requeue", "77"]
    saved = torch.load(tmp_path / "job" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3 and sum(entry[2] for entry in saved["privacy"]["history"]) == 3
    interrupted = json.loads((tmp_path / "job" / "privacy_report.json").read_text())
    assert interrupted["steps"] == 3 and interrupted["stopped"].startswith("signal: stopped after step 3")

    # The requeued job runs the same command (ckpt_path=null) in the same run directory.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    report = train(make_config(*overrides, name="job"))
    expected = json.loads((tmp_path / "uninterrupted" / "privacy_report.json").read_text())
    assert report["steps"] == expected["steps"] == 5
    assert report["epsilon"] == expected["epsilon"] and report["history"] == expected["history"]
    resumed, reference = weights(tmp_path / "job"), weights(tmp_path / "uninterrupted")
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)
