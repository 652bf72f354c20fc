"""The randomness DP-SGD's guarantee rests on: which images join a step, and the Gaussian noise.

Both come from AES-256 in counter mode (pyca/cryptography), a cryptographically secure
stream: one stream per (purpose, step), keyed by HMAC-SHA256 of the run's key, so a step's
draws depend on nothing but the key and the step. That makes a resumed run continue the
very streams of the uninterrupted run, and every rank draw the same Poisson batch.

- `secret` (`privacy.secure_mode=true`, the default): the run's key is 32 bytes from the
  operating system's CSPRNG, held in memory and in the run's checkpoints only (the
  checkpoints are therefore private artifacts). No config, log, report, W&B run, sample
  or exported pipeline contains it or anything it could be derived from.
- `seeded` (`privacy.secure_mode=false`): the key is a hash of the config's seed. Anyone
  who has the config can regenerate every batch and every noise draw, and subtract the
  noise from the released weights: such a run is reproducible, and it is not a private
  release.

The model's own draws (timesteps, diffusion noise, label dropout) are not part of the
mechanism and stay seeded by the config (`dpdit.module.step_seed`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KINDS = ("secret", "seeded")
KEY_BYTES = 32
# 53 random bits per uniform, as many as a float64 mantissa holds
UNIFORM_BITS = 53


class PrivateRandomness:
    """Keyed, cryptographically secure streams for batch membership and DP noise.

    Args:
        key: the run's 32-byte key.
        kind: `secret` (from the OS, kept in checkpoints only) or `seeded` (from the config's seed).
    """

    def __init__(self, key: bytes, kind: str):
        if kind not in KINDS:
            raise ValueError(f"randomness kind {kind!r} is unknown: choose one of {', '.join(KINDS)}")
        if len(key) != KEY_BYTES:
            raise ValueError(f"the randomness key must be {KEY_BYTES} bytes, got {len(key)}")
        self.key = key
        self.kind = kind

    @classmethod
    def secret(cls) -> PrivateRandomness:
        return cls(secrets.token_bytes(KEY_BYTES), "secret")

    @classmethod
    def seeded(cls, seed: int) -> PrivateRandomness:
        return cls(hashlib.sha256(f"dpdit seeded randomness {int(seed)}".encode()).digest(), "seeded")

    @classmethod
    def create(cls, secret: bool, seed: int = 0) -> PrivateRandomness:
        """A new secret key, or the one `seed` gives."""
        return cls.secret() if secret else cls.seeded(seed)

    @property
    def is_secret(self) -> bool:
        return self.kind == "secret"

    def stream(self, purpose: str, step: int):
        """The keystream of one (purpose, step): an AES-256-CTR encryptor of zeros."""
        key = hmac.new(self.key, f"{purpose}/{int(step)}".encode(), hashlib.sha256).digest()
        return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def uniforms(self, purpose: str, step: int, count: int) -> np.ndarray:
        """`count` independent uniforms in [0, 1) (float64, 53 random bits each)."""
        words = np.frombuffer(self.stream(purpose, step).update(bytes(8 * count)), dtype=np.uint64)
        return (words >> np.uint64(64 - UNIFORM_BITS)).astype(np.float64) * 2.0**-UNIFORM_BITS

    def poisson_batch(self, step: int, dataset_size: int, sample_rate: float) -> np.ndarray:
        """Step `step`'s Poisson batch: each index joins independently with probability `sample_rate`."""
        return np.flatnonzero(self.uniforms("batch", step, dataset_size) < sample_rate)

    def fixed_size_batch(self, step: int, dataset_size: int, batch_size: int) -> np.ndarray:
        """`batch_size` distinct indices, uniformly at random (non-private runs)."""
        return np.argsort(self.uniforms("batch", step, dataset_size), kind="stable")[:batch_size]

    def gaussian_noise(self, step: int, references: list[torch.Tensor], std: float) -> Iterator[torch.Tensor]:
        """N(0, std^2) noise shaped like each reference tensor (on its device, in its dtype),
        all drawn from step `step`'s noise stream in order, one tensor at a time (a model's
        noise at once would be a second copy of its gradients).

        Box-Muller on the device in float64 from 53-bit uniforms: the noise is far finer than
        the float32 gradient it is added to, so the sum's low bits are those of rounding,
        not of the noise's representation (the floating-point attack of Mironov, 2012)."""
        stream = self.stream("noise", step)
        for reference in references:
            pairs = math.ceil(reference.numel() / 2)
            words = np.frombuffer(stream.update(bytes(16 * pairs)), dtype=np.uint64)
            bits = torch.from_numpy((words >> np.uint64(64 - UNIFORM_BITS)).astype(np.int64)).to(reference.device)
            uniform = (bits.double() + 1.0) * 2.0**-UNIFORM_BITS  # (0, 1]: the logarithm stays finite
            radius = torch.sqrt(-2.0 * torch.log(uniform[:pairs]))
            angle = 2.0 * math.pi * uniform[pairs:]
            normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[: reference.numel()]
            yield (std * normal).to(reference.dtype).view_as(reference)

    def share(self, strategy) -> None:
        """Make every rank use rank 0's key (each process drew its own at start)."""
        self.key, self.kind = strategy.broadcast((self.key, self.kind), src=0)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: for a secret run the key itself, so that the checkpoint is private."""
        return {"kind": self.kind, "key": self.key.hex()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.key, self.kind = bytes.fromhex(state["key"]), state["kind"]

    def describe(self) -> dict[str, str]:
        """The report's plain words on where batches and noise came from."""
        if self.is_secret:
            return {
                "randomness": "secret",
                "randomness_note": (
                    "batch membership and noise came from a 256-bit key drawn from the operating "
                    "system's CSPRNG (AES-256-CTR streams); the key is only in checkpoints/, "
                    "which must stay private"
                ),
            }
        return {
            "randomness": "seeded",
            "randomness_note": (
                "NOT A PRIVATE RELEASE: privacy.secure_mode=false derived batch membership and noise "
                "from the config's seed, so anyone with the config can regenerate the noise and "
                "remove it from the weights; the epsilon above holds only if the seed stays secret"
            ),
        }


def derived_seed(*entropy: int) -> int:
    """A 63-bit seed derived from `entropy` (NumPy's SeedSequence): independent seeds for
    different entropy tuples, e.g. (seed, purpose, rank, step)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)


def tensor_digest(named_tensors, header: str = "") -> str:
    """A SHA-256 of `header` and every (name, tensor) pair's name and bits."""
    digest = hashlib.sha256(header.encode())
    for name, tensor in named_tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
