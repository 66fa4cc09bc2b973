"""A flat token file (.bin of uint16/uint32) opened with numpy.memmap, plus its JSON sidecar.

The sidecar `<path>.json` (written by moepipe-make-memmap) records dtype, vocab_size,
num_tokens and tokenizer, so a mismatched config is caught at load time instead of
training silently on garbage ids.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from moepipe.config import ConfigError

TOKEN_DTYPES = ("uint16", "uint32")
MAX_CHECKED_TOKENS = 100_000_000  # scan for out-of-vocab ids only below this (about 0.1 s per 100M uint16)


def sidecar_path(path: str) -> str:
    return path + ".json"


def read_sidecar(path: str) -> Optional[dict[str, Any]]:
    """The sidecar's contents, or None when there is none."""
    side = sidecar_path(path)
    if not os.path.exists(side):
        return None
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.path={path} has an unreadable sidecar {side} ({exc}): fix or delete it and set data.vocab_size") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"data.path={path} has a sidecar {side} that is not a JSON object: regenerate it with moepipe-make-memmap")
    return meta


def write_sidecar(path: str, dtype: str, vocab_size: int, num_tokens: int, tokenizer: str, **extra: Any) -> None:
    meta = {"dtype": dtype, "vocab_size": int(vocab_size), "num_tokens": int(num_tokens), "tokenizer": tokenizer, **extra}
    with open(sidecar_path(path), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def load_memmap(
    path: str, token_dtype: str = "uint16", vocab_size: Optional[int] = None, val_fraction: float = 0.05
) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """(train view, val view, vocab_size, info); the last `val_fraction` of tokens is validation."""
    if not path:
        raise ConfigError("data.path is not set: data=memmap needs data.path=/path/to/tokens.bin (make one with moepipe-make-memmap)")
    if not os.path.isfile(path):
        raise ConfigError(f"data.path={path} does not exist: check the path or make it with moepipe-make-memmap --out {path} FILES...")
    if token_dtype not in TOKEN_DTYPES:
        raise ConfigError(f"data.token_dtype={token_dtype!r} is not known: choose one of {', '.join(TOKEN_DTYPES)}")
    meta = read_sidecar(path)
    # The sidecar's dtype is checked first: its message names the right fix.
    if meta is not None and meta.get("dtype") is not None and meta["dtype"] != token_dtype:
        raise ConfigError(
            f"data.token_dtype={token_dtype} does not match dtype={meta['dtype']} in {sidecar_path(path)}: "
            f"set data.token_dtype={meta['dtype']}"
        )
    itemsize = np.dtype(token_dtype).itemsize
    nbytes = os.path.getsize(path)
    if nbytes % itemsize:
        raise ConfigError(
            f"data.path={path} has {nbytes} bytes, not a multiple of {itemsize} (data.token_dtype={token_dtype}): "
            "set data.token_dtype to the dtype it was written with or regenerate the file"
        )
    num_tokens = nbytes // itemsize

    if meta is not None:
        if meta.get("num_tokens") is not None and int(meta["num_tokens"]) != num_tokens:
            raise ConfigError(
                f"data.path={path} holds {num_tokens} tokens but its sidecar says {meta['num_tokens']}: "
                "the file is truncated or stale; regenerate it with moepipe-make-memmap"
            )
        side_vocab = meta.get("vocab_size")
        if vocab_size is None:
            vocab_size = side_vocab
        elif side_vocab is not None and vocab_size < int(side_vocab):
            raise ConfigError(
                f"data.vocab_size={vocab_size} < vocab_size={side_vocab} in {sidecar_path(path)}: "
                f"set data.vocab_size={side_vocab} or null to read it from the sidecar"
            )
    if vocab_size is None:
        raise ConfigError(
            f"data.vocab_size=None and {path} has no sidecar {sidecar_path(path)}: set data.vocab_size to the tokenizer's vocabulary size"
        )
    vocab_size = int(vocab_size)
    if vocab_size <= 0:
        raise ConfigError(f"data.vocab_size={vocab_size} must be > 0: set the tokenizer's vocabulary size")
    if vocab_size > np.iinfo(token_dtype).max + 1:
        raise ConfigError(f"data.vocab_size={vocab_size} does not fit data.token_dtype={token_dtype}: use data.token_dtype=uint32")

    n_val = int(num_tokens * val_fraction)
    n_train = num_tokens - n_val
    if n_val < 2 or n_train < 2:  # a sequence needs at least one input and one target token
        raise ConfigError(
            f"data.path={path} holds only {num_tokens} tokens: too short for one sequence in each split "
            f"(data.val_fraction={val_fraction}); use a larger token file"
        )
    tokens = np.memmap(path, dtype=token_dtype, mode="r", shape=(num_tokens,))
    if num_tokens < MAX_CHECKED_TOKENS:
        top = int(tokens.max())
        if top >= vocab_size:
            raise ConfigError(
                f"data.vocab_size={vocab_size} but {path} holds token id {top}: set data.vocab_size >= {top + 1} "
                "or check the file was made with the right tokenizer"
            )
    info = {
        "path": path,
        "tokenizer": (meta or {}).get("tokenizer"),
        "train_tokens": n_train,
        "val_tokens": n_val,
    }
    return tokens[:n_train], tokens[n_train:], vocab_size, info
