"""Image datasets in [-1, 1] and the data module that samples them (Poisson under DP).

Normalisation is fixed (x * 2 - 1), never computed from the data: a data-dependent
statistic would leak private information outside the DP-SGD accounting.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate
from torchvision import datasets, transforms

from dpdit.font_digits import render_font_digits
from dpdit.latents import cached_latents, describe_images
from dpdit.models.pretrained import FrozenVAE
from dpdit.randomness import PrivateRandomness

DATASETS = ("digits", "font_digits", "mnist", "cifar10", "imagefolder", "fake")
DATASET_CHANNELS = {"digits": 1, "mnist": 1, "cifar10": 3}


SPLITS = ("train", "test")
# Every sixth of scikit-learn's 1,797 digits is held out as the test split (300 images, about
# 30 per class): training sees the other 1,497, downstream accuracy is measured on these.
DIGITS_TEST_EVERY = 6
# The font digits' splits are rendered with their own seeds: no test image is a training image.
FONT_DIGITS_SEEDS = {"train": 0, "test": 1}


def load_digits_tensors(image_size: int = 8, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """A split of scikit-learn's bundled handwritten digits (8x8, 0..16) as [-1, 1] tensors."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    held_out = np.arange(len(labels)) % DIGITS_TEST_EVERY == 0
    keep = held_out if split == "test" else ~held_out
    images, labels = images[keep], labels[keep]
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0 * 2.0 - 1.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x, torch.tensor(labels, dtype=torch.long)


def _image_transform(image_size: int, channels: int, hflip: bool) -> transforms.Compose:
    steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if channels == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
    return transforms.Compose(steps)


def _missing_dataset(name: str, root: str, fetch: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"data={name}: no dataset found under data.root={root!r} and downloads are off. "
        f"On a machine with network access run\n    {fetch}\n"
        f"and copy the folder it creates to {root!r}, or set data.download=true "
        "where this machine can reach the internet."
    )


def build_dataset(
    name: str,
    root: str | None,
    image_size: int,
    channels: int,
    num_classes: int,
    hflip: bool = False,
    download: bool = False,
    size: int = 256,
    split: str = "train",
    test_root: str | None = None,
    framing: str = "uci",
) -> Dataset:
    """Split `split` (train | test) of dataset `name` as (image in [-1, 1], label) pairs.
    An image folder's test split is the folder `test_root`, laid out like `root`; font digits
    are framed as `framing` (`dpdit.font_digits.FRAMINGS`)."""
    if name not in DATASETS:
        raise ValueError(f"data.dataset={name!r} is unknown: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown: choose one of {', '.join(SPLITS)}")
    if name == "digits":
        return TensorDataset(*load_digits_tensors(image_size, split))
    if name == "font_digits":
        return TensorDataset(*render_font_digits(size, image_size, channels, FONT_DIGITS_SEEDS[split], framing))
    if name == "fake":
        return datasets.FakeData(
            size=size,
            image_size=(channels, image_size, image_size),
            num_classes=num_classes,
            transform=transforms.Compose(
                [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
            ),
            # a different image stream for the test split
            random_offset=0 if split == "train" else size,
        )
    if root is None:
        raise ValueError(f"data={name} needs data.root=/path/to/the/dataset")
    transform = _image_transform(image_size, channels, hflip and split == "train")
    if name == "imagefolder":
        if split == "test":
            if test_root is None:
                raise ValueError(
                    "data=imagefolder has no test split: set data.test_root=/path/to/test/images "
                    "(one subfolder per class, as data.root)"
                )
            root = test_root
        if not Path(root).is_dir():
            raise FileNotFoundError(
                f"data.root={root!r} is not a directory: data=imagefolder expects one "
                "subfolder of images per class (root/class_name/image.png)"
            )
        folder = datasets.ImageFolder(root, transform=transform)
        if len(folder.classes) != num_classes:
            raise ValueError(
                f"data.root={root!r} has {len(folder.classes)} class folders but data.num_classes={num_classes}: "
                f"set data.num_classes={len(folder.classes)}"
            )
        return folder
    dataset_class = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        return dataset_class(root, train=split == "train", download=download, transform=transform)
    except RuntimeError as error:
        if download:
            raise
        fetch = (
            f"python -c \"import torchvision; torchvision.datasets.{dataset_class.__name__}('{root}', download=True)\""
        )
        raise _missing_dataset(name, root, fetch) from error


class LogicalBatchSampler(Sampler[list[int]]):
    """Logical batches for one rank, the same global batches however many ranks train.

    Step s's global batch is drawn from `randomness`' stream for step s (secret by default:
    see `dpdit.randomness`): with `poisson`, every image joins independently with probability
    `sample_rate` (the sampling DP-SGD's accounting assumes); otherwise `batch_size` distinct
    images. Every rank draws the same global batch (the ranks share one key) and keeps the
    part whose positions are `rank` modulo `world_size`, so the ranks together hold exactly
    one single-process batch, and every rank yields the same number of (possibly empty)
    batches, so none waits for another in a collective. Drawing from step s's own stream
    rather than a running one makes a resumed run, which starts at `first_step`, draw the
    batches an uninterrupted run would have drawn.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        randomness: PrivateRandomness,
        poisson: bool = True,
        first_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.sample_rate = batch_size / dataset_size
        self.poisson = poisson
        self.randomness = randomness
        self.step = first_step
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        """Batches per epoch: one pass over the data in expectation."""
        return max(self.dataset_size // self.batch_size, 1)

    def global_batch(self, step: int) -> np.ndarray:
        if self.poisson:
            return self.randomness.poisson_batch(step, self.dataset_size, self.sample_rate)
        return self.randomness.fixed_size_batch(step, self.dataset_size, self.batch_size)

    def __iter__(self):
        for _ in range(len(self)):
            batch = self.global_batch(self.step)
            self.step += 1
            yield batch[self.rank :: self.world_size].tolist()


class ImageDataModule(L.LightningDataModule):
    """A labelled image dataset and its training loader.

    `batch_size` is the logical batch over all ranks. With `poisson_sampling` each image
    joins a batch independently with probability `sample_rate = batch_size / len(dataset)`
    (the sampling DP-SGD's accounting assumes); otherwise batches are random and of fixed
    size, drawn from `randomness` (default: a secret key with Poisson sampling, a fixed one
    without). See `LogicalBatchSampler` for how ranks share a batch and how resumes continue.
    `framing` is how font digits sit in their images (the private digits' way, for a public stand-in).

    With a `vae` the dataset holds the VAE latents of the images instead (and of their
    mirrors when `hflip`), encoded once into `latent_cache_dir` (default: beside
    `root`, as `<root>.latents`; the data configs without a root give the cache folder).
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        image_size: int = 8,
        channels: int = 1,
        num_classes: int = 10,
        batch_size: int = 256,
        physical_batch_size: int = 256,
        hflip: bool = False,
        download: bool = False,
        size: int = 256,
        num_workers: int = 0,
        poisson_sampling: bool = True,
        randomness: PrivateRandomness | None = None,
        vae: FrozenVAE | None = None,
        latent_cache_dir: str | None = None,
        test_root: str | None = None,
        framing: str = "uci",
    ):
        super().__init__()
        self.dataset = dataset
        self.root = root
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.physical_batch_size = physical_batch_size
        self.hflip = hflip
        self.download = download
        self.size = size
        self.num_workers = num_workers
        self.poisson_sampling = poisson_sampling
        self.randomness = randomness or PrivateRandomness.create(secret=poisson_sampling)
        self.vae = vae
        self.test_root = test_root
        self.framing = framing
        self.latent_cache_dir = latent_cache_dir or (f"{Path(root).expanduser()}.latents" if root else None)
        self.train_dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        # Latents are encoded from unflipped images; the cache holds the mirrors.
        images = build_dataset(
            self.dataset,
            self.root,
            self.image_size,
            self.channels,
            self.num_classes,
            hflip=self.hflip and self.vae is None,
            download=self.download,
            size=self.size,
            framing=self.framing,
        )
        if self.vae is None:
            self.train_dataset = images
            return
        if self.latent_cache_dir is None:
            raise ValueError(
                f"data={self.dataset} has no data.root to cache its latents beside: "
                "set data.latent_cache_dir=/path/to/a/folder"
            )
        settings = {
            key: getattr(self, key) for key in ("dataset", "image_size", "channels", "num_classes", "size", "framing")
        }
        self.train_dataset = cached_latents(
            images,
            self.vae,
            self.latent_cache_dir,
            describe_images(images, settings),
            flips=self.hflip,
            batch_size=self.physical_batch_size,
        )

    def images(self, split: str) -> Dataset:
        """A split's images in pixel space, unflipped: the real data that samples are compared with."""
        return build_dataset(
            self.dataset,
            self.root,
            self.image_size,
            self.channels,
            self.num_classes,
            download=self.download,
            size=self.size,
            split=split,
            test_root=self.test_root,
            framing=self.framing,
        )

    @property
    def class_names(self) -> list[str]:
        """Class names in label order: a folder dataset's subfolders, else the label numbers."""
        if self.dataset == "imagefolder" and self.root is not None and Path(self.root).is_dir():
            return datasets.folder.find_classes(self.root)[0]
        return [str(label) for label in range(self.num_classes)]

    @property
    def dataset_size(self) -> int:
        self.setup()
        return len(self.train_dataset)

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.dataset_size

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        if trainer is not None:
            # Each process drew its own key; the ranks' batches must come from rank 0's.
            self.randomness.share(trainer.strategy)
        sampler = LogicalBatchSampler(
            self.dataset_size,
            self.batch_size,
            self.randomness,
            poisson=self.poisson_sampling,
            # a resumed trainer has already restored its step when it asks for the loader
            first_step=trainer.global_step if trainer else 0,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        # Poisson sampling may draw nothing; empty batches keep the images' shapes.
        example = self.train_dataset[0]
        collate = wrap_collate_with_empty(
            collate_fn=default_collate,
            sample_empty_shapes=[(0, *shape_safe(x)) for x in example],
            dtypes=[dtype_safe(x) for x in example],
        )
        return DataLoader(self.train_dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate)
