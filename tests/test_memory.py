"""The lower bound on training's memory, and the refusal before work when it cannot fit."""

import pytest
import torch
from omegaconf import OmegaConf

import dpdit.memory
from dpdit.cli import ConfigError
from dpdit.memory import DoesNotFit, check_memory_fits, per_sample_bytes, training_state_bytes
from dpdit.profile import measure
from dpdit.train import train
from helpers import tiny_model


def test_the_bound_counts_state_and_per_sample_gradients_of_trained_weights():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 5)).requires_grad_(False)
    model[0].requires_grad_(True)  # 110 trained weights of 165, float32
    state = training_state_bytes(model, optimizer_state=2)
    assert state == {"weights": 165 * 4, "gradients": 110 * 4, "adam": 220 * 4, "ema": 165 * 4}
    assert per_sample_bytes(model, "hooks", images=3, draws=2) == {
        "per-sample gradients": 6 * 110 * 4,
        "clipped sum": 110 * 4,
    }
    assert per_sample_bytes(model, "bookkeeping", images=3, draws=2) == {}


def test_check_refuses_what_cannot_fit_and_names_the_fix(monkeypatch):
    model = tiny_model()  # float64
    trained = sum(p.numel() for p in model.parameters()) * 8
    # on the CPU the built model's weights and EMA copy are already held: gradients, Adam's
    # two moments, 4 per-sample gradients and their clipped sum are still to come
    needed = (1 + 2 + 4 + 1) * trained
    monkeypatch.setattr(dpdit.memory, "available_bytes", lambda device: needed)
    check_memory_fits(model, "hooks", 4, 1, torch.device("cpu"), "torch.optim.Adam")
    with pytest.raises(
        DoesNotFit,
        match=r"privacy.clipping=hooks at data.physical_batch_size=5 needs at least .* privacy.clipping=bookkeeping",
    ):
        check_memory_fits(model, "hooks", 5, 1, torch.device("cpu"), "torch.optim.Adam")
    # book-keeping holds no per-sample gradients; SGD no optimizer state
    check_memory_fits(model, "bookkeeping", 1000, 1, torch.device("cpu"), "torch.optim.Adam")
    monkeypatch.setattr(dpdit.memory, "available_bytes", lambda device: trained)
    check_memory_fits(model, None, 1, 1, torch.device("cpu"), "torch.optim.SGD")
    with pytest.raises(DoesNotFit, match=r"training needs at least .*optimizer state .*model.finetune"):
        check_memory_fits(model, None, 1, 1, torch.device("cpu"), "torch.optim.Adam")


def test_sharded_ranks_hold_their_share_of_the_training_state(monkeypatch):
    model = tiny_model()  # float64
    trained = sum(p.numel() for p in model.parameters()) * 8
    # gradients and Adam's two moments to come on a GPU: with the weights and EMA, 5 copies
    monkeypatch.setattr(dpdit.memory, "available_bytes", lambda device: 5 * trained // 2 + 64)
    with pytest.raises(DoesNotFit, match="physical_batch_size=1 needs at least"):
        check_memory_fits(model, "bookkeeping", 1, 1, torch.device("cuda"), "torch.optim.Adam")
    check_memory_fits(model, "bookkeeping", 1, 1, torch.device("cuda"), "torch.optim.Adam", shards=2)


def test_train_refuses_before_writing_a_checkpoint(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(dpdit.memory, "available_bytes", lambda device: 1000)
    with pytest.raises(ConfigError, match="privacy.clipping=hooks at data.physical_batch_size=32 needs at least"):
        train(make_config("privacy.clipping=hooks"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_profile_records_a_refused_mode_and_goes_on(make_config, monkeypatch):
    monkeypatch.setattr(dpdit.memory, "available_bytes", lambda device: 1000)
    config = OmegaConf.to_container(make_config(config_name="profile"), resolve=True)
    record = measure(config, "hooks", 4, warmup=0, num_iter=1)
    assert record["status"] == "refused" and "privacy.clipping=hooks at data.physical_batch_size=4" in record["error"]
