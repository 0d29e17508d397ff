"""Training data prepared on disk: token ids as flat memory-mapped arrays, read without copying.

A prepared folder (written by :mod:`transformer.data.prepare`) holds, for the training split:

- ``train.src.bin`` / ``train.tgt.bin``: every kept pair's subword ids back to back, without
  BOS/EOS, as raw little-endian ``uint16`` (vocabularies up to 65,536) or ``int32``;
- ``train.src.idx.npy`` / ``train.tgt.idx.npy``: (N + 1,) int64 offsets, pair ``i`` being
  ``bin[idx[i]:idx[i + 1]]`` (the layout of fairseq's memory-mapped indexed datasets);
- ``train.src.len.npy`` / ``train.tgt.len.npy``: (N,) int32 token counts, so bucketing reads no ids;
- the SentencePiece model(s) the ids come from;
- ``manifest.json``: what was read (files with size, time and SHA-256, or a Hugging Face dataset
  fingerprint), every setting that changes the ids, pair counts, and each file's size and SHA-256.

Every array is opened with ``numpy`` memory maps, so a rank's memory does not grow with the corpus
and ranks on one machine share the pages through the page cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from transformer.data.batches import DataError
from transformer.data.tokenizer import EOS_ID, Tokenizer, load_tokenizers

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIDES = ("src", "tgt")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None if it has none or it is not valid JSON."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def settings_difference(found: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> str | None:
    """Name the first setting that differs between two nested dicts, e.g. ``"tokenizer.vocab_size 8000 != 37000"``."""
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = settings_difference(a, b, f"{prefix}{key}.")
            if inner:
                return inner
        elif a != b:
            return f"{prefix}{key} {a!r} != {b!r}"
    return None


def damaged_file(folder: Path, manifest: dict[str, Any], verify_content: bool) -> str | None:
    """Describe the first listed file that is missing, of the wrong size or (with ``verify_content``)
    of the wrong SHA-256; None when all match."""
    for name, meta in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != meta["bytes"]:
            return f"{path} has {size} bytes, the manifest says {meta['bytes']} (truncated or rewritten)"
        if verify_content and file_sha256(path) != meta["sha256"]:
            return f"{path} does not match the SHA-256 in its manifest (edited or corrupt)"
    return None


class _Rows(Sequence[list[int]]):
    """Row ``i`` of a flat id array as a list of ints, with ``suffix`` appended."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, suffix: list[int]) -> None:
        self.tokens, self.offsets, self.suffix = tokens, offsets, suffix

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:  # type: ignore[override]
        return self.tokens[self.offsets[i]:self.offsets[i + 1]].tolist() + self.suffix


class PreparedData:
    """The training pairs of a prepared folder, memory-mapped.

    It reads like :class:`transformer.data.batches.ParallelData` where training needs it: ``src[i]`` ends
    with EOS, ``tgt[i]`` has no BOS/EOS, and ``src_lens``/``tgt_lens`` are the padded lengths, so
    :func:`transformer.data.batches.bucket_batches` and :func:`transformer.data.batches.collate` take it unchanged.

    Attributes:
        folder: the prepared folder.
        manifest: its parsed ``manifest.json``.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder, self.manifest = folder, manifest
        dtype = np.dtype(manifest["dtype"])
        rows: dict[str, _Rows] = {}
        self._lens: dict[str, np.ndarray] = {}
        for side in SIDES:
            offsets = np.load(folder / f"train.{side}.idx.npy", mmap_mode="r")
            tokens = np.memmap(folder / f"train.{side}.bin", dtype=dtype, mode="r", shape=(int(offsets[-1]),))
            rows[side] = _Rows(tokens, offsets, [EOS_ID] if side == "src" else [])
            self._lens[side] = np.load(folder / f"train.{side}.len.npy", mmap_mode="r")
        self.src, self.tgt = rows["src"], rows["tgt"]

    def __len__(self) -> int:
        return len(self._lens["src"])

    @property
    def src_lens(self) -> np.ndarray:
        """(N,) length of each ``src`` row as it will be padded (EOS included)."""
        return self._lens["src"] + 1

    @property
    def tgt_lens(self) -> np.ndarray:
        """(N,) length of each ``tgt_in``/``tgt_out`` row as it will be padded (tokens + 1)."""
        return self._lens["tgt"] + 1


def open_prepared(folder: str | Path, verify_content: bool = True) -> tuple[PreparedData, dict[str, Tokenizer]]:
    """Map a prepared folder after checking that every file is the one its manifest lists.

    Args:
        folder: the prepared folder.
        verify_content: also compare each file's SHA-256 (reads every byte once; sizes are always checked).

    Returns:
        The training pairs and the tokenizers by language code (one shared object when joint).

    Raises:
        DataError: no readable manifest, an unknown format, or a missing, truncated or edited file;
            the message names the folder or file.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder}: no readable {MANIFEST}; run transformer-prepare")
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{folder}: prepared data format {manifest.get('format')!r}, this version reads "
                        f"{FORMAT_VERSION}; run transformer-prepare again")
    damage = damaged_file(folder, manifest, verify_content)
    if damage:
        raise DataError(f"{damage}; run transformer-prepare again")
    return PreparedData(folder, manifest), load_tokenizers(folder, manifest["tokenizers"])
