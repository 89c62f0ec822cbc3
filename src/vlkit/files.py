"""Small file helpers shared by every layer of vlkit: atomic writes, strict JSON reading, checked safetensors reading.

A reader (another process, or a resumed run after a crash) sees either the old file or the new one, never a mix.
A file that is there but damaged (truncated by a full disk or a killed copy, a torch pickle renamed to
``.safetensors``, hand-edited JSON) is a ``DamagedFileError``: a ``ValueError`` whose one-line message names the
file and says what is wrong with it, which the CLI prints as ``vlkit: error: ...``.

Safetensors layout checked here: 8 bytes little-endian header length N, N bytes of JSON header (tensor name ->
dtype, shape, ``data_offsets`` [begin, end) into the data buffer; optional ``__metadata__``), then the data buffer,
whose length must equal the largest end offset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def atomic_write(target: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(temporary_path)`` in ``target``'s folder, flush it to disk, then rename it over ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(target: Path, text: str) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(target: Path, data: dict[str, Any]) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


class DamagedFileError(ValueError):
    """A file that exists but cannot be what it claims to be; ``str()`` is one line naming ``path`` and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is a ``DamagedFileError`` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DamagedFileError(path, f"not valid JSON ({error})") from None
    except UnicodeDecodeError:
        raise DamagedFileError(path, "not valid JSON (not UTF-8 text)") from None
    if not isinstance(data, dict):
        raise DamagedFileError(path, f"expected a JSON object, found {type(data).__name__}")
    return data


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, the same digest ``sha256sum`` prints."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# Bytes per element of the safetensors dtypes; a dtype missing here is left to safetensors itself to judge.
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
# safetensors itself refuses headers above 100 MB; a larger length is a sign of a file of another format.
_MAX_SAFETENSORS_HEADER = 100_000_000


def _not_safetensors(start: bytes) -> str | None:
    """Name the format of a file that is obviously not safetensors, from its first bytes."""
    if start.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save's format), not safetensors; vlkit never unpickles weights"
    if start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (an old torch.save file), not safetensors; vlkit never unpickles weights"
    return None


def check_safetensors(path: Path) -> dict[str, Any]:
    """Check a safetensors file's structure without reading its tensors; return its header.

    Catches truncation anywhere (the data buffer must be exactly as long as the header says), trailing bytes, a
    header that is not JSON, tensors whose byte range does not fit their dtype and shape, and files of another
    format renamed to ``.safetensors``. Raises ``FileNotFoundError`` for a missing file and ``DamagedFileError``
    otherwise. Bit flips inside tensor data need a checksum (training checkpoints record one).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start = handle.read(8)
        foreign = _not_safetensors(start)
        if foreign:
            raise DamagedFileError(path, foreign)
        if len(start) < 8:
            raise DamagedFileError(path, f"truncated: {size} bytes, too short for a safetensors file")
        header_length = int.from_bytes(start, "little")
        if header_length > _MAX_SAFETENSORS_HEADER:
            raise DamagedFileError(path, f"not a safetensors file (header length {header_length} is implausible)")
        if 8 + header_length > size:
            raise DamagedFileError(
                path, f"truncated: {size} bytes, but its safetensors header alone needs {8 + header_length}"
            )
        raw = handle.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DamagedFileError(path, "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise DamagedFileError(path, "not a safetensors file (its header is not a JSON object)")
    data_length = size - 8 - header_length
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(offset) for offset in info["data_offsets"])
            shape = [int(dim) for dim in info["shape"]]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise DamagedFileError(path, f"not a safetensors file (bad header entry for {name!r})") from None
        element_bytes = _SAFETENSORS_DTYPE_BYTES.get(dtype)
        if begin > stop or (element_bytes is not None and stop - begin != element_bytes * math.prod(shape)):
            reason = f"damaged header: {name!r} has byte range [{begin}, {stop}) for {dtype}{shape}"
            raise DamagedFileError(path, reason)
        end = max(end, stop)
    if data_length < end:
        raise DamagedFileError(path, f"truncated: {size} bytes, its safetensors header says {8 + header_length + end}")
    if data_length > end:
        raise DamagedFileError(path, f"{data_length - end} unexpected bytes after the last tensor")
    return header


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU), after ``check_safetensors``; damage names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))
    except SafetensorError as error:
        # Whatever the structural check above cannot see (overlapping ranges, an unknown dtype...).
        raise DamagedFileError(path, f"not a valid safetensors file ({error})") from None
