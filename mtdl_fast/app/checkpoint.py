"""Checkpoints written atomically and verified on load.

File layout: a magic line, the sha256 of the payload, then the payload (torch.save bytes). A write
goes to a temporary file in the same directory, is fsynced, then renamed over the target, so a
crash mid-write leaves the previous checkpoint intact; a truncated or altered file fails its
checksum and is refused with a clear error instead of loading garbage.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import torch

MAGIC = b"MTDL-FAST-CHECKPOINT v1\n"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or not written by mtdl-fast."""


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Atomically write `state` (anything torch.save takes) to `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode() + b"\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(MAGIC + digest + payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`; CheckpointError when it is not intact."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not an mtdl-fast checkpoint (no {MAGIC.strip().decode()!r} header)")
    header_end = len(MAGIC) + 65
    digest, payload = data[len(MAGIC) : header_end - 1], data[header_end:]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated (checksum mismatch)")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - the checksum passed, so this is a foreign payload
        raise CheckpointError(f"checkpoint {path} could not be read: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds {type(state).__name__}, not a state dict")
    return state
