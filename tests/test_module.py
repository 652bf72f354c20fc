import torch
from torch.optim.swa_utils import AveragedModel

from dpdit.module import ema_with_warmup


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
