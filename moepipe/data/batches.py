"""The corpus interface and the stateless batch sampler shared by every training layout.

The training batch at step s is a pure function of (seed, step): a run resumed at
step s, or run on any (pp, ep, dp) mesh, sees exactly the same global batch, and
data-parallel ranks take contiguous slices of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch

from moepipe.config import DATASETS, ConfigError, DataConfig

Batch = tuple[torch.Tensor, torch.Tensor]
_STREAM_TAG = 0x6D6F6570  # "moep": keeps the batch stream apart from other users of the same seed


@dataclass(frozen=True)
class TokenCorpus:
    """Token ids split into train and validation (1-D numpy arrays or memmaps)."""

    name: str
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.name}: vocab {self.vocab_size}, train {len(self.train):,} tokens, val {len(self.val):,} tokens"


def build_corpus(data_cfg: DataConfig, seq_len: Optional[int] = None) -> TokenCorpus:
    """Load the corpus `data_cfg` names; with `seq_len`, also check both splits hold a sequence."""
    if data_cfg.name == "stdlib_bytes":
        from moepipe.data.stdlib_bytes import VOCAB_SIZE, load_stdlib_bytes

        train, val, info = load_stdlib_bytes(data_cfg.val_fraction, data_cfg.max_bytes)
        corpus = TokenCorpus("stdlib_bytes", train, val, VOCAB_SIZE, info)
    elif data_cfg.name == "memmap":
        from moepipe.data.memmap import load_memmap

        train, val, vocab, info = load_memmap(data_cfg.path, data_cfg.token_dtype, data_cfg.vocab_size, data_cfg.val_fraction)
        corpus = TokenCorpus("memmap", train, val, vocab, info)
    else:
        raise ConfigError(f"data.name={data_cfg.name!r} is not known: choose one of {', '.join(DATASETS)}")
    if seq_len is not None:
        _check_len("train", len(corpus.train), seq_len)
        _check_len("validation", len(corpus.val), seq_len)
    return corpus


def _check_len(split: str, n: int, seq_len: int) -> None:
    if seq_len < 1:
        raise ConfigError(f"train.seq_len={seq_len} must be > 0: set a positive sequence length")
    if n < seq_len + 1:  # inputs and their shifted targets need seq_len + 1 tokens
        raise ConfigError(
            f"train.seq_len={seq_len} needs {seq_len + 1} tokens but the {split} split has {n}: "
            "lower train.seq_len or use more data (data.max_bytes, data.val_fraction)"
        )


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    # One fancy-indexing gather of [B, T+1] ids; works on in-memory arrays and memmaps alike.
    idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    win = torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64))
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def train_batch(corpus: TokenCorpus, step: int, seed: int, batch_size: int, seq_len: int) -> Batch:
    """The global training batch for `step`: (inputs, targets) int64 [B, T], targets shifted by one.

    Window starts are uniform over the train split, drawn from a generator seeded by
    (seed, step) alone, so no sampler state needs saving or synchronising.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    n = len(corpus.train)
    _check_len("train", n, seq_len)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_STREAM_TAG, seed % (1 << 64), step])))
    starts = rng.integers(0, n - seq_len, size=batch_size, dtype=np.int64)
    return _windows(corpus.train, starts, seq_len)


def val_batches(corpus: TokenCorpus, num_batches: int, batch_size: int, seq_len: int) -> list[Batch]:
    """A fixed evaluation set: num_batches * batch_size evenly spaced windows over the validation split."""
    n = len(corpus.val)
    _check_len("validation", n, seq_len)
    total = num_batches * batch_size
    last = n - seq_len - 1  # the final window start that still has a target for every input
    starts = np.arange(total, dtype=np.int64) * last // max(total - 1, 1)
    return [_windows(corpus.val, starts[i * batch_size : (i + 1) * batch_size], seq_len) for i in range(num_batches)]


def slice_for_rank(batch: Union[Batch, torch.Tensor], dp_rank: int, dp: int) -> Union[Batch, torch.Tensor]:
    """Data-parallel rank `dp_rank`'s contiguous share of a global batch (a tensor or a tuple of them)."""
    if isinstance(batch, torch.Tensor):
        b = batch.shape[0]
        if dp < 1 or not 0 <= dp_rank < dp:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp={dp})")
        if b % dp:
            raise ValueError(f"batch of {b} sequences does not split evenly over dp={dp}")
        per = b // dp
        return batch[dp_rank * per : (dp_rank + 1) * per]
    return tuple(slice_for_rank(t, dp_rank, dp) for t in batch)  # type: ignore[return-value]
