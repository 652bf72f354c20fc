"""Writes that a kill cannot tear: a run's checkpoints, privacy report and config.

Each file is written to a temporary file in its own directory, flushed to disk and then
renamed over the target (`os.replace`, atomic within one filesystem). Lightning's own save
goes through a temporary file in TMPDIR and moves it, which across filesystems (a
container's /tmp against an /outputs volume) is a copy into the target; a kill during that
copy leaves a torn `last.ckpt`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write` on a temporary file beside `path`, then put it in place of `path`:
    at any moment `path` holds either its previous content or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda file: file.write(text.encode()))


def write_json_atomically(path: str | Path, data: Any) -> None:
    write_text_atomically(path, json.dumps(data, indent=2))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with `write_atomically` for local paths."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(path, lambda file: torch.save(checkpoint, file))
