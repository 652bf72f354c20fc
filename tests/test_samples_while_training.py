"""Sample grids while training: written every N steps from the EMA weights, comparable over
the run (the same noise each time), none in short runs, and no change to what is trained."""

import torch

from dpdit.callbacks import SampleImages
from dpdit.randomness import tensor_digest
from dpdit.train import train


def weights_digest(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return tensor_digest(sorted((name, tensor.reshape(-1)) for name, tensor in state.items()))


def test_grids_every_n_steps_change_nothing_of_the_training(make_config, tmp_path):
    reproducible = ["trainer.max_steps=3", "privacy.secure_mode=false"]
    train(make_config(*reproducible, "callbacks.sample_images.every_n_steps=1", name="grids"))
    train(make_config(*reproducible, name="plain"))
    grids = sorted(path.name for path in (tmp_path / "grids" / "samples").iterdir())
    # the last step's samples are the run's own samples.png
    assert grids == ["step_1.png", "step_2.png"] and (tmp_path / "grids" / "samples.png").is_file()
    assert not (tmp_path / "plain" / "samples").exists()
    assert weights_digest(tmp_path / "grids") == weights_digest(tmp_path / "plain")


def test_about_ten_grids_by_default_and_none_in_short_runs():
    callback = SampleImages(output_dir="unused")
    assert callback.interval(300) == 30 and callback.interval(2000) == 200
    assert callback.interval(99) is None and callback.interval(2) is None
    assert SampleImages(output_dir="unused", every_n_steps=7).interval(2) == 7
