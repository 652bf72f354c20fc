import csv
import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from dpdit.diffusion import GaussianDiffusion
from dpdit.module import LearningRateSchedule, StepDraws, TrainedWeightsAverage, ema_with_warmup


def test_ema_decay_warms_up_then_holds():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.9))
    values = [1.0, 2.0, 3.0] + [10.0] * 200
    expected = None
    for n, value in enumerate(values):
        model.weight.data.fill_(value)
        ema.update_parameters(model)
        if expected is None:
            expected = value  # the first update copies
        else:
            decay = min(0.9, (1 + n) / (10 + n))
            expected = decay * expected + (1 - decay) * value
        assert abs(ema.module.weight.item() - expected) < 1e-5
    assert min(0.9, 2 / 11) == 2 / 11 and abs(ema.module.weight.item() - 10.0) < 1e-3


def test_the_ema_averages_only_trained_weights_and_equals_averaging_all():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    averaged = []

    def recording(ema_parameters, parameters, num_averaged):
        averaged.append(len(ema_parameters))
        ema_with_warmup(0.9)(ema_parameters, parameters, num_averaged)

    trained_only = TrainedWeightsAverage(model, multi_avg_fn=recording, use_buffers=False)
    every_weight = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.9), use_buffers=False)
    for _ in range(5):
        with torch.no_grad():
            model[1].weight.add_(torch.randn_like(model[1].weight))
        trained_only.update_parameters(model)
        every_weight.update_parameters(model)
    assert averaged == [2] * 4  # the first update copies; then the trained weight and bias only
    for got, want in zip(trained_only.state_dict().values(), every_weight.state_dict().values()):
        assert torch.equal(got, want)


def test_learning_rate_warms_up_then_decays_to_zero_on_a_cosine():
    schedule = LearningRateSchedule(warmup_steps=4, decay="cosine")
    factors = [schedule.factor(step, 20) for step in range(21)]
    assert factors[:4] == pytest.approx([0.25 * (i + 1) * 0.5 * (1 + math.cos(math.pi * i / 20)) for i in range(4)])
    assert factors[10] == pytest.approx(0.5) and factors[20] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert [LearningRateSchedule().factor(step, 20) for step in (0, 19)] == [1.0, 1.0]
    with pytest.raises(ValueError, match="lr_schedule.decay"):
        LearningRateSchedule(decay="linear")


def test_a_run_steps_with_the_scheduled_learning_rates(make_config, tmp_path):
    from dpdit.train import train

    train(
        make_config(
            "trainer.max_steps=4", "lr_schedule.warmup_steps=2", "lr_schedule.decay=cosine", "optimizer.lr=0.01"
        )
    )
    [metrics] = list((tmp_path / "run" / "csv").rglob("metrics.csv"))
    with metrics.open() as file:
        rates = [float(row["train/lr"]) for row in csv.DictReader(file) if row["train/lr"]]
    schedule = LearningRateSchedule(2, "cosine")
    assert rates == pytest.approx([0.01 * schedule.factor(step, 4) for step in range(4)])


@pytest.mark.parametrize("world_size", [2, 3])
def test_an_image_gets_the_same_draws_on_any_number_of_ranks(world_size):
    """Rank r holds the global batch's images r, r + W, ...; K = 2 rows each. Each rank's
    rows, taken micro-batch by micro-batch, are the single process's rows of those images;
    past its images (placeholders) a rank gets none."""
    diffusion = GaussianDiffusion(label_dropout=0.5)
    images = torch.zeros(7, 1, 4, 4)
    alone = StepDraws(diffusion, 0, 5, images, 2, 0, 1, 7).take(14)
    for rank in range(world_size):
        mine = images[rank::world_size]
        draws = StepDraws(diffusion, 0, 5, mine, 2, rank, world_size, 7)
        first, rest = draws.take(2), draws.take(2 * len(mine) - 2)
        rows = torch.tensor([2 * i + k for i in range(rank, 7, world_size) for k in range(2)])
        for part, index in ((first, rows[:2]), (rest, rows[2:])):
            assert torch.equal(part.t, alone.t[index]) and torch.equal(part.noise, alone.noise[index])
            assert torch.equal(part.drop, alone.drop[index])
        assert draws.take(1) is None
    other_step = StepDraws(diffusion, 0, 6, images, 2, 0, 1, 7).take(14)
    assert not torch.equal(other_step.noise, alone.noise)
