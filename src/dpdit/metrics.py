"""Class-consistency: how often a classifier trained on the real digits agrees with the
label a sample was generated for. It reads the real (private) data, so it is a
non-private diagnostic for the developer, not a released statistic."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from dpdit.data import load_digits_tensors
from dpdit.images import from_uint8


def digits_classifier() -> LogisticRegression:
    """Logistic regression on the 1,497 real 8x8 training digits in [-1, 1]."""
    images, labels = load_digits_tensors(8)
    return LogisticRegression(max_iter=2000).fit(images.flatten(1).numpy(), labels.numpy())


def to_digits_features(images: np.ndarray) -> np.ndarray:
    """uint8 N x 1 x H x W images as 8x8 [-1, 1] feature rows."""
    x = from_uint8(images)
    if x.shape[-1] != 8:
        x = F.interpolate(x, size=(8, 8), mode="area")
    return x.flatten(1).numpy()


def class_consistency(images: np.ndarray, labels: np.ndarray) -> float:
    """Share of generated digits that the real-data classifier assigns to their label."""
    predicted = digits_classifier().predict(to_digits_features(images))
    return float((predicted == labels).mean())
