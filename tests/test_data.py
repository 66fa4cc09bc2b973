"""Data package: corpus determinism and split, stateless batches, memmap round trip and errors."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from moepipe.config import ConfigError, DataConfig
from moepipe.data import TokenCorpus, build_corpus, slice_for_rank, train_batch, val_batches
from moepipe.data import make_memmap
from moepipe.data.stdlib_bytes import _load, choose_val_files, list_files, load_stdlib_bytes, stdlib_root


# ----------------------------------------------------------------------------- stdlib_bytes


def test_stdlib_file_list_and_arrays_are_deterministic():
    root = stdlib_root()
    files = list_files(root)
    assert files == list_files(root)
    assert [r for r, _ in files] == sorted(r for r, _ in files)
    assert not any(part in ("test", "tests", "site-packages") for r, _ in files for part in r.split("/"))
    a_train, a_val, _ = load_stdlib_bytes(0.05)
    _load.cache_clear()
    b_train, b_val, _ = load_stdlib_bytes(0.05)
    assert a_train is not b_train
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_val, b_val)


@pytest.mark.parametrize("frac", [0.05, 0.2])
def test_stdlib_split_fraction_and_disjoint(frac):
    train, val, info = load_stdlib_bytes(frac)
    assert abs(val.size / (train.size + val.size) - frac) < 0.01
    assert not set(info["train_paths"]) & set(info["val_paths"])
    assert len(info["train_paths"]) + len(info["val_paths"]) == info["files"]
    assert train.dtype == np.uint8 and not train.flags.writeable


def test_split_ignores_file_order():
    sizes = {f"pkg{i}/m{i}.py": 100 + 37 * i for i in range(200)}
    shuffled = list(sizes.items())
    random.Random(0).shuffle(shuffled)
    assert choose_val_files(sizes, 0.1) == choose_val_files(dict(shuffled), 0.1)


def test_max_bytes_cap():
    train, val, info = load_stdlib_bytes(0.05, max_bytes=50_000)
    assert train.size + val.size == 50_000
    assert val.size > 0 and info["files"] < 50
    corpus = build_corpus(DataConfig(max_bytes=50_000), seq_len=16)
    assert len(corpus.train) + len(corpus.val) == 50_000
    with pytest.raises(ConfigError, match="data.max_bytes"):
        load_stdlib_bytes(0.05, max_bytes=0)


# ----------------------------------------------------------------------------- batches


def _ramp_corpus(n: int = 10_000) -> TokenCorpus:
    ids = np.arange(n, dtype=np.uint32)
    return TokenCorpus("ramp", ids[: n - 1000], ids[n - 1000 :], n)


def test_train_batch_deterministic_and_order_independent():
    c = build_corpus(DataConfig(), seq_len=32)
    forward = [train_batch(c, s, 7, 8, 32) for s in range(5)]
    backward = [train_batch(c, s, 7, 8, 32) for s in reversed(range(5))][::-1]
    for (x1, y1), (x2, y2) in zip(forward, backward):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.dtype == torch.int64 and x1.shape == (8, 32)
    assert not torch.equal(forward[0][0], forward[1][0])
    assert not torch.equal(train_batch(c, 0, 8, 8, 32)[0], forward[0][0])


def test_targets_are_shifted_inputs():
    c = _ramp_corpus()
    x, y = train_batch(c, 3, 0, 16, 64)
    assert torch.equal(y, x + 1)  # on a ramp, consecutive windows are consecutive ids
    assert torch.equal(x, x[:, :1] + torch.arange(64))
    assert int(y.max()) < len(c.train)


def test_val_batches_fixed_and_span_split():
    c = _ramp_corpus()
    a, b = val_batches(c, 4, 8, 50), val_batches(c, 4, 8, 50)
    assert len(a) == 4
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya, xa + 1)
    assert int(a[0][0][0, 0]) == c.val[0] and int(a[-1][1][-1, -1]) == c.val[-1]


def test_slice_for_rank():
    x, y = train_batch(_ramp_corpus(), 0, 0, 8, 16)
    parts = [slice_for_rank((x, y), r, 4) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert parts[1][0].shape == (2, 16)
    with pytest.raises(ValueError):
        slice_for_rank(x, 0, 3)


def test_seq_len_too_long():
    with pytest.raises(ConfigError, match="train.seq_len"):
        train_batch(_ramp_corpus(), 0, 0, 2, 20_000)
    with pytest.raises(ConfigError, match="train.seq_len"):
        build_corpus(DataConfig(max_bytes=10_000), seq_len=5000)


# ----------------------------------------------------------------------------- memmap


@pytest.fixture
def texts(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    contents = [b"hello world\n" * 50, "caf\u00e9 \u2713\n".encode() * 40, b"x = 1\n" * 100]
    for i, c in enumerate(contents):
        (d / f"doc{i}.txt").write_bytes(c)
    return d, contents


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_memmap_round_trip(tmp_path, texts, dtype, monkeypatch):
    monkeypatch.setattr(make_memmap, "CHUNK_BYTES", 7)  # many chunks per file: exercises streaming
    d, contents = texts
    out = tmp_path / "corpus.bin"
    assert make_memmap.main(["--out", str(out), "--dtype", dtype, str(d / "doc0.txt"), str(d / "doc[12].txt")]) == 0
    meta = json.loads((tmp_path / "corpus.bin.json").read_text())
    expect = np.frombuffer(b"".join(contents), dtype=np.uint8)
    assert meta == {**meta, "dtype": dtype, "vocab_size": 256, "num_tokens": expect.size, "tokenizer": "bytes"}
    c = build_corpus(DataConfig(name="memmap", path=str(out), token_dtype=dtype, val_fraction=0.1), seq_len=16)
    assert c.vocab_size == 256 and len(c.val) == int(expect.size * 0.1)
    np.testing.assert_array_equal(np.concatenate([c.train, c.val]), expect)
    x, y = train_batch(c, 0, 0, 4, 16)
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])


def test_make_memmap_directory_input_skips_output(tmp_path, texts):
    d, contents = texts
    out = d / "corpus.bin"  # inside the input directory: must not read itself
    make_memmap.main(["--out", str(out), str(d)])
    make_memmap.main(["--out", str(out), str(d)])
    assert json.loads((d / "corpus.bin.json").read_text())["num_tokens"] == sum(map(len, contents))


def test_make_memmap_without_tokenizers_library(tmp_path, texts, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)
    with pytest.raises(SystemExit, match="pip install tokenizers"):
        make_memmap.main(["--out", str(tmp_path / "t.bin"), "--tokenizer", str(tmp_path / "tok.json"), str(texts[0])])


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(name="memmap", path=str(path), **kw)


def test_memmap_errors(tmp_path, texts):
    d, _ = texts
    out = tmp_path / "c.bin"
    make_memmap.main(["--out", str(out), str(d)])

    with pytest.raises(ConfigError, match=r"data.path=.*missing.bin does not exist"):
        build_corpus(_cfg(tmp_path / "missing.bin"))
    with pytest.raises(ConfigError, match="data.token_dtype=uint32 does not match"):
        build_corpus(_cfg(out, token_dtype="uint32"))
    with pytest.raises(ConfigError, match="data.vocab_size=100 <"):
        build_corpus(_cfg(out, vocab_size=100))

    bare = tmp_path / "bare.bin"  # no sidecar
    bare.write_bytes(out.read_bytes())
    with pytest.raises(ConfigError, match="data.vocab_size=None"):
        build_corpus(_cfg(bare))
    with pytest.raises(ConfigError, match="data.vocab_size=100 but .* token id"):
        build_corpus(_cfg(bare, vocab_size=100))
    assert build_corpus(_cfg(bare, vocab_size=256)).vocab_size == 256

    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00" * 100 + b"\x01")
    with pytest.raises(ConfigError, match=r"data.path=.*not a multiple of 2"):
        build_corpus(_cfg(odd, vocab_size=256))

    short = tmp_path / "short.bin"
    short.write_bytes(np.arange(5, dtype=np.uint16).tobytes())
    with pytest.raises(ConfigError, match=r"data.path=.*too short"):
        build_corpus(_cfg(short, vocab_size=256))

    stale = tmp_path / "stale.bin"
    stale.write_bytes(out.read_bytes()[:-20])
    (tmp_path / "stale.bin.json").write_text((tmp_path / "c.bin.json").read_text())
    with pytest.raises(ConfigError, match=r"data.path=.*sidecar says"):
        build_corpus(_cfg(stale))


def _word_level_tokenizer(path, vocab: dict[str, int]) -> None:
    # `tokenizers` is in the dev extra: a missing library fails here instead of skipping
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))


def test_make_memmap_with_tokenizer_json(tmp_path, texts, monkeypatch):
    monkeypatch.setattr(make_memmap, "CHUNK_BYTES", 10)  # many chunks per file, each ending at a line break
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "hello": 2, "world": 3, "x": 4, "=": 5, "1": 6}
    _word_level_tokenizer(tmp_path / "tok.json", vocab)
    d, _ = texts
    out = tmp_path / "w.bin"
    files = [str(d / "doc0.txt"), str(d / "doc1.txt"), str(d / "doc2.txt")]
    assert make_memmap.main(["--out", str(out), "--tokenizer", str(tmp_path / "tok.json"), *files]) == 0
    meta = json.loads((tmp_path / "w.bin.json").read_text())
    assert meta["vocab_size"] == 7 and meta["eod_id"] == 1 and meta["dtype"] == "uint16" and meta["num_files"] == 3
    assert meta["tokenizer"] == str((tmp_path / "tok.json").resolve())
    ids = np.fromfile(out, dtype=np.uint16)
    # doc1 ("caf\u00e9 \u2713" lines) is all unknown words; the end-of-document id (auto-detected
    # <|endoftext|>) separates the files
    expect = [2, 3] * 50 + [1] + [0, 0] * 40 + [1] + [4, 5, 6] * 100
    np.testing.assert_array_equal(ids, expect)
    assert meta["num_tokens"] == len(expect)
    c = build_corpus(_cfg(out, val_fraction=0.1), seq_len=8)
    assert c.vocab_size == 7
    np.testing.assert_array_equal(np.concatenate([c.train, c.val]), expect)
    x, y = train_batch(c, 0, 0, 2, 8)
    assert int(x.max()) < 7 and torch.equal(x[:, 1:], y[:, :-1])


def test_make_memmap_tokenizer_eod_option(tmp_path, texts):
    vocab = {"[UNK]": 0, "</s>": 1, "<|endoftext|>": 2, "hello": 3, "world": 4}
    _word_level_tokenizer(tmp_path / "tok.json", vocab)
    d, _ = texts
    out = tmp_path / "e.bin"
    (tmp_path / "again.txt").write_bytes((d / "doc0.txt").read_bytes())
    args = ["--out", str(out), "--tokenizer", str(tmp_path / "tok.json"), str(d / "doc0.txt"), str(tmp_path / "again.txt")]
    make_memmap.main(args)  # auto: the first known candidate, <|endoftext|>
    assert json.loads((tmp_path / "e.bin.json").read_text())["eod_id"] == 2
    make_memmap.main(["--eod", "</s>", *args])
    assert json.loads((tmp_path / "e.bin.json").read_text())["eod_id"] == 1
    np.testing.assert_array_equal(np.fromfile(out, dtype=np.uint16), [3, 4] * 50 + [1] + [3, 4] * 50)
    with pytest.raises(SystemExit, match="--eod <eos> is not a token"):
        make_memmap.main(["--eod", "<eos>", *args])
