"""The randomness DP-SGD's guarantee rests on: secret by default, reproducible only by choice.

An adversary who holds everything a run publishes (its config with the seed, the report,
the logs, the samples) and every other image of the data can replay the training. If the
batches and the noise followed from the config, the replay would give the released weights
bit for bit, and subtracting the noise would expose the clipped gradient sum.
"""

import shutil

import numpy as np
import pytest
import torch
from scipy import stats

import dpdit.randomness
from dpdit.build import setup
from dpdit.data import ImageDataModule, LogicalBatchSampler
from dpdit.privacy import DPSGD, PrivacyConfig
from dpdit.randomness import PrivateRandomness, TensorShard
from dpdit.train import train
from helpers import BATCH, ZeroLoss, run_step, tiny_model


def noise_of_one_step(secure_mode: bool) -> torch.Tensor:
    """The update of one DP step whose clipped gradients are all zero: the noise alone, / B."""
    privacy = DPSGD(
        PrivacyConfig(clipping="ghost", noise_multiplier=1.0, secure_mode=secure_mode),
        sample_rate=1.0,
        dataset_size=BATCH,
        noise_multiplier=1.0,
    )
    return torch.cat([u.flatten() for u in run_step(privacy, physical_batch_size=BATCH, loss=ZeroLoss())[1]])


def regenerated_from_the_seed(seed: int = 0) -> torch.Tensor:
    """What an adversary computes from the published seed: step 0's noise of the seeded key."""
    references = [torch.zeros_like(p, dtype=torch.float64) for p in tiny_model().parameters()]
    return torch.cat([n.flatten() for n in PrivateRandomness.seeded(seed).gaussian_noise(0, references, 1.0)]) / BATCH


def test_secret_noise_cannot_be_regenerated_from_the_seed():
    first, second = noise_of_one_step(secure_mode=True), noise_of_one_step(secure_mode=True)
    guess = regenerated_from_the_seed()
    assert first.std() > 0.1 / BATCH
    assert not torch.equal(first, second)
    # no better than chance: the correlation of independent draws is about 1/sqrt(n)
    for noise in (first, second):
        assert abs(np.corrcoef(noise.numpy(), guess.numpy())[0, 1]) < 5 / noise.numel() ** 0.5


def test_seeded_noise_is_exactly_what_the_seed_predicts():
    """The same attack on a privacy.secure_mode=false run recovers the noise exactly."""
    torch.testing.assert_close(noise_of_one_step(secure_mode=False), regenerated_from_the_seed(), rtol=1e-10, atol=0)


@pytest.mark.slow
def test_two_default_runs_of_one_config_draw_different_batches(make_config):
    batches = []
    for _ in range(2):
        _, _, datamodule = setup(make_config())
        sampler = LogicalBatchSampler(datamodule.dataset_size, datamodule.batch_size, datamodule.randomness)
        batches.append([sampler.global_batch(step).tolist() for step in range(3)])
    assert batches[0] != batches[1]
    seeded = [LogicalBatchSampler(1497, 64, PrivateRandomness.seeded(0)).global_batch(0).tolist() for _ in range(2)]
    assert seeded[0] == seeded[1]


def released_files(run_dir):
    """Everything a run writes that may be published: all but its checkpoints."""
    return [path for path in run_dir.rglob("*") if path.is_file() and "checkpoints" not in path.parts]


@pytest.mark.parametrize("secure_mode", [True, False])
@pytest.mark.slow
def test_replaying_the_published_config_gives_the_weights_only_when_seeded(make_config, tmp_path, secure_mode):
    setting = f"privacy.secure_mode={str(secure_mode).lower()}"
    reports = [train(make_config(setting, name=f"run{i}")) for i in range(2)]
    weights = [torch.load(tmp_path / f"run{i}/checkpoints/last.ckpt", weights_only=False) for i in range(2)]
    same = all(torch.equal(weights[0]["state_dict"][k], weights[1]["state_dict"][k]) for k in weights[0]["state_dict"])
    assert same != secure_mode
    assert reports[0]["randomness"] == ("secret" if secure_mode else "seeded")
    if not secure_mode:
        assert "NOT A PRIVATE RELEASE" in reports[0]["randomness_note"]
        return
    # the secret is in the checkpoints and in no file that may be released
    key = weights[0]["privacy"]["randomness"]["key"]
    assert key != weights[1]["privacy"]["randomness"]["key"]
    for path in released_files(tmp_path / "run0"):
        content = path.read_bytes()
        assert key.encode() not in content and bytes.fromhex(key) not in content, path


def test_ranks_take_rank_zero_s_key():
    class Broadcast:
        def broadcast(self, obj, src=0):
            return rank_zero_state

    rank_zero = PrivateRandomness.secret()
    rank_zero_state = (rank_zero.key, rank_zero.kind)
    other = PrivateRandomness.secret()
    other.share(Broadcast())
    assert other.key == rank_zero.key
    np.testing.assert_array_equal(other.poisson_batch(5, 100, 0.3), rank_zero.poisson_batch(5, 100, 0.3))


def test_a_datamodule_without_randomness_draws_secret_poisson_batches():
    assert ImageDataModule(dataset="digits").randomness.is_secret
    assert not ImageDataModule(dataset="digits", poisson_sampling=False).randomness.is_secret


def test_gaussian_noise_is_standard_normal_and_fills_every_shape():
    randomness = PrivateRandomness.secret()
    references = [torch.zeros(200_001, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float32)]
    big, small = randomness.gaussian_noise(7, references, std=2.0)
    assert big.shape == references[0].shape and small.shape == (3, 5) and small.dtype == torch.float32
    assert stats.kstest(big.numpy() / 2.0, "norm").pvalue > 1e-4
    # a step's stream is fixed by (key, step): the same draws again, others for another step
    again, _ = randomness.gaussian_noise(7, references, std=2.0)
    other, _ = randomness.gaussian_noise(8, references, std=2.0)
    assert torch.equal(big, again) and abs(np.corrcoef(big.numpy(), other.numpy())[0, 1]) < 0.02


@pytest.mark.parametrize("ranks", [2, 3, 5])
def test_shards_get_the_noise_their_place_in_the_whole_tensor_gets(monkeypatch, ranks):
    """Each rank's shards (torch.chunk's rows, as FSDP lays them out: uneven, some empty)
    drawn alone, put together, are the whole tensors' noise bit for bit; chunks of 6 values,
    so shards begin and end inside a chunk and inside a Box-Muller pair."""
    monkeypatch.setattr(dpdit.randomness, "NOISE_CHUNK", 6)
    randomness = PrivateRandomness.seeded(3)
    shapes = [(7, 3), (13,), (2, 5), (1, 4)]
    whole = randomness.gaussian_noise(4, [torch.zeros(shape, dtype=torch.float64) for shape in shapes], 1.5)
    parts = [[] for _ in shapes]
    for rank in range(ranks):
        shards = []
        for index, shape in enumerate(shapes):
            full = torch.zeros(shape, dtype=torch.float64)
            rows = full.chunk(ranks)
            local = rows[rank].clone() if rank < len(rows) else full[:0].clone()
            start = sum(row.numel() for row in rows[:rank])
            shards.append(TensorShard(local, full.numel(), start))
            parts[index].append(local)
        randomness.add_gaussian_noise(4, shards, 1.5)
    for index, noise in enumerate(whole):
        assert torch.equal(torch.cat(parts[index]), noise)


def test_uniforms_are_uniform_and_keyed():
    randomness = PrivateRandomness.secret()
    u = randomness.uniforms("batch", 0, 100_000)
    assert 0.0 <= u.min() and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    assert not np.array_equal(u, PrivateRandomness.secret().uniforms("batch", 0, 100_000))


@pytest.mark.slow
def test_resume_under_secret_randomness_continues_the_same_streams(make_config, tmp_path):
    """An uninterrupted 4-step run against its own step-2 checkpoint resumed to step 4:
    the checkpoint carries the secret key, so batches and noise continue exactly."""
    keep_every_save = ["callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.save_top_k=-1"]
    train(make_config("trainer.max_steps=4", *keep_every_save, name="whole"))
    step_two = tmp_path / "step2.ckpt"
    shutil.copy(next((tmp_path / "whole" / "checkpoints").glob("*step=2.ckpt")), step_two)
    train(make_config("trainer.max_steps=4", f"ckpt_path={step_two}", name="resumed"))
    whole, resumed = (
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False) for name in ("whole", "resumed")
    )
    assert whole["privacy"]["randomness"] == resumed["privacy"]["randomness"]
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
