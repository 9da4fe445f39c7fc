"""Tests for data.py: small synthetic corpora and a tiny vocab, so the whole file runs in seconds."""

import contextlib
import gzip
import io
import lzma
import math
import os
import sys
import sysconfig
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import disk  # noqa: E402
from conftest import needs_fork  # noqa: E402

VOCAB = 400


def _write_corpus(root):
    """A few files of code-ish and prose text, plus things the loader must skip."""
    for i in range(12):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        body = "".join(f"def func_{i}_{j}(x, y={j}):\n    return x * {j} + y  # línea {j}\n\n"
                       for j in range(40))
        (sub / f"mod{i}.py").write_text(f'"""Module {i}: naïve café 日本語 🙂."""\n' + body)
    (root / "notes.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 50)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("should be skipped")
    (root / "image.png").write_bytes(b"\x89PNG\x00\x00binary")
    (root / "empty.txt").write_text("")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def ds(corpus, cache):
    return data.load_dataset(str(corpus), cache_dir=cache, vocab_size=VOCAB, verbose=False)


# --- corpus ------------------------------------------------------------------------------------

def test_listing_skips_hidden_binary_and_empty(corpus):
    root, rel = data.list_files(str(corpus))
    assert rel == sorted(rel) and len(rel) == 13
    assert "notes.txt" in rel and "pkg0/mod0.py" in rel
    assert not any(r.startswith(".hidden") or r in ("image.png", "empty.txt") for r in rel)


def test_split_is_deterministic_and_disjoint(corpus):
    _, rel = data.list_files(str(corpus))
    train, val = data.split_files(rel, 0.05)
    assert (train, val) == data.split_files(list(rel), 0.05)
    assert val and train and not set(train) & set(val) and sorted(train + val) == rel
    # even a 2-file corpus gets one file on each side
    assert [len(s) for s in data.split_files(["a.txt", "b.txt"], 0.05)] == [1, 1]


def test_single_file_is_split_by_position(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    (tmp_path / "one.txt").write_text(text)
    root, rel = data.list_files(str(tmp_path / "one.txt"))
    (train,), (val,) = data.read_splits(root, rel, 0.05)
    assert train + val == text and val.startswith("line ") and 0.03 < len(val) / len(text) < 0.07


def test_stdlib_listing_skips_tests_and_site_packages():
    root, rel = data.list_files(None)
    assert root == sysconfig.get_paths()["stdlib"]
    assert len(rel) > 300 and all(r.endswith(".py") for r in rel)
    assert "os.py" in rel and "json/decoder.py" in rel
    for r in rel:
        assert not set(r.split("/")[:-1]) & data.STDLIB_SKIP_DIRS, r
    train, val = data.split_files(rel)
    assert 0.02 < len(val) / len(rel) < 0.1


# --- tokenizer and cache -------------------------------------------------------------------------

def test_tokenizer_round_trip(ds):
    enc = ds.enc
    assert ds.vocab_size == enc.n_vocab <= VOCAB and enc.eot_token == enc.n_vocab - 1
    for text in ["def f(x):\n\treturn x**2  # ok\n", "naïve café 日本語 🙂 Ωmega\r\n",
                 "   indented\n\n\n", "\x00\x01 weird \ufffd bytes", "<|endoftext|> is plain text here"]:
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text
        assert max(ids) < enc.eot_token  # ordinary text never produces the special token


def test_tokens_reproduce_the_val_text(ds):
    assert ds.val.dtype == np.uint16 and len(ds.train) > len(ds.val) > 0
    assert data.token_bytes(ds.enc, ds.val) == ds.val_text_bytes
    assert ds.val_bytes == len(ds.val_text_bytes) == data.eval_bytes(ds.enc, ds.val)


def test_cache_is_reused(corpus, cache, ds, monkeypatch):
    files = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs]
    mtimes = {f: os.path.getmtime(f) for f in files}

    def fail(*args, **kwargs):
        raise AssertionError("cache should have been reused")
    monkeypatch.setattr(data, "train_bpe", fail)
    monkeypatch.setattr(data, "_encode_to_file", fail)
    monkeypatch.setattr(data, "read_splits", fail)  # a warm load does not even read the corpus
    again = data.load_dataset(str(corpus), cache_dir=cache, vocab_size=VOCAB, verbose=False)
    assert np.array_equal(again.train, ds.train) and again.val_text_bytes == ds.val_text_bytes
    assert {f: os.path.getmtime(f) for f in files} == mtimes
    assert not any(".tmp" in f for f in files)  # no leftovers from the atomic writes


def test_unknown_and_uncached_tiktoken_names_fail_fast(corpus, tmp_path, monkeypatch):
    t0 = time.time()
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'nope'.*cl100k_base"):
        data.load_dataset(str(corpus), tokenizer="nope", cache_dir=str(tmp_path), verbose=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache"))
    with pytest.raises(FileNotFoundError, match="'gpt2' is not cached"):
        data.named_encoding("gpt2")
    assert time.time() - t0 < 5


# --- errors --------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass --data PATH"):
        data.load_dataset(str(tmp_path / "nowhere"), cache_dir=str(tmp_path), verbose=False)


def test_empty_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text found"):
        data.load_dataset(str(tmp_path / "data"), cache_dir=str(tmp_path), verbose=False)


def test_too_short_for_one_window():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError, match="only 10 tokens.*seq_len\\+1 = 11.*--seq-len"):
        data.BatchSampler(tokens, batch_size=2, seq_len=10)
    with pytest.raises(ValueError, match="only 10 tokens"):
        data.eval_batches(tokens, 2, 10, 1)
    data.BatchSampler(tokens, batch_size=2, seq_len=9)  # exactly one window is enough


# --- sampler -------------------------------------------------------------------------------------

def test_sampler_shapes_and_shift():
    tokens = np.arange(1000, dtype=np.uint16)  # token i == position i: windows are easy to read
    x, y = data.BatchSampler(tokens, batch_size=4, seq_len=16, seed=1).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one, and each row is a real window
    assert torch.equal(x, x[:, :1] + torch.arange(16))
    last = data.BatchSampler(tokens[:17], batch_size=3, seq_len=16).next_batch()
    assert torch.equal(last[1][:, -1], torch.full((3,), 16))  # the one window reaches the end


def test_sampler_is_deterministic_and_resumable(ds):
    a = data.BatchSampler(ds.train, 8, 16, seed=3)
    run = [a.next_batch() for _ in range(6)]
    b = data.BatchSampler(ds.train, 8, 16, seed=3)
    for _ in range(3):
        b.next_batch()
    state = b.state_dict()
    assert state == {"seed": 3, "position": 3}
    c = data.BatchSampler(ds.train, 8, 16, seed=99)
    c.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(run[3:], [c.next_batch() for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(run[0][0], data.BatchSampler(ds.train, 8, 16, seed=4).next_batch()[0])


def test_ranks_slice_the_same_global_batch(ds):
    x, y = data.BatchSampler(ds.train, 8, 16, seed=5).get_batch(7)
    parts = [data.BatchSampler(ds.train, 8, 16, seed=5, rank=r, world_size=2).get_batch(7)
             for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by world_size 4"):
        data.BatchSampler(ds.train, 6, 16, world_size=4)


def test_short_windows_hold_the_tokens_of_a_step(ds):
    """get_batch(step, T) (train.py's --short-seq-len): T-token windows at starts drawn from (seed,
    step), seq_len / T times the rows, so a step holds the same tokens; ranks slice one global batch."""
    sampler = data.BatchSampler(ds.train, 4, 32, seed=3)
    x, y = sampler.get_batch(5, 8)
    assert x.shape == y.shape == (16, 8)
    tokens = torch.as_tensor(ds.train.astype(np.int64))
    starts = np.random.default_rng([3, 5]).integers(0, len(ds.train) - 8, size=16)
    for row, s in enumerate(starts):
        assert torch.equal(x[row], tokens[s:s + 8]) and torch.equal(y[row], tokens[s + 1:s + 9])
    halves = [data.BatchSampler(ds.train, 4, 32, seed=3, rank=r, world_size=2).get_batch(5, 8) for r in range(2)]
    assert torch.equal(torch.cat([h[1] for h in halves]), y)
    assert torch.equal(sampler.get_batch(5, 32)[0], sampler.get_batch(5)[0])  # the full window by default
    for bad in (12, 64, 0):
        with pytest.raises(ValueError, match="must divide the sampler's seq_len 32"):
            sampler.get_batch(0, bad)


def test_copy_task_rows(ds):
    """copy_task_row: every scored target is predictable by induction: some n back (a segment
    length) both it and the token before it occurred, in that order. About half the row is scored
    (the repeats, less their first tokens). The sampler puts such rows last in the batch for the
    first copy_steps steps only, the same on every rank."""
    x, y = data.copy_task_row(ds.train, 300, np.random.default_rng(0), min_len=5, max_len=40)
    assert x.shape == y.shape == (300,) and x.dtype == y.dtype == torch.int64
    w = x.tolist() + [int(y[-1])]
    scored = [t for t in range(300) if y[t] != data.IGNORE]
    assert 110 < len(scored) < 150
    for t in scored:
        assert int(y[t]) == w[t + 1]
        assert any(w[t + 1 - n] == w[t + 1] and w[t - n] == w[t] for n in range(5, 41) if t - n >= 0)
    sampler = data.BatchSampler(ds.train, 4, 64, seed=2, copy_rows=2, copy_steps=3)
    x0, y0 = sampler.get_batch(0)
    plain = data.BatchSampler(ds.train, 4, 64, seed=2).get_batch(0)
    assert torch.equal(x0[:2], plain[0][:2]) and not torch.equal(x0[2:], plain[0][2:])
    assert (y0[2:] == data.IGNORE).any() and not (y0[:2] == data.IGNORE).any()
    assert torch.equal(sampler.get_batch(3)[0], data.BatchSampler(ds.train, 4, 64, seed=2).get_batch(3)[0])
    halves = [data.BatchSampler(ds.train, 4, 64, seed=2, rank=r, world_size=2, copy_rows=2, copy_steps=3)
              .get_batch(0) for r in range(2)]
    assert torch.equal(torch.cat([h[1] for h in halves]), y0)
    with pytest.raises(ValueError, match="copy_rows"):
        data.BatchSampler(ds.train, 4, 64, copy_rows=5)


def test_eval_batches_tile_the_split(ds):
    seq = 16
    batches = list(data.eval_batches(ds.val, 4, seq, max_batches=10**6))
    ys = torch.cat([y for _, y in batches])
    n = (len(ds.val) - 1) // seq
    assert ys.shape == (n, seq) and all(x.shape == y.shape for x, y in batches)
    assert torch.equal(ys.reshape(-1), torch.from_numpy(ds.val[1:n * seq + 1].astype(np.int64)))
    assert data.window_bytes(ds.enc, [y for _, y in batches]) == data.token_bytes(ds.enc, ys)
    # capped: exactly max_batches full batches, spread over the split, same every call
    few = list(data.eval_batches(ds.val, 2, seq, max_batches=3))
    assert len(few) == 3 and all(x.shape == (2, seq) for x, _ in few)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(few, data.eval_batches(ds.val, 2, seq, 3)))
    spread = np.arange(6) * n // 6  # window indices, evenly spaced over the split
    assert n > 6 and torch.equal(torch.cat([y for _, y in few]), ys[spread])


# --- metrics -------------------------------------------------------------------------------------

def test_bits_per_byte():
    # 100 tokens at 2 nats each = 200 nats = 200/ln2 bits, over 250 bytes
    assert math.isclose(data.bits_per_byte(2.0, 100, 250), 200 / math.log(2) / 250)
    assert math.isclose(data.bits_per_byte(math.log(2), 8, 8), 1.0)
    with pytest.raises(ValueError):
        data.bits_per_byte(1.0, 1, 0)


def test_compression_baselines():
    payload = b"def f(x):\n    return x + 1\n" * 200 + bytes(range(256))
    base = data.compression_baselines(payload)
    assert base["gzip-9"] == len(gzip.compress(payload, 9)) * 8 / len(payload)
    assert base["xz-9"] == len(lzma.compress(payload, preset=9)) * 8 / len(payload)
    assert 0 < base["xz-9"] < 8


# --- crashes and stale caches ---------------------------------------------------------------------

def _load(corpus, cache):
    """load_dataset, and what it printed: whether it trained the tokenizer / encoded the corpus."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ds = data.load_dataset(str(corpus), cache_dir=str(cache), vocab_size=VOCAB)
    return ds, out.getvalue()


def _same(a, b) -> bool:
    return (a.enc.name == b.enc.name and a.enc._mergeable_ranks == b.enc._mergeable_ranks
            and a.enc._special_tokens == b.enc._special_tokens and a.enc._pat_str == b.enc._pat_str
            and np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
            and a.val_text_bytes == b.val_text_bytes and a.train.dtype == b.train.dtype)


@needs_fork
def test_kill_anywhere_in_tokenizer_training_and_cache_build(corpus, tmp_path, tmp_path_factory):
    """SIGKILL a cold load_dataset at every filesystem call, before and after it (tests/faults.py
    data: tokenizer training and saving, then the token cache), each in a forked process with
    its own cache folder. Loading again must train/encode what is missing or reuse what is
    complete, and give exactly the tokenizer and tokens of an uninterrupted build (another
    process's), never read a partial file. Then the cache is complete: a third load rebuilds nothing."""
    import faults
    spec = {"corpus": str(corpus), "root": str(tmp_path), "vocab_size": VOCAB,
            "results": str(tmp_path / "results.json")}
    res = faults.run("data", spec, [])
    ops = " ".join(res["ops"])
    for f in ("bpe.tiktoken", "tokenizer.json", "train.bin", "val.bin", "val.txt", "meta.json"):
        assert f in ops, (f, res["ops"])  # every file of the cache is written by calls it saw
    ref, log = _load(corpus, res["clean"])
    assert log == ""  # the uninterrupted build is complete: reused as it is
    outcomes, counts = {}, {"faults injected": len(res["faults"]), "rebuilt or reused exactly": 0,
                            "refused cleanly": 0, "lost": 0}
    for f in res["faults"]:
        f["tree"] = faults.tree_hash(f["dir"])
    lost = []
    for f in res["faults"]:
        if f["tree"] not in outcomes:
            try:
                ds, _ = _load(corpus, f["dir"])
                again, log = _load(corpus, f["dir"])
                ok = _same(ds, ref) and _same(again, ref) and log == ""
                outcomes[f["tree"]] = "rebuilt or reused exactly" if ok else "lost"
            except Exception as e:  # noqa: BLE001 - any error after a crash is a loss here
                outcomes[f["tree"]] = f"lost: {type(e).__name__}: {e}"
        outcome = outcomes[f["tree"]]
        counts["lost" if outcome.startswith("lost") else outcome] += 1
        if outcome.startswith("lost"):
            lost.append((f["op"], f["when"], outcome))
    counts.update({"calls": len(res["ops"]), "distinct folders reloaded": len(outcomes)})
    faults.report(str(tmp_path_factory.getbasetemp()), "token cache + tokenizer", counts)
    assert not lost, lost[:5]


def test_truncated_or_foreign_token_cache_is_rebuilt(corpus, tmp_path):
    """A token file truncated after the build, or ids made by another tokenizer under the same
    name (the tokenizer folder trained again differently): detected, said, and encoded again."""
    ds, _ = _load(corpus, tmp_path)
    ds.train, ds.val = np.array(ds.train), np.array(ds.val)  # copies: the files are damaged next
    folder = next(p for p in tmp_path.iterdir() if p.name.startswith("tokens-"))
    train_bin = folder / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-2])
    again, log = _load(corpus, tmp_path)
    assert "is stale (train.bin is truncated); encoding again" in log and _same(again, ds)
    # another tokenizer in the tokenizer folder: the ranks of a smaller vocabulary
    tok_dir = next(p for p in tmp_path.iterdir() if p.name.startswith("bpe"))
    other = data.load_dataset(str(corpus), cache_dir=str(tmp_path / "other"), vocab_size=VOCAB - 50,
                              verbose=False).enc
    spec = {"pat_str": other._pat_str, "mergeable_ranks": other._mergeable_ranks,
            "special_tokens": other._special_tokens}
    data.save_tokenizer(str(tok_dir), ds.enc.name, spec)
    foreign, log = _load(corpus, tmp_path)
    assert "is stale (it was made by another tokenizer); encoding again" in log
    assert foreign.vocab_size == other.n_vocab
    assert data.token_bytes(foreign.enc, foreign.val) == foreign.val_text_bytes  # its own ids


@pytest.mark.parametrize("where", ["tokenizer", "tokens", "meta.json"])
def test_full_disk_in_a_cache_build_is_one_line(corpus, tmp_path, ds, monkeypatch, where):
    """ENOSPC while writing the tokenizer, a token file or the cache's marker: one DiskFull that
    names the folder and the bytes needed, no file of the unfinished part left (no token file
    without its meta.json, no temporary file); the next build is exact."""
    real_write, real_encode = data.atomic_write, data._encode_to_file

    def full(path, *args):
        name = os.path.basename(path)
        if {"tokenizer": name == "bpe.tiktoken", "meta.json": name == "meta.json"}.get(where):
            raise OSError(28, os.strerror(28))
        return real_write(path, *args)

    def encode(enc, docs, path, dtype):  # val.bin's temporary file open, train.bin written whole
        if where == "tokens" and path.endswith("val.bin"):
            monkeypatch.setattr(enc, "encode_ordinary_batch", lambda *a: full_disk())
        return real_encode(enc, docs, path, dtype)

    def full_disk():
        raise OSError(28, os.strerror(28))
    monkeypatch.setattr(data, "atomic_write", full)
    monkeypatch.setattr(data, "_encode_to_file", encode)
    with pytest.raises(disk.DiskFull, match=r"No space left on device while (saving the tokenizer|writing the "
                                            r"token cache) in '.*/(bpe|tokens-).*': it needs about [\d,]+ bytes"):
        data.load_dataset(str(corpus), cache_dir=str(tmp_path), vocab_size=VOCAB, verbose=False)
    monkeypatch.undo()
    left = sorted(p.name for d in tmp_path.iterdir() for p in d.iterdir())
    assert left == ([] if where == "tokenizer" else ["bpe.tiktoken", "tokenizer.json"]), left
    assert _same(data.load_dataset(str(corpus), cache_dir=str(tmp_path), vocab_size=VOCAB, verbose=False), ds)


def test_corrupt_tokenizer_is_one_clear_error(corpus, tmp_path):
    _load(corpus, tmp_path)
    tok_dir = next(p for p in tmp_path.iterdir() if p.name.startswith("bpe"))
    ranks = tok_dir / "bpe.tiktoken"
    lines = ranks.read_bytes().splitlines(keepends=True)
    ranks.write_bytes(b"".join(lines[:-3]))  # cut at a line boundary: parses, but is not the same
    with pytest.raises(ValueError, match=r"bpe.tiktoken is missing or corrupt.*fingerprint.*delete"):
        _load(corpus, tmp_path)
    ranks.write_bytes(b"".join(lines[:-3]) + b"not-base64!! 7\n")
    with pytest.raises(ValueError, match=r"bpe.tiktoken is missing or corrupt \(Error: .*delete"):
        _load(corpus, tmp_path)
