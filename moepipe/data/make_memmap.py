"""moepipe-make-memmap: tokenize text files into a flat .bin token file plus its JSON sidecar.

    moepipe-make-memmap --out corpus.bin [--tokenizer bytes|tokenizer.json] [--dtype uint16|uint32] FILES...

FILES are files, directories (every file below, sorted) or globs (`**` recurses).
Files are streamed in chunks, so the corpus never has to fit in memory. With a
tokenizer.json, an end-of-document token (if the tokenizer has one) is written between
files; the `bytes` tokenizer (ids 0-255 = raw bytes) has none, so file boundaries are
not marked.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Iterator, Optional, Sequence

import numpy as np

from moepipe.data.memmap import sidecar_path, write_sidecar

CHUNK_BYTES = 8 << 20  # bytes read per step (raw bytes, or text for a tokenizer)
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256
    eod_id: Optional[int] = None

    def encode_file(self, path: str) -> Iterator[np.ndarray]:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield np.frombuffer(chunk, dtype=np.uint8)


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (the library is an optional dependency)."""

    def __init__(self, path: str, eod: Optional[str] = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise SystemExit(
                f"--tokenizer {path} needs the `tokenizers` library: pip install tokenizers (or use --tokenizer bytes)"
            ) from None
        if not os.path.isfile(path):
            raise SystemExit(f"--tokenizer {path} does not exist: give a tokenizer.json file or `bytes`")
        self.tok = Tokenizer.from_file(path)
        self.name = os.path.abspath(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        names = (eod,) if eod else EOD_CANDIDATES
        ids = [self.tok.token_to_id(n) for n in names]
        self.eod_id = next((i for i in ids if i is not None), None)
        if eod and self.eod_id is None:
            raise SystemExit(f"--eod {eod} is not a token of {path}: pick one from its vocabulary")

    def encode_file(self, path: str) -> Iterator[np.ndarray]:
        # Chunks end at line boundaries so no word is split between two encode calls.
        with open(path, encoding="utf-8", errors="replace") as f:
            while True:
                text = f.read(CHUNK_BYTES)
                if not text:
                    break
                text += f.readline()
                yield np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def expand_inputs(patterns: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Files named by paths, directories and globs, in argument order then sorted; no duplicates."""
    skip = {os.path.abspath(p) for p in exclude}
    out: list[str] = []
    seen: set[str] = set()
    for pat in patterns:
        if any(c in pat for c in "*?["):
            found = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(pat):
            found = sorted(os.path.join(d, n) for d, _, names in os.walk(pat) for n in names)
        elif os.path.isfile(pat):
            found = [pat]
        else:
            raise SystemExit(f"input {pat} does not exist: give files, directories or globs")
        if not found:
            raise SystemExit(f"input {pat} matches no files: check the pattern")
        for p in found:
            key = os.path.abspath(p)
            if key not in seen and key not in skip:
                seen.add(key)
                out.append(p)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moepipe-make-memmap", description="Tokenize text files into a flat token file for data=memmap."
    )
    p.add_argument("--out", required=True, help="output .bin; the sidecar <out>.json is written beside it")
    p.add_argument("--tokenizer", default="bytes", help="`bytes` (vocab 256) or a tokenizer.json (needs `pip install tokenizers`)")
    p.add_argument("--dtype", choices=("uint16", "uint32"), default=None, help="token dtype (default: uint16 if the vocab fits, else uint32)")
    p.add_argument("--eod", default=None, help="end-of-document token written between files (default: auto-detect, e.g. <|endoftext|>)")
    p.add_argument("inputs", nargs="+", metavar="FILES", help="text files, directories or globs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    tok = ByteTokenizer() if args.tokenizer == "bytes" else HFTokenizer(args.tokenizer, args.eod)
    dtype = args.dtype or ("uint16" if tok.vocab_size <= 1 << 16 else "uint32")
    if tok.vocab_size > np.iinfo(dtype).max + 1:
        raise SystemExit(f"--dtype {dtype} cannot hold vocab_size={tok.vocab_size}: use --dtype uint32")
    tmp = args.out + ".tmp"
    files = expand_inputs(args.inputs, exclude=(args.out, tmp, sidecar_path(args.out)))
    if not files:
        raise SystemExit("no input files left (the output file itself is skipped): give other inputs")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    num_tokens = 0
    # Written to a temporary name and renamed, so an interrupted run leaves no half file behind.
    with open(tmp, "wb") as f:
        for i, path in enumerate(files):
            if i and tok.eod_id is not None:
                np.asarray([tok.eod_id], dtype=dtype).tofile(f)
                num_tokens += 1
            for ids in tok.encode_file(path):
                ids.astype(dtype, copy=False).tofile(f)
                num_tokens += ids.size
    os.replace(tmp, args.out)
    write_sidecar(args.out, dtype, tok.vocab_size, num_tokens, tok.name, eod_id=tok.eod_id, num_files=len(files))
    print(f"wrote {num_tokens} {dtype} tokens (vocab {tok.vocab_size}) from {len(files)} files to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
