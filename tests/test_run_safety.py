"""Runs a user must not lose: every precision finishes, a failing output keeps the model,
a bad resume is refused before anything is written, and no kill tears a checkpoint."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from dpdit.build import setup
from dpdit.cli import ConfigError
from dpdit.files import AtomicCheckpointIO, write_atomically
from dpdit.train import train


def last_checkpoint(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def test_float64_run_ends_with_samples_and_checkpoint(make_config, tmp_path):
    train(make_config("trainer.precision=64-true"))
    run = tmp_path / "run"
    assert last_checkpoint(run)["global_step"] == 2
    assert json.loads((run / "privacy_report.json").read_text())["steps"] == 2
    assert (run / "samples.npz").is_file()


def test_a_failing_end_of_training_output_keeps_the_trained_model(make_config, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr("dpdit.callbacks.generate", broken)
    with pytest.raises(RuntimeError, match="sampling failed"):
        train(make_config("trainer.max_steps=3"))
    saved = last_checkpoint(tmp_path / "run")
    assert saved["global_step"] == 3 and sum(entry[2] for entry in saved["privacy"]["history"]) == 3


@pytest.fixture
def finished_run(make_config, tmp_path):
    """A finished 2-step run, and the bytes of what it wrote."""
    train(make_config())
    run = tmp_path / "run"
    return run, {
        name: (run / name).read_bytes()
        for name in ("config_resolved.yaml", "checkpoints/last.ckpt", "privacy_report.json")
    }


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.hidden_size=64",
            r"was trained with another model \(\S+ is \(192,\) there and \(384,\) here and \d+ more\)",
        ),
        ("data.image_size=16", "was trained with data.image_size=8 but this run sets data.image_size=16"),
    ],
)
def test_resume_that_does_not_fit_is_refused_before_anything_is_written(make_config, finished_run, override, message):
    run, written = finished_run
    with pytest.raises(ConfigError, match=message):
        train(make_config("trainer.max_steps=4", f"ckpt_path={run / 'checkpoints/last.ckpt'}", override))
    assert {name: (run / name).read_bytes() for name in written} == written


def test_resume_in_place_keeps_the_earlier_run_configuration(make_config, finished_run):
    run, written = finished_run
    train(make_config("trainer.max_steps=3", f"ckpt_path={run / 'checkpoints/last.ckpt'}"))
    assert (run / "config_resolved.before-step-2.yaml").read_bytes() == written["config_resolved.yaml"]
    assert "max_steps: 3" in (run / "config_resolved.yaml").read_text()


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint", "empty"])
def test_unreadable_checkpoint_is_one_clear_error_naming_the_file(make_config, finished_run, tmp_path, damage):
    run, written = finished_run
    damaged = tmp_path / "damaged.ckpt"
    content = written["checkpoints/last.ckpt"]
    damaged.write_bytes({"truncated": content[: len(content) // 2], "not a checkpoint": b"hello", "empty": b""}[damage])
    with pytest.raises(ConfigError, match=f"ckpt_path={damaged} cannot be read .*truncated, corrupt"):
        train(make_config(f"ckpt_path={damaged}", name="resumed"))
    assert not (tmp_path / "resumed").exists()


def test_a_checkpoint_of_something_else_is_refused(make_config, tmp_path):
    other = tmp_path / "tensor.ckpt"
    torch.save(torch.ones(3), other)
    with pytest.raises(ConfigError, match="is not a checkpoint written by train.py"):
        setup(make_config(f"ckpt_path={other}"))


def test_noise_multiplier_zero_under_a_target_is_refused(make_config, tmp_path):
    with pytest.raises(ConfigError, match="allows no step at noise multiplier 0.*privacy.noise_multiplier"):
        train(make_config("privacy.noise_multiplier=0"))
    assert not (tmp_path / "run" / "config_resolved.yaml").exists()


def test_trainer_saves_checkpoints_atomically(make_config):
    trainer, _, _ = setup(make_config())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


KILLED_WRITER = """
import sys, time
from dpdit.files import write_atomically

def write(file):
    file.write(b"half of the new content")
    file.flush()
    print("writing", flush=True)
    time.sleep(60)

write_atomically(sys.argv[1], write)
"""


def test_a_kill_during_a_write_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.arange(5)}, target)
    before = target.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=False)["step"] == 1
    # what the killed writer left is a hidden partial file beside it, never the target
    assert [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"][0].endswith(".partial")


def test_an_interrupted_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "privacy_report.json"
    target.write_text("{}")

    def interrupted(file):
        file.write(b'{"eps')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, interrupted)
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["privacy_report.json"]
