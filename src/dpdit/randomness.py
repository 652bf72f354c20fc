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
from typing import Any, NamedTuple

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KINDS = ("secret", "seeded")
KEY_BYTES = 32
# 53 random bits per uniform, as many as a float64 mantissa holds
UNIFORM_BITS = 53
# normals drawn at a time (even: Box-Muller gives them in pairs)
NOISE_CHUNK = 2**18
# what drawing one chunk holds: the keystream, its shifted words, the uniforms, the normals
# and one cosine, 8 bytes per value each
NOISE_WORKSPACE_BYTES = 5 * 8 * NOISE_CHUNK


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

    def stream(self, purpose: str, step: int, block: int = 0):
        """The keystream of one (purpose, step): an AES-256-CTR encryptor of zeros, from its
        16-byte block `block` on (CTR's counter is the block's index: any place is reachable)."""
        key = hmac.new(self.key, f"{purpose}/{int(step)}".encode(), hashlib.sha256).digest()
        return Cipher(algorithms.AES(key), modes.CTR(int(block).to_bytes(16, "big"))).encryptor()

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

    def add_gaussian_noise(
        self, step: int, tensors: list[torch.Tensor | TensorShard], std: float, purpose: str = "noise"
    ) -> None:
        """Add N(0, std^2) noise to each (contiguous) tensor in place, all drawn from step
        `step`'s stream for `purpose` (the gradients' "noise", or the released "statistics":
        independent streams) in order, `NOISE_CHUNK` values at a time: no noise tensor the
        size of a weight, let alone of the model (a second copy of its gradients), is ever
        held, and the sum is rounded once, from float64.

        A `TensorShard` gets the values its place in the whole tensor would get: a rank that
        holds a shard of each weight (FSDP) draws only its shards' chunks, and the noise of
        the whole model is the one a single process adds, whatever the number of ranks."""
        stream = Keystream(self, purpose, step)
        for tensor in tensors:
            shard = tensor if isinstance(tensor, TensorShard) else TensorShard(tensor, tensor.numel(), 0)
            local, end = shard.local.view(-1), shard.start + shard.local.numel()
            for begin in range(0, shard.numel, NOISE_CHUNK):
                count = min(NOISE_CHUNK, shard.numel - begin)
                low, high = max(begin, shard.start), min(begin + count, end)
                if low < high:
                    normals = standard_normals(stream, count, local.device)[low - begin : high - begin]
                    local[low - shard.start : high - shard.start].add_(normals.mul_(std))
                else:
                    stream.skip(normal_words(count))

    def gaussian_noise(
        self, step: int, references: list[torch.Tensor], std: float, purpose: str = "noise"
    ) -> list[torch.Tensor]:
        """The noise `add_gaussian_noise` adds to tensors shaped like `references` (on their
        devices, in their dtypes)."""
        noises = [torch.zeros_like(reference, memory_format=torch.contiguous_format) for reference in references]
        self.add_gaussian_noise(step, noises, std, purpose)
        return noises

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


class TensorShard(NamedTuple):
    """The values [start, start + local.numel()) of a flattened tensor of `numel` values."""

    local: torch.Tensor
    numel: int
    start: int


class Keystream:
    """One (purpose, step)'s AES-CTR keystream, read in pieces of at most `NOISE_CHUNK` words
    into one reused buffer; `skip` moves past words without reading them."""

    def __init__(self, randomness: PrivateRandomness, purpose: str, step: int):
        self.randomness, self.purpose, self.step = randomness, purpose, step
        self.encryptor = randomness.stream(purpose, step)
        self.zeros = bytes(8 * NOISE_CHUNK)
        # CTR may write up to a block beyond the input's length
        self.buffer = bytearray(8 * NOISE_CHUNK + 15)
        self.position = 0

    def skip(self, count: int) -> None:
        # the encryptor moves there at the next read: a run of skipped chunks costs one seek
        self.position += count
        self.encryptor = None

    def words(self, count: int) -> np.ndarray:
        """The next `count` 64-bit words; valid until the next call."""
        if self.encryptor is None:
            block, within = divmod(8 * self.position, 16)
            self.encryptor = self.randomness.stream(self.purpose, self.step, block)
            if within:
                self.encryptor.update(bytes(within))
        self.encryptor.update_into(memoryview(self.zeros)[: 8 * count], self.buffer)
        self.position += count
        return np.frombuffer(self.buffer, dtype=np.uint64, count=count)


def normal_words(count: int) -> int:
    """The keystream words `standard_normals` reads for `count` values (two per pair)."""
    return 2 * math.ceil(count / 2)


def standard_normals(stream: Keystream, count: int, device: torch.device) -> torch.Tensor:
    """`count` N(0, 1) values in float64 on `device`: Box-Muller on the device from 53-bit
    uniforms. The noise is far finer than the float32 gradient it is added to, so the sum's
    low bits are those of rounding, not of the noise's representation (the floating-point
    attack of Mironov, 2012)."""
    pairs = math.ceil(count / 2)
    bits = stream.words(normal_words(count)) >> np.uint64(64 - UNIFORM_BITS)
    uniform = torch.from_numpy(bits.view(np.int64)).to(device).double()
    uniform.add_(1.0).mul_(2.0**-UNIFORM_BITS)  # (0, 1]: the logarithm stays finite
    radius = uniform[:pairs].log_().mul_(-2.0).sqrt_()
    angle = uniform[pairs:].mul_(2.0 * math.pi)
    normals = torch.empty(2 * pairs, dtype=torch.float64, device=device)
    torch.mul(radius, torch.cos(angle), out=normals[:pairs])
    torch.mul(radius, angle.sin_(), out=normals[pairs:])
    return normals[:count]
