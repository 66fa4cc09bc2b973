"""Token corpora (stdlib_bytes, memmap) and the stateless, deterministic batch sampler."""
from moepipe.data.batches import Batch, TokenCorpus, build_corpus, slice_for_rank, train_batch, val_batches
from moepipe.data.memmap import load_memmap, read_sidecar, write_sidecar
from moepipe.data.stdlib_bytes import load_stdlib_bytes

__all__ = [
    "Batch",
    "TokenCorpus",
    "build_corpus",
    "train_batch",
    "val_batches",
    "slice_for_rank",
    "load_memmap",
    "read_sidecar",
    "write_sidecar",
    "load_stdlib_bytes",
]
