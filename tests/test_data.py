import numpy as np
import pytest
import torch
from PIL import Image

from dpdit.data import ImageDataModule, LogicalBatchSampler, build_dataset
from dpdit.randomness import PrivateRandomness


def test_digits_are_the_real_bundled_images_in_unit_range():
    dataset = build_dataset("digits", None, image_size=8, channels=1, num_classes=10)
    assert len(dataset) == 1497
    image, label = dataset[0]
    assert image.shape == (1, 8, 8) and -1.0 <= image.min() and image.max() <= 1.0 and int(label) == 1
    upsampled, _ = build_dataset("digits", None, image_size=16, channels=1, num_classes=10)[0]
    assert upsampled.shape == (1, 16, 16)


def test_digits_test_split_is_held_out_and_covers_every_class():
    train = build_dataset("digits", None, image_size=8, channels=1, num_classes=10).tensors[0]
    test, labels = build_dataset("digits", None, image_size=8, channels=1, num_classes=10, split="test").tensors
    assert len(test) == 300 and set(labels.tolist()) == set(range(10)) and min(labels.bincount()) >= 25
    # no test image is among the training images
    assert torch.cdist(test.flatten(1), train.flatten(1)).min(dim=1).values.gt(0).float().mean() > 0.98


def test_poisson_batches_have_the_configured_expected_size():
    data = ImageDataModule(dataset="digits", batch_size=900, physical_batch_size=900)
    assert data.sample_rate == pytest.approx(900 / 1497)
    torch.manual_seed(0)
    loader = data.train_dataloader()
    sizes = [len(labels) for _ in range(10) for _, labels in loader]
    assert abs(np.mean(sizes) - 900) < 4 * np.sqrt(1497 * 0.5 * 0.5 / len(sizes))
    assert len(set(sizes)) > 1  # Poisson, not fixed-size batches


@pytest.mark.parametrize("poisson", [True, False])
def test_ranks_split_exactly_the_single_process_batches(poisson):
    """Two ranks' batches are disjoint and together the one-process batch, step by step,
    with as many batches on each rank, empty ones included."""
    single = list(LogicalBatchSampler(50, 2, PrivateRandomness.seeded(1), poisson=poisson))
    ranks = [
        list(LogicalBatchSampler(50, 2, PrivateRandomness.seeded(1), poisson=poisson, rank=r, world_size=2))
        for r in range(2)
    ]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 25
    for whole, first, second in zip(single, *ranks):
        assert not set(first) & set(second) and sorted(first + second) == sorted(whole)
    sizes = [len(b) for b in single]
    assert (0 in sizes and len(set(sizes)) > 2) if poisson else set(sizes) == {2}


def test_poisson_inclusion_is_independent_at_the_sample_rate():
    sampler = LogicalBatchSampler(40, 10, PrivateRandomness.secret(), world_size=2)
    masks = np.zeros((2000, 40))
    for step in range(2000):
        masks[step, sampler.global_batch(step)] = 1
    assert np.abs(masks.mean(0) - 0.25).max() < 5 * np.sqrt(0.25 * 0.75 / 2000)
    # images held by different ranks (0 and 1) are not drawn together more than chance
    assert abs(np.corrcoef(masks[:, 0], masks[:, 1])[0, 1]) < 5 / np.sqrt(2000)


def test_a_resumed_sampler_draws_what_the_uninterrupted_one_would():
    randomness = PrivateRandomness.secret()
    uninterrupted = list(LogicalBatchSampler(100, 10, randomness)) + list(
        LogicalBatchSampler(100, 10, randomness, first_step=10)
    )
    resumed = list(LogicalBatchSampler(100, 10, randomness, first_step=4))
    assert resumed == uninterrupted[4:14]


def test_fake_data_has_the_configured_shape():
    dataset = build_dataset("fake", None, image_size=12, channels=3, num_classes=5, size=7)
    image, label = dataset[0]
    assert len(dataset) == 7 and image.shape == (3, 12, 12) and 0 <= label < 5


def test_imagefolder_reads_class_subfolders(tmp_path):
    for name in ["cat", "dog"]:
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.random.randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    dataset = build_dataset("imagefolder", str(tmp_path), image_size=16, channels=3, num_classes=2, hflip=True)
    image, label = dataset[3]
    assert len(dataset) == 4 and image.shape == (3, 16, 16) and label == 1


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("cifar10", "CIFAR10")])
def test_missing_dataset_says_what_to_download_and_where(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError, match=f"datasets.{folder}\\('{tmp_path}', download=True\\)"):
        build_dataset(name, str(tmp_path), image_size=32, channels=1, num_classes=10)


def test_font_digits_are_deterministic_labelled_images_of_any_shape():
    from dpdit.font_digits import render_font_digits

    images, labels = render_font_digits(30, image_size=12, channels=3, seed=4)
    assert images.shape == (30, 3, 12, 12) and -1.0 <= images.min() and images.max() <= 1.0
    assert labels.tolist() == [i % 10 for i in range(30)]
    again, _ = render_font_digits(20, image_size=12, channels=3, seed=4)
    assert torch.equal(again, images[:20])  # image i does not depend on the count
    assert not torch.equal(render_font_digits(20, image_size=12, channels=3, seed=5)[0], again)
    train = build_dataset("font_digits", None, image_size=8, channels=1, num_classes=10, size=50)
    test = build_dataset("font_digits", None, image_size=8, channels=1, num_classes=10, size=50, split="test")
    assert len(train) == 50 and not torch.equal(train.tensors[0], test.tensors[0])


def test_font_digits_look_like_digits_to_a_classifier_of_the_real_ones():
    """A public stand-in with a domain gap: recognised far above chance (10%), far below the real test split."""
    from sklearn.linear_model import LogisticRegression

    from dpdit.data import load_digits_tensors
    from dpdit.font_digits import render_font_digits

    real, real_labels = load_digits_tensors()
    classifier = LogisticRegression(max_iter=2000).fit(real.flatten(1).numpy(), real_labels.numpy())
    fonts, labels = render_font_digits(500)
    accuracy = (classifier.predict(fonts.flatten(1).numpy()) == labels.numpy()).mean()
    assert 0.25 < accuracy < 0.8


def test_mnist_framed_font_digits_sit_like_mnist_digits():
    """MNIST framing: the ink's longer side is 20 of 28 pixels and its centre of mass is the
    image centre; the font, stroke and rotation of image i are those of its UCI framing."""
    from scipy import ndimage

    from dpdit.font_digits import render_font_digits

    mnist, labels = render_font_digits(20, image_size=28, framing="mnist")
    uci, uci_labels = render_font_digits(20, image_size=28, framing="uci")
    assert torch.equal(labels, uci_labels) and not torch.equal(mnist, uci)
    for image in (mnist[:, 0] + 1.0) / 2.0:
        ink = image > 0.1
        rows, columns = ink.any(dim=1).nonzero(), ink.any(dim=0).nonzero()
        assert 19 <= max(int(rows[-1] - rows[0]) + 1, int(columns[-1] - columns[0]) + 1) <= 22
        row, column = ndimage.center_of_mass(image.numpy())
        assert abs(row - 13.5) < 1.0 and abs(column - 13.5) < 1.0
    with pytest.raises(ValueError, match="data.framing='centred' is unknown"):
        render_font_digits(1, framing="centred")


def test_font_digits_skip_fonts_that_put_symbols_at_the_numerals():
    from dpdit.font_digits import font_files, usable_fonts

    names = [path.rsplit("/", 1)[-1] for path in usable_fonts(tuple(font_files()))]
    assert "DejaVuSans.ttf" in names and "cmsy10.ttf" not in names and "cmex10.ttf" not in names
    assert len(names) >= 10
