"""Byte-level corpus: the Python standard library's own source files on this machine.

Needs no download. The file list is sorted by relative POSIX path and the
validation files are chosen by a sha1 of that path, so the corpus and its split
depend only on the files present, never on directory-walk order or PYTHONHASHSEED.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from typing import Optional

import numpy as np

from moepipe.config import ConfigError

FILE_SEPARATOR = b"\x1c"  # ASCII "file separator"; appended after every file, absent from normal source
# Test suites are ~60% of the stdlib's bytes and full of generated or adversarial data;
# installed third-party packages are not the stdlib at all.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
VOCAB_SIZE = 256


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_files(root: str) -> list[tuple[str, int]]:
    """(relative POSIX path, size in bytes) of every included *.py file, sorted by path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                if os.path.isfile(full):
                    out.append((os.path.relpath(full, root).replace(os.sep, "/"), os.path.getsize(full)))
    out.sort()
    return out


def _path_key(rel: str) -> bytes:
    return hashlib.sha1(rel.encode("utf-8")).digest()


def choose_val_files(sizes: dict[str, int], val_fraction: float) -> set[str]:
    """Whole files for validation, about `val_fraction` of the bytes.

    Files are visited in sha1(path) order (a fixed pseudo-random order) and taken
    while they fit in the byte budget; skipping ones that overshoot keeps one large
    file (e.g. pydoc_data/topics.py, ~6% of the corpus) from becoming the whole
    validation set.
    """
    budget = val_fraction * sum(sizes.values())
    chosen: set[str] = set()
    used = 0
    for rel in sorted(sizes, key=_path_key):
        if used + sizes[rel] <= budget:
            chosen.add(rel)
            used += sizes[rel]
    if not chosen and sizes:  # tiny corpora: nothing fits, so take the smallest file
        chosen.add(min(sizes, key=lambda r: (sizes[r], _path_key(r))))
    return chosen


@functools.lru_cache(maxsize=8)
def _load(root: str, val_fraction: float, max_bytes: Optional[int]) -> tuple[np.ndarray, np.ndarray, tuple]:
    pieces: dict[str, bytes] = {}
    total = 0
    for rel, _ in list_files(root):
        if max_bytes is not None and total >= max_bytes:
            break
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read() + FILE_SEPARATOR
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]  # cut the last file so the corpus is exactly max_bytes
        pieces[rel] = data
        total += len(data)
    if not pieces:
        raise ConfigError(f"data.name=stdlib_bytes found no *.py files under {root}: use data=memmap with your own tokens")

    val_files = choose_val_files({r: len(b) for r, b in pieces.items()}, val_fraction)
    train_files = [r for r in pieces if r not in val_files]
    if not train_files:
        raise ConfigError(
            f"data.max_bytes={max_bytes} leaves no training file after the validation split: raise data.max_bytes"
        )
    # np.frombuffer over bytes gives read-only arrays: safe to share from the cache.
    train = np.frombuffer(b"".join(pieces[r] for r in train_files), dtype=np.uint8)
    val = np.frombuffer(b"".join(pieces[r] for r in sorted(val_files)), dtype=np.uint8)
    info = (
        ("root", root),
        ("files", len(pieces)),
        ("train_files", len(train_files)),
        ("val_files", len(val_files)),
        ("train_tokens", int(train.size)),
        ("val_tokens", int(val.size)),
        ("train_paths", tuple(train_files)),
        ("val_paths", tuple(sorted(val_files))),
    )
    return train, val, info


def load_stdlib_bytes(
    val_fraction: float = 0.05, max_bytes: Optional[int] = None, root: Optional[str] = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train uint8 array, val uint8 array, info dict); cached once per process.

    info holds the root, file/token counts per split and the relative paths in each.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError(f"data.max_bytes={max_bytes} must be > 0: set a positive cap or null for all files")
    train, val, info = _load(root or stdlib_root(), float(val_fraction), max_bytes)
    return train, val, dict(info)

