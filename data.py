"""
data.py -- where the tokens come from.

A language model only ever sees one long 1-D array of integers. This file turns text files into
two such arrays (train and val) in four steps:

1. Corpus: by default the standard library of the running Python (~730 files, ~12 MB of real code
   that every machine already has). Split into train/val BY FILE, so val measures code the model
   has never seen, not other lines of files it trained on.
2. Tokenizer: a byte-level BPE (rustbpe, trained on the train split only) wrapped as a tiktoken
   Encoding. Byte-level: every string is representable, there is no <unk>.
3. Cache: each split is encoded once into a memory-mapped uint16 file; later runs just map it.
4. Batches and metrics: random windows of seq_len+1 tokens (x = w[:-1], y = w[1:]), fixed eval
   windows, and bits per byte, which unlike loss per token compares across tokenizers and gzip/xz.

Importing this module has no side effects; the work happens in load_dataset().
"""

import base64
import gzip
import hashlib
import json
import lzma
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import tiktoken
import tiktoken.load
import torch

import disk
from disk import atomic_write, removed_on_error

EOT = "<|endoftext|>"
DOC_SEP = "\n\n"  # joins documents in the text; in the token stream the EOT token takes its place
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
DEFAULT_CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")

# How text is cut into "words" before BPE merges run inside each word (merges never cross these
# boundaries). Modelled on GPT-4's split, piece by piece:
SPLIT_PATTERN = "|".join([
    r"'(?i:[sdmt]|ll|ve|re)",         # English contractions: 's 't 'll 've 're ...
    r"[^\r\n\p{L}\p{N}]?+\p{L}+",     # a word, optionally glued to one leading space/_/. ("_name")
    r"\p{N}{1,3}",                    # numbers in chunks of at most 3 digits
    r" ?[^\s\p{L}\p{N}]++[\r\n]*",    # a run of punctuation/operators ("==", "):"), maybe newlines
    r"\s*[\r\n]",                     # newlines, together with trailing spaces before them
    r"\s+(?!\S)",                     # indentation, minus the last space (it joins the next word)
    r"\s+",                           # any other whitespace
])


# ---- 1. Corpus: list files, split them deterministically, read them ---------------------------

def _is_text(path: str) -> bool:
    # Cheap binary sniff: text files essentially never contain NUL bytes; images, zips, .pyc do.
    with open(path, "rb") as f:
        return b"\x00" not in f.read(8192)


def list_files(data_path: str | None = None) -> tuple[str, list[str]]:
    """Return (root, sorted relative paths with '/' separators) of the corpus's text files."""
    if data_path is None:
        root, skip_dirs = sysconfig.get_paths()["stdlib"], STDLIB_SKIP_DIRS
        keep = lambda name: name.endswith(".py")  # noqa: E731
    else:
        root, skip_dirs = os.path.abspath(os.path.expanduser(data_path)), set()
        keep = lambda name: not name.startswith(".")  # noqa: E731
        if not os.path.exists(root):
            raise FileNotFoundError(
                f"data path {data_path!r} does not exist; pass --data PATH to a text file or "
                f"folder, or omit --data for the stdlib corpus")
        if os.path.isfile(root):
            if os.path.getsize(root) == 0 or not _is_text(root):
                raise ValueError(f"{data_path!r} is empty or not a text file (it contains NUL "
                                 f"bytes); pass a UTF-8 text file or a folder of them")
            return os.path.dirname(root), [os.path.basename(root)]
    rel = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip_dirs and not x.startswith(".")]
        for f in files:
            p = os.path.join(d, f)
            if keep(f) and os.path.isfile(p) and os.path.getsize(p) > 0 and _is_text(p):
                rel.append(os.path.relpath(p, root).replace(os.sep, "/"))
    if not rel:
        raise ValueError(f"no text found under {root!r} (empty, hidden and binary files are "
                         f"skipped); point --data at a folder with text files in it")
    return root, sorted(rel)


def _val_score(relpath: str) -> float:
    # A stable pseudo-random number in [0, 1) per file: same on every machine and every run,
    # unlike Python's hash(), which is salted per process.
    return int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:4], "big") / 2**32


def split_files(relpaths: list[str], val_frac: float = 0.05) -> tuple[list[str], list[str]]:
    """Assign each file to train or val by a hash of its path; both sides get >= 1 file."""
    if len(relpaths) < 2:
        raise ValueError("splitting by file needs at least 2 files (one file is split by position)")
    score = {r: _val_score(r) for r in relpaths}
    val = [r for r in relpaths if score[r] < val_frac]
    if not val:  # tiny corpora: force the lowest-scoring file into val ...
        val = [min(relpaths, key=score.get)]
    if len(val) == len(relpaths):  # ... and keep at least one file for training
        val.remove(max(val, key=score.get))
    in_val = set(val)
    return [r for r in relpaths if r not in in_val], val


def _read(root: str, relpath: str) -> str:
    with open(os.path.join(root, relpath), encoding="utf-8", errors="replace") as f:
        return f.read()


def read_splits(root: str, relpaths: list[str], val_frac: float) -> tuple[list[str], list[str]]:
    """Return (train documents, val documents); each document is the text of one file."""
    if len(relpaths) >= 2:
        train, val = split_files(relpaths, val_frac)
        return [_read(root, r) for r in train], [_read(root, r) for r in val]
    # A single file cannot be split by file: the last val_frac of it becomes val, cut at the start
    # of a line when there is one in the second half.
    text = _read(root, relpaths[0])
    if len(text) < 2:
        raise ValueError(f"{relpaths[0]!r} holds too little text to split into train and val")
    cut = min(len(text) - 1, max(1, int(len(text) * (1 - val_frac))))
    line_start = text.rfind("\n", 0, cut) + 1
    if line_start > len(text) // 2:
        cut = line_start
    return [text[:cut]], [text[cut:]]


# ---- 2. Tokenizer: train a byte-level BPE, or use a named tiktoken encoding already cached ------

def train_bpe(docs: list[str], vocab_size: int) -> dict:
    """Train a BPE on `docs`; return the keyword arguments for tiktoken.Encoding (minus name)."""
    import rustbpe  # only needed when training, so imported here

    tok = rustbpe.Tokenizer()
    # vocab_size - 1: 256 byte tokens + merges, leaving the last id for the EOT special token,
    # so n_vocab is exactly vocab_size (a round number is friendlier to the embedding matrix).
    tok.train_from_iterator(iter(docs), vocab_size - 1, pattern=SPLIT_PATTERN)
    ranks = {bytes(t): rank for t, rank in tok.get_mergeable_ranks()}
    # A tiny corpus can run out of pairs to merge before reaching vocab_size; EOT takes the next id.
    return {"pat_str": tok.get_pattern(), "mergeable_ranks": ranks,
            "special_tokens": {EOT: len(ranks)}}


def fingerprint(pat_str: str, mergeable_ranks: dict, special_tokens: dict) -> str:
    """A hash of everything that decides which ids a text becomes: the ranks, the split pattern
    and the special tokens. Two tokenizers with the same fingerprint encode every text alike."""
    ranks = sorted(mergeable_ranks.items(), key=lambda kv: kv[1])
    h = hashlib.sha1(json.dumps([pat_str, sorted(special_tokens.items())]).encode())
    h.update(b"".join(len(t).to_bytes(4, "little") + t + r.to_bytes(4, "little") for t, r in ranks))
    return h.hexdigest()[:16]


def encoding_fingerprint(enc: tiktoken.Encoding) -> str:
    return fingerprint(enc._pat_str, enc._mergeable_ranks, enc._special_tokens)


def save_tokenizer(folder: str, name: str, spec: dict) -> None:
    """Ranks in tiktoken's format ("base64(token) rank" lines) + pattern/specials as JSON.
    tokenizer.json is written last, with the fingerprint of the whole: its presence means the
    ranks beside it are complete, and the fingerprint catches a ranks file changed since."""
    os.makedirs(folder, exist_ok=True)
    ranks = sorted(spec["mergeable_ranks"].items(), key=lambda kv: kv[1])
    lines = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks)
    atomic_write(os.path.join(folder, "bpe.tiktoken"), lines.encode())
    info = {"name": name, "pat_str": spec["pat_str"], "special_tokens": spec["special_tokens"],
            "fingerprint": fingerprint(**spec)}
    atomic_write(os.path.join(folder, "tokenizer.json"), json.dumps(info, indent=1).encode())


def load_tokenizer(folder: str, fix: str | None = None) -> tiktoken.Encoding:
    """The inverse of save_tokenizer. A truncated or garbled file is a ValueError naming it and
    `fix` (default: for data.py's cache, delete the folder to train the tokenizer again)."""
    # Parsed by hand: tiktoken.load.load_tiktoken_bpe would also copy the file into tiktoken's
    # own cache keyed by path, and could then serve a stale copy after the file changed.
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path) as f:
            info = json.load(f)
        spec = {"pat_str": info["pat_str"], "special_tokens": info["special_tokens"],
                "mergeable_ranks": {}}
        path = os.path.join(folder, "bpe.tiktoken")
        with open(path, "rb") as f:
            for line in f:
                token, rank = line.split()
                spec["mergeable_ranks"][base64.b64decode(token, validate=True)] = int(rank)
        fp = fingerprint(**spec)  # (tokenizer.json files written before it was recorded: no check)
        if info.get("fingerprint", fp) != fp:
            raise ValueError(f"its ranks do not match the fingerprint in {folder}/tokenizer.json")
        return tiktoken.Encoding(name=info["name"], **spec)
    except (OSError, ValueError, KeyError, TypeError) as e:  # binascii.Error is a ValueError
        raise ValueError(f"the tokenizer file {path} is missing or corrupt ({type(e).__name__}: "
                         f"{e}); {fix or f'delete {folder} to train the tokenizer again, or restore it'}") from None


def save_encoding(enc: tiktoken.Encoding, folder: str) -> None:
    """Save any Encoding beside a checkpoint so generate.py needs nothing else. A named tiktoken
    encoding is saved by name only (its files live in tiktoken's cache); a trained BPE in full."""
    if enc.name in tiktoken.list_encoding_names():
        os.makedirs(folder, exist_ok=True)
        atomic_write(os.path.join(folder, "tokenizer.json"), json.dumps({"tiktoken_name": enc.name}).encode())
        return
    spec = {"pat_str": enc._pat_str, "mergeable_ranks": enc._mergeable_ranks,
            "special_tokens": enc._special_tokens}
    save_tokenizer(folder, enc.name, spec)


def load_encoding(folder: str) -> tiktoken.Encoding:
    """The inverse of save_encoding. A missing or corrupt file is a ValueError naming it."""
    fix = "restore the tokenizer files saved with the checkpoint's weights (train.py writes them together)"
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path) as f:
            info = json.load(f)
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:  # missing, not JSON, not UTF-8
        raise ValueError(f"the tokenizer file {path} is missing or corrupt ({type(e).__name__}: {e}); "
                         f"{fix}") from None
    if "tiktoken_name" in info:
        return named_encoding(info["tiktoken_name"])
    return load_tokenizer(folder, fix)


class _NotCached(Exception):
    pass


def named_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken.get_encoding(name), but cache-only: it never touches the network, so never hangs."""
    names = tiktoken.list_encoding_names()
    if name not in names:
        raise ValueError(f"unknown tiktoken encoding {name!r}; known: {', '.join(names)} "
                         f"(or omit --tokenizer to train the default BPE)")
    # tiktoken fetches its files through tiktoken.load.read_file only on a cache miss, so swapping
    # that one function for a stub that refuses URLs turns every cache miss into a quick error.
    real_read_file = tiktoken.load.read_file

    def cache_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise _NotCached(blobpath)
        return real_read_file(blobpath)

    tiktoken.load.read_file = cache_only
    try:
        return tiktoken.get_encoding(name)
    except _NotCached:
        raise FileNotFoundError(
            f"tiktoken encoding {name!r} is not cached on this machine and there is no internet "
            f"(nanoK2 never downloads); omit --tokenizer to train the default BPE, or cache it "
            f"once where there is internet: python -c \"import tiktoken; "
            f"tiktoken.get_encoding('{name}')\" (see TIKTOKEN_CACHE_DIR)") from None
    finally:
        tiktoken.load.read_file = real_read_file


# ---- 3. The dataset: tokenise each split once into a memory-mapped file, then reuse it ---------

@dataclass
class Dataset:
    train: np.ndarray        # memmap of token ids, documents separated by EOT
    val: np.ndarray
    enc: tiktoken.Encoding
    vocab_size: int          # enc.n_vocab
    val_bytes: int           # UTF-8 bytes of the whole val text (== len(val_text_bytes))
    val_text_bytes: bytes    # the whole val text; token_bytes(enc, val) reproduces it exactly
    name: str                # human-readable description for logs


def _hash(*parts) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:12]


def _encode_to_file(enc: tiktoken.Encoding, docs: list[str], path: str, dtype) -> int:
    """Encode documents (joined by EOT) straight into a binary file; return the token count."""
    n, tmp = 0, f"{path}.tmp{os.getpid()}"
    with removed_on_error(tmp), open(tmp, "wb") as f:
        for i in range(0, len(docs), 256):  # in chunks: memory stays bounded, threads stay busy
            for j, ids in enumerate(enc.encode_ordinary_batch(docs[i:i + 256])):
                if i + j > 0:
                    ids = [enc.eot_token] + ids  # EOT plays the role of DOC_SEP in the text
                np.asarray(ids, dtype=dtype).tofile(f)
                n += len(ids)
    os.replace(tmp, path)
    return n


def _open_tokens(path: str, dtype: str, n: int) -> np.ndarray:
    # np.memmap cannot map an empty file; the mapping keeps RAM use flat however big the corpus.
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)


def _cached_meta(folder: str, enc_fingerprint: str) -> tuple[dict | None, str | None]:
    """(meta, None) for a complete cache made by this tokenizer, else (None, why it is not).
    meta.json is written last, so its presence means the files next to it are complete; the
    size checks also catch a cache truncated since, and the tokenizer's fingerprint a cache
    whose ids come from another tokenizer (the same name, trained again differently)."""
    if not os.path.exists(os.path.join(folder, "meta.json")):
        return None, None  # never built, or a build cut short: nothing to report
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        if "tokenizer_fingerprint" not in meta:  # written before data.py recorded it
            return None, "it does not record which tokenizer made it"
        if meta["tokenizer_fingerprint"] != enc_fingerprint:
            return None, "it was made by another tokenizer"
        item = np.dtype(meta["dtype"]).itemsize
        for s in ("train", "val"):
            if os.path.getsize(os.path.join(folder, f"{s}.bin")) != meta[s]["n_tokens"] * item:
                return None, f"{s}.bin is truncated"
        if os.path.getsize(os.path.join(folder, "val.txt")) != meta["val"]["n_bytes"]:
            return None, "val.txt is truncated"
        return meta, None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{type(e).__name__}: {e}"


def load_dataset(data_path: str | None = None, tokenizer: str | None = None,
                 cache_dir: str | None = None, vocab_size: int = 8192, val_frac: float = 0.05,
                 verbose: bool = True) -> Dataset:
    """List, split, tokenise (cached) and memory-map a corpus. See the module docstring."""
    if not 0 < val_frac < 1:
        raise ValueError(f"val_frac must be between 0 and 1 (exclusive), got {val_frac}")
    log = print if verbose else (lambda *a, **k: None)
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    root, relpaths = list_files(data_path)
    # The cache key covers everything the tokens depend on: which files, how big, how split.
    sizes = [os.path.getsize(os.path.join(root, r)) for r in relpaths]
    corpus_key = _hash(root, val_frac, *relpaths, *sizes)
    docs = None  # read lazily: a warm cache never reads the corpus text at all

    def splits() -> tuple[list[str], list[str]]:
        nonlocal docs
        docs = docs or read_splits(root, relpaths, val_frac)
        return docs

    if tokenizer is None:
        if not 257 <= vocab_size <= 2**20:
            raise ValueError(f"vocab_size must be between 257 (256 bytes + EOT) and 2**20, "
                             f"got {vocab_size}")
        tok_id = f"bpe{vocab_size}-{_hash(corpus_key, vocab_size, SPLIT_PATTERN)}"
        tok_dir = os.path.join(cache_dir, tok_id)
        if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            enc = load_tokenizer(tok_dir)
        else:
            train_docs = splits()[0]
            mb = sum(map(len, train_docs)) / 1e6
            log(f"data: training BPE tokenizer (vocab {vocab_size}) on {mb:.1f}M chars of train "
                f"text...", end="", flush=True)
            t0 = time.time()
            spec = train_bpe(train_docs, vocab_size)
            with disk.full_is_one_line(tok_dir, lambda: 2 * sum(len(t) + 8 for t in spec["mergeable_ranks"]),
                                       "saving the tokenizer"):
                save_tokenizer(tok_dir, tok_id, spec)
            enc = tiktoken.Encoding(name=tok_id, **spec)
            log(f" done in {time.time() - t0:.1f}s")
    else:
        enc, tok_id = named_encoding(tokenizer), tokenizer

    folder = os.path.join(cache_dir, f"tokens-{corpus_key}-{tok_id}")
    enc_fingerprint = encoding_fingerprint(enc)
    meta, stale = _cached_meta(folder, enc_fingerprint)
    if meta is None:
        if stale:
            log(f"data: the token cache {folder} is stale ({stale}); encoding again")
        train_docs, val_docs = splits()
        log(f"data: encoding {len(train_docs)} train / {len(val_docs)} val documents with "
            f"{tok_id}...", end="", flush=True)
        t0 = time.time()
        with disk.full_is_one_line(folder, lambda: _cache_bytes(enc, splits()), "writing the token cache"), \
                removed_on_error(*(os.path.join(folder, f) for f in ("train.bin", "val.bin", "val.txt"))):
            meta = _encode_splits(enc, folder, splits(), {
                "tokenizer": tok_id, "tokenizer_fingerprint": enc_fingerprint, "vocab_size": enc.n_vocab,
                "source": root if data_path is not None else "stdlib"})
        log(f" done in {time.time() - t0:.1f}s")

    tr, va = meta["train"], meta["val"]
    with open(os.path.join(folder, "val.txt"), "rb") as f:
        val_text = f.read()
    source = data_path or f"python{sys.version_info[0]}.{sys.version_info[1]} stdlib"
    name = (f"{source}: {tr['n_docs']}/{va['n_docs']} train/val docs, {tr['n_bytes'] / 1e6:.2f}/"
            f"{va['n_bytes'] / 1e6:.2f} MB, {tr['n_tokens']:,}/{va['n_tokens']:,} tokens, "
            f"tokenizer {tok_id} (vocab {enc.n_vocab})")
    return Dataset(train=_open_tokens(os.path.join(folder, "train.bin"), meta["dtype"], tr["n_tokens"]),
                   val=_open_tokens(os.path.join(folder, "val.bin"), meta["dtype"], va["n_tokens"]),
                   enc=enc, vocab_size=enc.n_vocab, val_bytes=va["n_bytes"],
                   val_text_bytes=val_text, name=name)


def _encode_splits(enc, folder: str, splits: tuple[list[str], list[str]], meta: dict) -> dict:
    """Write the token cache: train.bin, val.bin, val.txt, then meta.json (its marker)."""
    os.makedirs(folder, exist_ok=True)
    # meta.json vouches for the files beside it: it goes before any of them is replaced, so
    # a rebuild cut short can never leave an old meta.json beside some new files
    if os.path.exists(os.path.join(folder, "meta.json")):
        os.remove(os.path.join(folder, "meta.json"))
    meta["dtype"] = dtype = "uint16" if enc.n_vocab <= 2**16 else "uint32"  # half the disk/RAM when it fits
    for split, split_docs in zip(("train", "val"), splits):
        n_tok = _encode_to_file(enc, split_docs, os.path.join(folder, f"{split}.bin"), dtype)
        n_bytes = len(DOC_SEP) * (len(split_docs) - 1) + sum(len(d.encode()) for d in split_docs)
        meta[split] = {"n_tokens": n_tok, "n_bytes": n_bytes, "n_docs": len(split_docs)}
    atomic_write(os.path.join(folder, "val.txt"), DOC_SEP.join(splits[1]).encode())
    atomic_write(os.path.join(folder, "meta.json"), json.dumps(meta, indent=1).encode())
    return meta


def _cache_bytes(enc, splits) -> int:
    """At most what _encode_splits writes: a token per byte and an EOT per document, and val.txt."""
    item = 2 if enc.n_vocab <= 2**16 else 4
    return sum(item * (len(d.encode()) + 1) for docs in splits for d in docs) + sum(map(len, splits[1])) * 4


# ---- 4. Batches: random training windows, fixed evaluation windows ----------------------------

def _check_length(tokens, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"this split has only {len(tokens)} tokens, but one window needs at "
                         f"least seq_len+1 = {seq_len + 1}; use a smaller --seq-len or more data")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int):
    # One fancy-indexing gather reads all rows at once; int64 because that is what embedding
    # lookups and cross_entropy targets expect.
    w = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(w[:, 1:].copy())


IGNORE = -100  # a target cross_entropy skips (its default ignore_index)


def copy_task_row(tokens: np.ndarray, seq_len: int, rng, min_len: int = 16, max_len: int = 96):
    """One synthetic row (x, y) that only context can predict: segments s drawn as runs of
    single tokens sampled from `tokens` (so they follow the corpus's unigram distribution, with no
    n-gram structure), each written twice, s s, back to back until seq_len+1 tokens. The targets
    of a first copy (unpredictable) and of the first token of a repeat (which segment comes next is
    not knowable) are IGNORE; the rest of each repeat is predictable from exactly len(s) tokens
    back. This is the task that makes induction heads form (copy what followed the last occurrence
    of the current token), a few hundred steps into training instead of the billions of natural
    tokens it takes otherwise."""
    max_len = max(2, min(max_len, (seq_len + 1) // 2))   # the first pair always fits: some target scored
    min_len = min(min_len, max_len)
    w, target_ok = [], []
    while sum(map(len, w)) < seq_len + 1:
        n = int(rng.integers(min_len, max_len + 1))
        seg = tokens[rng.integers(0, len(tokens), size=n)].astype(np.int64)
        w += [seg, seg]
        target_ok += [np.zeros(n, bool), np.r_[False, np.ones(n - 1, bool)]]
    w, ok = np.concatenate(w)[:seq_len + 1], np.concatenate(target_ok)[:seq_len + 1]
    y = np.where(ok[1:], w[1:], IGNORE)   # the target at i is token i+1: predictable iff in a repeat
    return torch.from_numpy(w[:-1].copy()), torch.from_numpy(y)


class BatchSampler:
    """Random windows of seq_len+1 tokens, deterministic from (seed, step); resumable.

    Batch i is a pure function of (seed, i): no hidden RNG state drifts along, so resuming from
    position i reproduces an uninterrupted run exactly. batch_size is the GLOBAL batch: every rank
    draws the same global batch and keeps its own slice of rows, so what the model sees does not
    depend on how many ranks there are.

    copy_rows, copy_steps: for the first copy_steps steps, the last copy_rows rows of each batch
    are copy_task_row's synthetic rows instead of windows (a long-context testbed uses this to
    form induction heads within a CPU budget; off by default).
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, copy_rows: int = 0, copy_steps: int = 0):
        _check_length(tokens, seq_len)
        if not 0 <= copy_rows <= batch_size or copy_steps < 0:
            raise ValueError(f"need 0 <= copy_rows <= batch_size ({batch_size}) and copy_steps >= 0, "
                             f"got {copy_rows} and {copy_steps}")
        self.copy_rows, self.copy_steps = copy_rows, copy_steps
        if batch_size < 1 or seed < 0:
            raise ValueError(f"need batch_size >= 1 and seed >= 0, got {batch_size} and {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world_size "
                             f"{world_size}; choose a batch size that is a multiple of the "
                             f"number of ranks")
        self.tokens, self.batch_size, self.seq_len = np.asarray(tokens), batch_size, seq_len
        self.seed, self.rank, self.world_size, self.position = seed, rank, world_size, 0

    def get_batch(self, step: int, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) for this rank at `step`; y is x shifted left by one token.

        seq_len: this step's window, a divisor of the sampler's (default: the sampler's). Shorter
        windows come as proportionally more rows, so that every step holds batch_size * seq_len
        tokens (train.py's --short-seq-len)."""
        T = self.seq_len if seq_len is None else seq_len
        if not 1 <= T <= self.seq_len or self.seq_len % T:
            raise ValueError(f"a step's window must divide the sampler's seq_len {self.seq_len}, got {T}")
        n_rows = self.batch_size * (self.seq_len // T)
        rng = np.random.default_rng([self.seed, step])  # seeded by the pair, not a running stream
        n_starts = len(self.tokens) - T  # last valid start leaves room for T+1
        starts = rng.integers(0, n_starts, size=n_rows)
        per_rank = n_rows // self.world_size
        rows = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        x, y = _windows(self.tokens, starts[rows.start:rows.stop], T)
        n_copy = self.copy_rows if step < self.copy_steps else 0
        for i, row in enumerate(rows):
            if row >= n_rows - n_copy:  # its own stream, so every rank draws the same row
                x[i], y[i] = copy_task_row(self.tokens, T, np.random.default_rng([self.seed, step, row]))
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.get_batch(self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, d: dict) -> None:
        self.seed, self.position = int(d["seed"]), int(d["position"])


def eval_batches(tokens, batch_size: int, seq_len: int,
                 max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation windows, the same every call.

    Windows start every seq_len tokens (they share one boundary token), so their targets y tile
    the split: every token after the first is predicted exactly once, with no overlap. If the
    split holds more than max_batches * batch_size windows, that many are spread evenly over it
    instead of all coming from its start. The last batch may be short.
    """
    _check_length(tokens, seq_len)  # checked now, not at the first next() of a generator
    if batch_size < 1 or max_batches < 1:
        raise ValueError(f"need batch_size, max_batches >= 1, got {batch_size}, {max_batches}")
    tokens = np.asarray(tokens)
    n_avail, want = (len(tokens) - 1) // seq_len, max_batches * batch_size
    index = np.arange(n_avail) if n_avail <= want else np.arange(want) * n_avail // want
    starts = index * seq_len

    def generate():
        for i in range(0, len(starts), batch_size):
            yield _windows(tokens, starts[i:i + batch_size], seq_len)
    return generate()


# ---- Metrics: bits per byte, and what gzip/xz achieve on the very same bytes -------------------

def token_bytes(enc: tiktoken.Encoding, tokens) -> bytes:
    """The exact text bytes that `tokens` (any shape, read row by row) stand for.

    EOT is mapped back to DOC_SEP, so token_bytes(enc, dataset.val) == dataset.val_text_bytes.
    """
    ids = np.asarray(tokens).reshape(-1)
    cuts = np.flatnonzero(ids == enc.eot_token)
    pieces = np.split(ids, cuts)  # every piece after the first starts with an EOT
    return DOC_SEP.encode().join(
        enc.decode_bytes(p[1:].tolist() if k else p.tolist()) for k, p in enumerate(pieces))


def eval_bytes(enc: tiktoken.Encoding, tokens) -> int:
    """How many text bytes `tokens` cover: the denominator of bits per byte."""
    return len(token_bytes(enc, tokens))


def window_bytes(enc: tiktoken.Encoding, y_batches: Iterable) -> bytes:
    """The bytes behind the TARGETS of the evaluated batches, in order.

    Pass the y tensors you computed the loss on (eval_batches' y): those are exactly the tokens
    the model was scored on. Feed the result to compression_baselines so that gzip/xz compress
    exactly the bytes the model's bpb counts, and take eval_bytes/len() of it for bits_per_byte.
    """
    return b"".join(token_bytes(enc, y) for y in y_batches)


def bits_per_byte(mean_loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Mean cross-entropy (nats/token) -> bits/byte: total nats / ln 2 / bytes."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    return mean_loss_nats * n_tokens / (math.log(2) * n_bytes)


def compression_baselines(data: bytes) -> dict:
    """Bits per byte that gzip -9 and xz -9 need for `data`: 8 * len(compressed) / len(data).

    Give them the same bytes the model's bpb is computed on (window_bytes of the evaluated
    targets), otherwise the comparison is apples to oranges. Container headers are included; on
    hundreds of KB of text they cost well under 0.01 bpb.
    """
    if not data:
        raise ValueError("compression_baselines needs non-empty data")
    return {"gzip-9": 8 * len(gzip.compress(data, compresslevel=9)) / len(data),
            "xz-9": 8 * len(lzma.compress(data, preset=9)) / len(data)}
