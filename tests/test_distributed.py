"""DP-SGD on two processes (CPU, gloo) against the same step on one process.

Each rank runs a real Lightning Trainer with `DPDDPStrategy`, as torchrun or SLURM would
start it (the processes exist before Lightning does), and writes what it ends with.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dpdit.data import ImageDataModule
from dpdit.distributed import DPDDPStrategy
from dpdit.privacy import DPSGD, NonPrivate, PrivacyConfig
from helpers import BATCH, FAST, ZeroLoss, batch, dp, norm, per_sample_gradients, run_step

ROOT = Path(__file__).resolve().parents[1]
# global batches of the first n images of `batch()`, split as dpdit's sampler splits them
SPLITS = {"even": 6, "uneven": 5, "one rank empty": 1}
NOISE = dict(sigma=2.0, bound=0.5, expected_batch=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(size):
    images, labels = batch()
    return images[:size], labels[:size]


def shard(size, rank, world_size=2):
    """Rank `rank`'s images of the global batch of `size`: positions rank, rank + W, ..."""
    images, labels = global_batch(size)
    return images[rank::world_size], labels[rank::world_size]


def ddp_step(privacy, data, **options):
    return run_step(privacy, physical_batch_size=2, data=data, strategy=DPDDPStrategy(), devices=2, **options)


def worker(rank: int, port: int, bound: float, out: str) -> None:
    # Processes started outside Lightning, like torchrun's or srun's.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    results = {}
    for clipping in ("hooks", "ghost", "bookkeeping"):
        for name, size in SPLITS.items():
            _, update = ddp_step(dp(clipping, max_grad_norm=bound), shard(size, rank))
            results[clipping, name] = update
    _, results["none"] = ddp_step(NonPrivate(BATCH), shard(SPLITS["even"], rank))

    sigma, bound_noise, expected = NOISE["sigma"], NOISE["bound"], NOISE["expected_batch"]
    privacy = DPSGD(
        PrivacyConfig(clipping="ghost", max_grad_norm=bound_noise, noise_multiplier=sigma),
        sample_rate=0.5,
        dataset_size=2 * expected,
        noise_multiplier=sigma,
    )
    module, results["noise"] = ddp_step(privacy, shard(SPLITS["even"], rank), loss=ZeroLoss())
    metrics = module.trainer.callback_metrics
    results["statistics"] = [float(metrics[name]) for name in ("private/loss", "private/clipped_fraction")]
    (normals,) = privacy.randomness.gaussian_noise(0, [torch.zeros(2, dtype=torch.float64)], 1.0, purpose="statistics")
    std = privacy.config.statistics_noise * sigma
    results["statistics_noise"] = (normals * torch.tensor([std * privacy.config.loss_bound, std]) / expected).tolist()

    noisy = dp("hooks", max_grad_norm=bound, noise_multiplier=1.0)
    module, _ = ddp_step(noisy, shard(SPLITS["uneven"], rank), steps=3)
    results["weights"] = [p.detach().clone() for p in module.model.parameters()]
    results["ema"] = [p.detach().clone() for p in module.ema.module.parameters()]
    results["steps"] = noisy.steps
    # each process draws its own secret key; the data module shares rank 0's
    data = ImageDataModule(dataset="fake", image_size=8, size=16, batch_size=4, physical_batch_size=4)
    before = data.randomness.key
    data.trainer = module.trainer
    results["batches"] = list(data.train_dataloader().batch_sampler)
    results["keys"] = (before, data.randomness.key)
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of two ranks ends with, and the clipping bound they used."""
    images, labels = batch()
    bound = float(torch.stack([norm(g) for g in per_sample_gradients(images, labels)]).median())
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(free_port(), bound, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], bound


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("clipping", ["hooks", "ghost", "bookkeeping"])
def test_two_process_step_equals_one_process_step_over_the_global_batch(two_ranks, clipping, split):
    ranks, bound = two_ranks
    # Half of the images are clipped at this bound, so clipping is really tested.
    _, single = run_step(dp(clipping, max_grad_norm=bound), physical_batch_size=2, data=global_batch(SPLITS[split]))
    for rank in ranks:
        for got, want in zip(rank[clipping, split], single):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)


def test_non_private_two_process_step_equals_one_process_step(two_ranks):
    ranks, _ = two_ranks
    _, single = run_step(NonPrivate(BATCH), physical_batch_size=2, data=batch())
    for rank in ranks:
        for got, want in zip(rank["none"], single):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)


def test_noise_is_added_once_for_the_global_batch(two_ranks):
    ranks, _ = two_ranks
    noise = torch.cat([u.flatten() for u in ranks[0]["noise"]])
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["noise"], ranks[1]["noise"]))
    want = NOISE["sigma"] * NOISE["bound"] / NOISE["expected_batch"]  # not sqrt(2) times that
    n = noise.numel()
    assert abs(noise.std().item() - want) < 5 * want / (2 * n) ** 0.5
    assert abs(noise.mean().item()) < 5 * want / n**0.5


def test_the_statistics_noise_is_added_once_for_the_global_batch(two_ranks):
    """Zero losses and gradients: both ranks log rank 0's draw of the statistics' noise alone,
    not the sum of two ranks' draws."""
    ranks, _ = two_ranks
    once = ranks[0]["statistics_noise"]
    assert all(abs(value) > 0 for value in once)
    for rank in ranks:
        assert rank["statistics"] == pytest.approx(once, rel=1e-6)


def test_replicas_stay_identical_after_noisy_steps(two_ranks):
    ranks, _ = two_ranks
    for key in ("weights", "ema"):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][key], ranks[1][key]))
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    start = run_step(dp("hooks"), physical_batch_size=2, steps=0)[0].model
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["weights"], start.parameters()))


def run_train(tmp_path, name, *overrides):
    run_dir = tmp_path / name
    # a fresh single-node launch: no rendezvous address or cluster left in the environment
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MASTER_", "SLURM_")) and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    }
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *FAST,
            "trainer.accelerator=cpu",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_ddp_command_reports_what_one_process_reports(tmp_path):
    """`python train.py trainer=ddp trainer.devices=2`: Lightning starts the second rank;
    the report (written once) and the weights equal the single process's for the same
    global batches (seeded, so that two separate launches draw the same batches; each
    image's draws do not depend on the ranks)."""
    seeded = ["privacy.secure_mode=false", "privacy.statistics=nonprivate"]  # the exact batch sizes compared
    single = json.loads((run_train(tmp_path, "single", *seeded) / "privacy_report.json").read_text())
    ddp_dir = run_train(tmp_path, "ddp", "trainer=ddp", "trainer.devices=2", *seeded)
    report = json.loads((ddp_dir / "privacy_report.json").read_text())
    for key in (
        "epsilon",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "dataset_size",
        "expected_batch_size",
        "history",
    ):
        assert report[key] == single[key], key
    assert report["steps"] == 2  # trainer.max_steps in FAST
    # the same global Poisson batches: the logged (summed over ranks) batch sizes agree
    sizes = [
        (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines() for run in (tmp_path / "single", ddp_dir)
    ]
    column = sizes[0][0].split(",").index("train/batch_size")
    assert [row.split(",")[column] for row in sizes[0][1:]] == [row.split(",")[column] for row in sizes[1][1:]]
    weights = [
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        for run in (tmp_path / "single", ddp_dir)
    ]
    for name, tensor in weights[1].items():
        torch.testing.assert_close(tensor, weights[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_ranks_share_rank_zero_s_secret_key_and_split_its_batches(two_ranks):
    ranks, _ = two_ranks
    (zero_before, zero_after), (one_before, one_after) = ranks[0]["keys"], ranks[1]["keys"]
    assert zero_before != one_before and zero_after == one_after == zero_before
    for first, second in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert not set(first) & set(second)
