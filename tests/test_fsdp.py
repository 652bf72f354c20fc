"""DP-SGD on sharded parameters (`trainer=fsdp`, FSDP2) on two processes (CPU, gloo) against
the same step on one process: per-image clipping exact under sharding, noise once per
coordinate of the whole model, uneven and empty shards, and the modes that cannot shard
refused before any step."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from diffusers import DiTPipeline
from test_distributed import SPLITS, free_port, global_batch, run_train, shard

from dpdit.build import setup
from dpdit.cli import ConfigError
from dpdit.distributed import DPFSDPStrategy
from dpdit.privacy import DPSGD, NonPrivate, PrivacyConfig
from helpers import (
    BATCH,
    EpsilonLoss,
    ZeroLoss,
    batch,
    dp,
    latent_batch,
    norm,
    per_sample_gradients,
    pretrained,
    run_step,
    save_tiny_pipeline,
    tiny_model,
)

NOISE = dict(sigma=2.0, bound=0.5, expected_batch=8)


def fsdp_step(privacy, data, mixed_precision=None, **options):
    """A step on two sharded ranks; returns the module and minus the whole model's update.
    The model is float64 already: "32-true" leaves it so (FSDP's strategy refuses "64-true")."""
    strategy = DPFSDPStrategy(mixed_precision=mixed_precision)
    return run_step(
        privacy, physical_batch_size=2, data=data, strategy=strategy, devices=2, precision="32-true", **options
    )


def noisy():
    """Seeded DP-SGD with noise (NOISE), sample rate 1/2: the same key in every process."""
    sigma, bound, expected = NOISE["sigma"], NOISE["bound"], NOISE["expected_batch"]
    config = PrivacyConfig(clipping="bookkeeping", max_grad_norm=bound, noise_multiplier=sigma, secure_mode=False)
    return DPSGD(config, sample_rate=0.5, dataset_size=2 * expected, noise_multiplier=sigma)


def pretrained_batch(rank=None):
    """The uneven global latent batch, or rank `rank`'s share of it."""
    latents, labels = latent_batch()
    size = SPLITS["uneven"]
    if rank is None:
        return latents[:size], labels[:size]
    return latents[rank:size:2], labels[rank:size:2]


def worker(rank: int, port: int, bound: float, out: str, hub: str, pretrained_bound: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    results = {}
    for name, size in SPLITS.items():
        _, results[name] = fsdp_step(dp("bookkeeping", max_grad_norm=bound), shard(size, rank))
    # diffusers' DiT, its attention fine-tuned: units whose weights are partly frozen
    model = pretrained(hub, finetune="attention").double()
    _, results["pretrained"] = fsdp_step(
        dp("bookkeeping", max_grad_norm=pretrained_bound), pretrained_batch(rank), loss=EpsilonLoss(), model=model
    )
    _, results["none"] = fsdp_step(NonPrivate(BATCH), shard(SPLITS["uneven"], rank))
    module, results["noise"] = fsdp_step(noisy(), shard(SPLITS["even"], rank), loss=ZeroLoss())
    metrics = module.trainer.callback_metrics
    results["statistics"] = [float(metrics[name]) for name in ("private/loss", "private/clipped_fraction")]
    # one image, far beyond the bound, on rank 0; rank 1 runs the placeholder
    images, labels = batch(size=1)
    mine = (images.float(), labels) if rank == 0 else (images[:0].float(), labels[:0])
    model, gathered = tiny_model().float(), []
    model.blocks[0].adaLN_modulation[-1].register_forward_hook(lambda layer, *_: gathered.append(layer.weight.dtype))
    _, results["bf16"] = fsdp_step(
        dp("bookkeeping", max_grad_norm=1e-3, dataset_size=1), mine, mixed_precision="bf16", model=model
    )
    results["bf16 gathered"] = set(gathered)
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    images, labels = batch()
    bound = float(torch.stack([norm(g) for g in per_sample_gradients(images, labels)]).median())
    hub = save_tiny_pipeline(tmp_path_factory.mktemp("hub") / "tiny-dit")
    pretrained_bound = float(pretrained_norms(hub).median())
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(free_port(), bound, str(out), str(hub), pretrained_bound), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks, bound, hub, pretrained_bound


def pretrained_norms(hub):
    """Each latent's gradient norm, alone, for the attention-tuned pretrained DiT."""
    latents, labels = pretrained_batch()
    norms = []
    for i in range(len(latents)):
        model = pretrained(hub, finetune="attention").double()
        EpsilonLoss().training_losses(model, latents[i : i + 1], labels[i : i + 1]).sum().backward()
        norms.append(norm([p.grad for p in model.parameters() if p.grad is not None]))
    return torch.stack(norms)


@pytest.mark.parametrize("split", SPLITS)
def test_a_sharded_step_equals_the_one_process_step_over_the_global_batch(two_ranks, split):
    ranks, bound, *_ = two_ranks
    data = global_batch(SPLITS[split])
    _, single = run_step(dp("bookkeeping", max_grad_norm=bound), physical_batch_size=2, data=data)
    for rank in ranks:
        for got, want in zip(rank[split], single):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)


def test_a_sharded_pretrained_dit_with_frozen_weights_steps_as_one_process(two_ranks):
    ranks, _, hub, bound = two_ranks
    model = pretrained(hub, finetune="attention").double()
    _, single = run_step(
        dp("bookkeeping", max_grad_norm=bound), 2, loss=EpsilonLoss(), data=pretrained_batch(), model=model
    )
    assert any(u.abs().sum() == 0 for u in single) and any(u.abs().sum() > 0 for u in single)
    for rank in ranks:
        for got, want in zip(rank["pretrained"], single):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)


def test_a_sharded_non_private_step_equals_the_one_process_step(two_ranks):
    ranks, *_ = two_ranks
    _, single = run_step(NonPrivate(BATCH), physical_batch_size=2, data=global_batch(SPLITS["uneven"]))
    for rank in ranks:
        for got, want in zip(rank["none"], single):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)


def test_a_sharded_step_adds_the_one_process_noise_once(two_ranks):
    """Zero gradients: the update is the noise alone, sigma C / E per coordinate of the whole
    model, and bit for bit the noise one process draws from the same key."""
    ranks, *_ = two_ranks
    sigma, bound, expected = NOISE["sigma"], NOISE["bound"], NOISE["expected_batch"]
    module, single = run_step(noisy(), physical_batch_size=2, data=batch(), loss=ZeroLoss())
    for rank in ranks:
        for got, want in zip(rank["noise"], single):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # the dashboard's statistics too: rank 0's draw, as one process logs it
    assert all(rank["statistics"] == ranks[0]["statistics"] for rank in ranks)
    metrics = module.trainer.callback_metrics
    assert ranks[0]["statistics"] == pytest.approx(
        [float(metrics["private/loss"]), float(metrics["private/clipped_fraction"])], rel=1e-6
    )
    noise = torch.cat([u.flatten() for u in ranks[0]["noise"]])
    want = sigma * bound / expected  # a second draw would show sqrt(2) times that
    assert abs(noise.std().item() - want) < 5 * want / (2 * noise.numel()) ** 0.5


def test_bf16_blocks_clip_in_float32(two_ranks):
    """Blocks gathered and run in bfloat16, shards, norms and clipped sums in float32: one
    image clipped to C moves the whole model by exactly C / E (in bfloat16, 0.1-0.3% off)."""
    ranks, *_ = two_ranks
    for rank in ranks:
        assert rank["bf16 gathered"] == {torch.bfloat16}
        update = rank["bf16"]
        assert all(u.dtype == torch.float32 for u in update)
        assert float(norm([u.double() for u in update])) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("clipping", ["hooks", "functorch", "ghost"])
def test_modes_that_cannot_shard_are_refused_before_any_work(make_config, tmp_path, clipping):
    with pytest.raises(
        ConfigError, match=f"trainer=fsdp with privacy.clipping={clipping}: .*Use privacy.clipping=bookkeeping"
    ):
        setup(make_config("trainer=fsdp", f"privacy.clipping={clipping}"))
    assert not (tmp_path / "run").exists()


REPORTED = ("epsilon", "noise_multiplier", "sample_rate", "steps", "dataset_size", "expected_batch_size", "history")


def report_of(run_dir):
    return json.loads((run_dir / "privacy_report.json").read_text())


def weights_of(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def assert_same_weights(got, want):
    """float32 tolerance: the ranks' sums are added in another order than one process's."""
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp_command_reports_resumes_and_exports(tmp_path):
    """`python train.py trainer=fsdp trainer.devices=2` (seeded) ends where one process ends:
    the same report and weights (each image's draws do not depend on the ranks); its
    last.ckpt resumes under DDP and under one process to the uninterrupted run's weights and
    epsilon; the exported pipeline loads."""
    seeded = ["privacy.secure_mode=false", "privacy.noise_multiplier=1.0"]
    fsdp = ["trainer=fsdp", "trainer.devices=2"]
    single = run_train(tmp_path, "single", *seeded, "trainer.max_steps=4")
    whole = run_train(tmp_path, "fsdp", *seeded, *fsdp, "trainer.max_steps=4")
    assert {key: report_of(whole)[key] for key in REPORTED} == {key: report_of(single)[key] for key in REPORTED}
    assert_same_weights(weights_of(whole), weights_of(single))
    assert DiTPipeline.from_pretrained(whole / "pipeline", vae=None).get_label_ids(["7"]) == [7]

    half = run_train(tmp_path, "half", *seeded, *fsdp, "trainer.max_steps=2")
    checkpoint = f"ckpt_path={half / 'checkpoints' / 'last.ckpt'}"
    for name, processes in (("ddp", ["trainer=ddp", "trainer.devices=2"]), ("alone", [])):
        resumed = run_train(tmp_path, name, *seeded, *processes, "trainer.max_steps=4", checkpoint)
        assert report_of(resumed)["history"] == report_of(single)["history"]
        assert_same_weights(weights_of(resumed), weights_of(single))
