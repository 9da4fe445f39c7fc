"""Bad input to every command line (train.py, generate.py, bench.py and its subcommands): one
clear line, no traceback, nothing overwritten.

Each row of CASES is one bad input: the entry point, its flags, and a piece of the line it must
print. Every case must exit non-zero with exactly one line on stderr, starting "error:" and holding
that piece, show no traceback, and leave every file of its output folder (a copy of a real
checkpoint) and of the working directory as it was. A case marked EARLY must also be refused before
any expensive work: tripwires on the corpus read (train.py: data.load_dataset, the tokenizer training
and the token cache), the model load (generate.py) and each benchmark's first real work (bench.py)
fail the case if that work starts first.

The cases run in-process (main(argv) with stderr captured: fast); test_as_a_process runs one per
entry point again as a real process, for the exit status and stderr exactly as a user sees them.
Bad input that is repaired rather than refused (a damaged token cache is encoded again) or that
has a meaning (an empty prompt starts a new document) is checked at the end.
"""
import errno
import hashlib
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

import bench
import checkpoint
import data
import generate
import hf
import train
from conftest import ROOT, train_flags

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

EARLY = True   # refused before any expensive work (the tripwires are armed)
LATE = False   # needs the corpus or the checkpoint to know (e.g. a corrupt file)


# ----------------------------------------------------------------------------- damage to {out}
# {out} is a fresh copy of a real checkpoint (tests/conftest.py: 30 steps, context 64, vocab 300)

def _garble(path):  # the same size, header bytes overwritten: only a reader of the file can tell
    b = bytearray(path.read_bytes())
    b[9:40] = b"\xff" * 31
    path.write_bytes(bytes(b))


def _edit_model_args(out, **changes):  # a nanoK2 config.json edited by hand (None: the field deleted)
    cfg = json.loads((out / "config.json").read_text())
    for k, v in changes.items():
        cfg["model_args"].pop(k) if v is None else cfg["model_args"].__setitem__(k, v)
    (out / "config.json").write_text(json.dumps(cfg))


def _as_hf_folder(out, **changes):  # {out} exported to a Hugging Face folder, its config.json edited
    hf.export(str(out), str(out) + "-hf")
    shutil.rmtree(out)
    os.replace(str(out) + "-hf", out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **changes}))


def _config_a_folder(out):
    os.remove(out / "config.json")
    (out / "config.json").mkdir()
    (out / "config.json" / "x").write_text("{}")


def _other_model_config(out):  # another model's config.json: one layer more
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_args"]["n_layers"] += 1
    (out / "config.json").write_text(json.dumps(cfg))


FOREIGN_PROMPT = "        self.width = width\n        self.initial_indent = initial_indent\n"


def _other_tokenizer(out):  # a BPE of 400 tokens (another run's) beside weights of 300 embeddings
    text = open(os.path.join(os.path.dirname(shutil.__file__), "textwrap.py")).read()
    spec = data.train_bpe([text], 400)
    data.save_tokenizer(str(out), "bpe400-other", spec)
    assert max(data.load_encoding(str(out)).encode_ordinary(FOREIGN_PROMPT)) >= 300  # the case's premise


DAMAGE = {
    "garbage weights": lambda out: (out / "model.safetensors").write_bytes(b"\xff" * 64),
    "truncated weights": lambda out: (out / "model.safetensors").write_bytes(
        (out / "model.safetensors").read_bytes()[:1000]),
    "garbled weights": lambda out: _garble(out / "model.safetensors"),
    "other model's config": _other_model_config,
    "config not JSON": lambda out: (out / "config.json").write_text("{not json"),
    "train_state.json garbage": lambda out: (out / "train_state.json").write_bytes(b"\x00\x01garbage"),
    "no tokenizer.json": lambda out: os.remove(out / "tokenizer.json"),
    "tokenizer.json garbage": lambda out: (out / "tokenizer.json").write_text("{oops"),
    "bpe.tiktoken garbage": lambda out: (out / "bpe.tiktoken").write_bytes(b"not-base64!! 7\n"),
    "other tokenizer": _other_tokenizer,
    "dim a word": lambda out: _edit_model_args(out, dim="one hundred"),
    "n_layers a string": lambda out: _edit_model_args(out, n_layers="4"),
    "dim deleted": lambda out: _edit_model_args(out, dim=None),
    "rope_theta Infinity": lambda out: _edit_model_args(out, rope_theta=float("inf")),
    "config.json a folder": _config_a_folder,
    "HF: kv_lora_rank null": lambda out: _as_hf_folder(out, kv_lora_rank=None),
    "HF: hidden_size -1": lambda out: _as_hf_folder(out, hidden_size=-1),
    "HF: num_hidden_layers '4'": lambda out: _as_hf_folder(out, num_hidden_layers="4"),
    "HF: num_experts_per_tok 9": lambda out: _as_hf_folder(out, num_experts_per_tok=9),
    "HF: n_group 3": lambda out: _as_hf_folder(out, n_group=3),
    "HF: config.json a folder": lambda out: (_as_hf_folder(out), _config_a_folder(out)),
}


# A full disk, injected where the writing happens (the write fails as it would on a full tmpfs)
def _fails(n):
    def fail(*args, **kwargs):
        raise OSError(n, os.strerror(n))
    return fail


def _safetensors_full(*args, **kwargs):  # what safetensors raises on a full disk
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _full_at(name, n):  # data.atomic_write of one file fails
    real = data.atomic_write
    return lambda path, *a: (_fails(n) if os.path.basename(path) == name else real)(path, *a)


FULL_DISK = {  # name: (module, function, replacement)
    "full disk: weights (ENOSPC)": (checkpoint, "save_file", _safetensors_full),
    "full disk: tokenizer (EIO)": (data, "save_encoding", _fails(errno.EIO)),
    "full disk: marker (EDQUOT)": (data, "atomic_write", _full_at("train_state.json", errno.EDQUOT)),
    "full disk: HF shard (ENOSPC)": (hf, "save_file", _safetensors_full),
    "full disk: HF index (ENOSPC)": (json, "dump", _fails(errno.ENOSPC)),
}

# ----------------------------------------------------------------------------- the cases
# (entry point, flags, a piece of the one error line, damage to {out} or None, EARLY/LATE)
# Placeholders: {out} the damaged copy, {ckpt} the intact checkpoint, {tmp} an empty folder,
# {short} an 8-line corpus, {binary} a file that is not text, {corpus} the test corpus.
# train.py's flags follow conftest.train_flags (a tiny model, --out-dir {out}, --max-steps 1);
# generate.py's follow --out {out} --max-new-tokens 2 and, unless they name one, --prompt "def f(x):".

CASES = [
    # --- train.py: flags out of range, unknown names
    ("train.py", "--max-steps 0", "--max-steps must be at least 1, got 0", None, EARLY),
    ("train.py", "--max-steps -5", "--max-steps must be at least 1, got -5", None, EARLY),
    ("train.py", "--max-steps abc", "argument --max-steps: invalid int value: 'abc'", None, EARLY),
    ("train.py", "--batch-size 0", "--batch-size must be at least 1, got 0", None, EARLY),
    ("train.py", "--batch-size -8", "--batch-size must be at least 1, got -8", None, EARLY),
    ("train.py", "--grad-accum 0", "--grad-accum must be at least 1, got 0", None, EARLY),
    ("train.py", "--grad-accum 3", "--batch-size 8 is not divisible by --grad-accum 3", None, EARLY),
    ("train.py", "--lr 0", "--lr must be a positive number, got 0.0", None, EARLY),
    ("train.py", "--lr -0.5", "--lr must be a positive number, got -0.5", None, EARLY),
    ("train.py", "--lr nan", "--lr must be a positive number, got nan", None, EARLY),
    ("train.py", "--weight-decay -0.1", "--weight-decay must be at least 0, got -0.1", None, EARLY),
    ("train.py", "--warmup-steps -1", "--warmup-steps must be at least 0, got -1", None, EARLY),
    ("train.py", "--decay-frac 1.5", "--decay-frac is a fraction: it must be at most 1, got 1.5", None, EARLY),
    ("train.py", "--short-seq-frac 1.5", "--short-seq-frac is a fraction: it must be at most 1, got 1.5", None, EARLY),
    ("train.py", "--short-seq-len 12", "--short-seq-len 12 must divide --seq-len 32, so that short steps hold "
     "the same tokens; pass one that does, or --short-seq-frac 0", None, EARLY),
    ("train.py", "--min-lr-frac -0.1", "--min-lr-frac must be at least 0, got -0.1", None, EARLY),
    ("train.py", "--grad-clip -1", "--grad-clip must be at least 0, got -1.0", None, EARLY),
    ("train.py", "--qk-clip-tau 0", "use --no-qk-clip to turn the clip off", None, EARLY),
    ("train.py", "--seq-len 0", "--seq-len must be at least 1, got 0", None, EARLY),
    ("train.py", "--seq-len 128", "--seq-len 128 exceeds the model's max_seq_len 64; pass --max-seq-len 128",
     None, EARLY),
    ("train.py", "--eval-every 0", "--eval-every must be at least 1, got 0", None, EARLY),
    ("train.py", "--eval-batches 0", "--eval-batches must be at least 1, got 0", None, EARLY),
    ("train.py", "--save-every 0", "--save-every must be at least 1, got 0", None, EARLY),
    ("train.py", "--log-every 0", "--log-every must be at least 1, got 0", None, EARLY),
    ("train.py", "--stop-at 0", "--stop-at must be at least 1, got 0", None, EARLY),
    ("train.py", "--time-budget 0", "--time-budget must be a positive number, got 0.0", None, EARLY),
    ("train.py", "--time-budget inf", "--time-budget must be a positive number, got inf", None, EARLY),
    ("train.py", "--time-budget 60 --resume", "--resume cannot continue a --time-budget run", None, EARLY),
    ("train.py", "--copy-rows 9", "--copy-rows 9 exceeds --batch-size 8", None, EARLY),
    ("train.py", "--seed -1", "--seed must be at least 0, got -1", None, EARLY),
    ("train.py", "--dist-timeout 0", "--dist-timeout must be a positive number of seconds", None, EARLY),
    ("train.py", "--vocab-size 100", "--vocab-size must be between 257 (256 bytes + EOT) and 2**20", None, EARLY),
    ("train.py", "--preset huge", "unknown preset 'huge'; choose one of nano, tiny, small, kimi-k2, deepseek-v3",
     None, EARLY),
    ("train.py", "--optimizer sgd", "argument --optimizer: invalid choice: 'sgd' (choose from", None, EARLY),
    ("train.py", "--device nope", "--device 'nope' is not a device; use auto, cpu, cuda", None, EARLY),
    ("train.py", "--dim 0", "--dim must be at least 1, got 0", None, EARLY),
    ("train.py", "--n-activated-experts 5", "--n-activated-experts 5 exceeds --n-routed-experts 4", None, EARLY),
    ("train.py", "--qk-rope-head-dim 7", "--qk-rope-head-dim must be even", None, EARLY),
    ("train.py", "--no-such-flag", "unrecognized arguments: --no-such-flag (see: python train.py --help)",
     None, EARLY),
    ("train.py", "--seed 1180591620717411303424", "--seed must be at most 18446744073709551615", None, EARLY),
    ("train.py", "--max-steps 9223372036854775808", "--max-steps must be at most 9223372036854775807", None, EARLY),
    ("train.py", "--weight-decay inf", "--weight-decay must be a finite number, got inf", None, EARLY),
    ("train.py", "--grad-clip inf", "--grad-clip must be a finite number, got inf", None, EARLY),
    ("train.py", "--dist-timeout inf", "--dist-timeout must be a positive number of seconds", None, EARLY),
    ("train.py", "--rope-theta inf", "--rope-theta must be a finite number, got inf", None, EARLY),
    ("train.py", "--rope-theta nan", "--rope-theta must be a finite number, got nan", None, EARLY),
    ("train.py", "--rope-theta 1", "--rope-theta must be greater than 1, got 1.0", None, EARLY),
    ("train.py", "--init-std -0.1", "--init-std must be positive, got -0.1", None, EARLY),
    ("train.py", "--n-layers 3000000000", "--n-layers must be at most 2,147,483,647", None, EARLY),
    ("train.py", "--n-dense-layers 3", "--n-dense-layers 3 exceeds --n-layers 2", None, EARLY),
    ("train.py", "--n-expert-groups 3", "--n-routed-experts 4 does not split into --n-expert-groups 3 groups",
     None, EARLY),
    ("train.py", "--n-expert-groups 2 --n-limited-groups 3", "--n-limited-groups 3 exceeds --n-expert-groups 2",
     None, EARLY),
    ("train.py", "--n-expert-groups 2 --n-activated-experts 3", "--n-activated-experts 3 exceeds the 2 experts "
     "of the --n-limited-groups 1 groups", None, EARLY),
    # --- train.py: paths of the wrong kind
    ("train.py", "--out-dir {binary}", "--out-dir '{binary}' is a file, not a folder", None, EARLY),
    ("train.py", "--out-dir {binary}/run", "--out-dir '{binary}/run' lies under '{binary}', which is a file",
     None, EARLY),
    ("train.py", "--cache-dir {binary}", "--cache-dir '{binary}' is a file, not a folder", None, EARLY),
    # --- train.py: missing files, a corpus too short, a damaged checkpoint to resume or start from
    ("train.py", "--out-dir {tmp}/new --resume", "--resume: no checkpoint in", None, EARLY),
    ("train.py", "--init-from {tmp}/none", "no checkpoint there (model.safetensors + config.json)", None, EARLY),
    ("train.py", "--data {tmp}/none", "does not exist; pass --data PATH", None, LATE),
    ("train.py", "--data {short} --seq-len 64 --max-seq-len 64", "needs at least seq_len+1 = 65; use a smaller "
     "--seq-len or more data", None, LATE),
    ("train.py", "--resume --max-steps 31", "model.safetensors has 64 bytes, but the checkpoint saved",
     "garbage weights", LATE),
    ("train.py", "--resume --max-steps 31", "model.safetensors is not a readable safetensors file",
     "garbled weights", LATE),
    ("train.py", "--resume --max-steps 31", "train_state.json is not readable JSON", "train_state.json garbage",
     LATE),
    ("train.py", "--resume --max-steps 31", "config.json has", "other model's config", LATE),
    ("train.py", "--init-from {out} --n-layers 3", "its model differs from this run's (n_layers: 2 there, 3 here)",
     None, LATE),
    # --- train.py: a full disk at a save: the step-30 checkpoint and metrics.jsonl stay as they were
    ("train.py", "--resume --max-steps 31", "No space left on device while saving the step-31 checkpoint in "
     "'{out}': it needs about", "full disk: weights (ENOSPC)", LATE),
    ("train.py", "--resume --max-steps 31", "Input/output error while saving the step-31 checkpoint",
     "full disk: tokenizer (EIO)", LATE),
    ("train.py", "--resume --max-steps 31", "Disk quota exceeded while saving the step-31 checkpoint",
     "full disk: marker (EDQUOT)", LATE),
    # --- generate.py: flags out of range, unknown names
    ("generate.py", "--kv-budget 0", "--kv-budget must be in (0, 1]", None, EARLY),
    ("generate.py", "--kv-budget 1.5", "--kv-budget must be in (0, 1]", None, EARLY),
    ("generate.py", "--kv-budget -1", "--kv-budget must be in (0, 1]", None, EARLY),
    ("generate.py", "--kv-alpha 5", "--kv-alpha must be in [0, 1)", None, EARLY),
    ("generate.py", "--kv-alpha -0.1", "--kv-alpha must be in [0, 1)", None, EARLY),
    ("generate.py", "--kv-window -3", "--kv-window must be at least 1", None, EARLY),
    ("generate.py", "--kv-window 0", "--kv-window must be at least 1", None, EARLY),
    ("generate.py", "--kv-policy lru", "argument --kv-policy: invalid choice: 'lru'", None, EARLY),
    ("generate.py", "--kv-cache paged", "argument --kv-cache: invalid choice: 'paged'", None, EARLY),
    ("generate.py", "--max-new-tokens 0", "--max-new-tokens must be at least 1, got 0", None, EARLY),
    ("generate.py", "--temperature -1", "--temperature must be at least 0, got -1.0", None, EARLY),
    ("generate.py", "--top-k -1", "--top-k must be at least 0, got -1", None, EARLY),
    ("generate.py", "--device nope", "--device 'nope' is not a device", None, EARLY),
    ("generate.py", "--no-such-flag", "unrecognized arguments: --no-such-flag", None, EARLY),
    ("generate.py", "--seed 1180591620717411303424", "--seed must be at most 18446744073709551615", None, EARLY),
    ("generate.py", "--temperature inf", "--temperature must be a finite number, got inf", None, EARLY),
    ("generate.py", "--out {binary}", "--ckpt '{binary}' is a file, not a folder", None, EARLY),
    # --- generate.py: missing and unreadable files, a damaged or mismatched checkpoint, a long prompt
    ("generate.py", "--prompt-file {tmp}/nope.py", "nope.py': no such file; pass an existing file", None, EARLY),
    ("generate.py", "--prompt-file {tmp}", "a folder; pass an existing file", None, EARLY),
    ("generate.py", "--prompt-file {binary}", "is not readable UTF-8 text", None, EARLY),
    ("generate.py", "--out {tmp}/none", "run `python train.py` first", None, LATE),
    ("generate.py", "", "model.safetensors is not a readable safetensors file", "garbage weights", LATE),
    ("generate.py", "", "model.safetensors is not a readable safetensors file", "truncated weights", LATE),
    ("generate.py", "", "does not match", "other model's config", LATE),
    ("generate.py", "", "config.json is not a nanoK2 model config", "config not JSON", LATE),
    ("generate.py", "", "tokenizer.json is missing or corrupt (FileNotFoundError", "no tokenizer.json", LATE),
    ("generate.py", "", "tokenizer.json is missing or corrupt (JSONDecodeError", "tokenizer.json garbage", LATE),
    ("generate.py", "", "bpe.tiktoken is missing or corrupt", "bpe.tiktoken garbage", LATE),
    ("generate.py", f"--prompt {shlex.quote(FOREIGN_PROMPT)}", "comes from another model than its weights",
     "other tokenizer", LATE),
    ("generate.py", "--prompt-file {long}", "tokens but the model's context is 64 (max_seq_len)", None, LATE),
    # --- generate.py: config.json with wrong values (nanoK2's, then a Hugging Face folder's)
    ("generate.py", "", "config.json: model_args.dim must be an integer, got 'one hundred'; correct the file",
     "dim a word", LATE),
    ("generate.py", "", "config.json: model_args.n_layers must be an integer, got '4'", "n_layers a string", LATE),
    ("generate.py", "", "config.json: model_args lacks the field 'dim'", "dim deleted", LATE),
    ("generate.py", "", "config.json: model_args.rope_theta must be a finite number, got inf",
     "rope_theta Infinity", LATE),
    ("generate.py", "", "config.json is a folder, not a file", "config.json a folder", LATE),
    ("generate.py", "", "config.json: kv_lora_rank must be an integer, got None", "HF: kv_lora_rank null", LATE),
    ("generate.py", "", "config.json: hidden_size must be at least 1, got -1", "HF: hidden_size -1", LATE),
    ("generate.py", "", "config.json: num_hidden_layers must be an integer, got '4'",
     "HF: num_hidden_layers '4'", LATE),
    ("generate.py", "", "config.json: num_experts_per_tok 9 exceeds n_routed_experts 4",
     "HF: num_experts_per_tok 9", LATE),
    ("generate.py", "", "config.json: n_routed_experts 4 does not split into n_group 3 groups", "HF: n_group 3",
     LATE),
    ("generate.py", "", "config.json is a folder, not a file", "HF: config.json a folder", LATE),
    # --- hf.py export
    ("hf.py", "", "the following arguments are required: command (see: python hf.py --help)", None, EARLY),
    ("hf.py", "import {out} {tmp}/hf", "argument command: invalid choice: 'import'", None, EARLY),
    ("hf.py", "export {out}", "the following arguments are required: hf_dir (see: python hf.py export --help)",
     None, EARLY),
    ("hf.py", "export {out} {tmp}/hf --bogus", "unrecognized arguments: --bogus", None, EARLY),
    ("hf.py", "export {out} {tmp}/hf --max-shard-gb inf", "--max-shard-gb must be a positive number of GB, at "
     "most 2**33, got inf", None, EARLY),
    ("hf.py", "export {out} {tmp}/hf --max-shard-gb nan", "--max-shard-gb must be a positive number of GB", None,
     EARLY),
    ("hf.py", "export {out} {tmp}/hf --max-shard-gb 0", "--max-shard-gb must be a positive number of GB", None,
     EARLY),
    ("hf.py", "export {out} {binary}", "the folder to write '{binary}' is a file, not a folder", None, EARLY),
    ("hf.py", "export {binary} {tmp}/hf", "the checkpoint folder '{binary}' is a file, not a folder", None, EARLY),
    ("hf.py", "export {out} {cwd}/..", "exists and is not empty; export into a new folder", None, EARLY),
    ("hf.py", "export {out} {tmp}/hf", "config.json: model_args lacks the field 'dim'", "dim deleted", LATE),
    ("hf.py", "export {out} {tmp}/hf", "config.json: model_args.dim must be an integer", "dim a word", LATE),
    ("hf.py", "export {out} {tmp}/hf", "config.json is a folder, not a file", "config.json a folder", LATE),
    ("hf.py", "export {out} {tmp}/hf", "No space left on device while exporting in '{tmp}/hf': it needs about",
     "full disk: HF shard (ENOSPC)", LATE),
    ("hf.py", "export {out} {tmp}/hf --max-shard-gb 0.0001", "No space left on device while exporting",
     "full disk: HF index (ENOSPC)", LATE),
    # --- bench.py: subcommands
    ("bench.py", "", "the following arguments are required: what", None, EARLY),
    ("bench.py", "nope", "argument what: invalid choice: 'nope'", None, EARLY),
    ("bench.py", "kernels --bogus", "unrecognized arguments: --bogus", None, EARLY),
    # bench.py train
    ("bench.py", "train --steps 0", "--steps must be at least 1, got 0", None, EARLY),
    ("bench.py", "train --batch-size 0", "--batch-size must be at least 1, got 0", None, EARLY),
    ("bench.py", "train --preset nope", "unknown preset 'nope'", None, EARLY),
    ("bench.py", "train --modes fast", "--modes 'fast': unknown mode(s) ['fast']", None, EARLY),
    ("bench.py", "train --seq-len 100000", "exceeds the tiny preset's max_seq_len 256", None, EARLY),
    ("bench.py", "train --setups tiny/8192", "--setups item 'tiny/8192' is not PRESET/VOCAB/BATCHxSEQ", None, EARLY),
    ("bench.py", "train --setups nope/8192/8x64", "unknown preset 'nope'", None, EARLY),
    ("bench.py", "train --setups nano/0/8x64", "vocab, batch and seq_len must be at least 1, got 0, 8, 64", None, EARLY),
    # bench.py optim
    ("bench.py", "optim --steps 0", "--steps must be at least 1, got 0", None, EARLY),
    ("bench.py", "optim --muon-lrs 1e-3 -1", "--muon-lrs must be a positive number, got -1.0", None, EARLY),
    ("bench.py", "optim --preset nope", "unknown preset 'nope'", None, EARLY),
    # bench.py optim-match and optim-clip
    ("bench.py", "optim-match --adamw-steps 100 0", "--adamw-steps must be at least 1, got 0", None, EARLY),
    ("bench.py", "optim-match --muon-lrs 1e-3 -1", "--muon-lrs must be a positive number, got -1.0", None, EARLY),
    ("bench.py", "optim-match --seq-len 100000", "exceeds the tiny preset's max_seq_len 256", None, EARLY),
    ("bench.py", "optim-match --train-flags='--lr 1e-3'", "--train-flags may not set --lr", None, EARLY),
    ("bench.py", "optim-match --train-flags='--dim 0'", "--dim must be at least 1, got 0", None, EARLY),
    ("bench.py", "optim-match --train-flags='--dim \"64'", "--train-flags '--dim \"64' is not a shell-quoted",
     None, EARLY),
    ("bench.py", "optim-clip --tau 0", "--tau must be a positive number, got 0.0", None, EARLY),
    ("bench.py", "optim-clip --seeds 0 -1", "--seeds must be at least 0, got -1", None, EARLY),
    ("bench.py", "optim-clip --train-flags=--bogus", "unrecognized arguments: --bogus", None, EARLY),
    # bench.py quickstart
    ("bench.py", "quickstart --budget 0", "--budget must be a positive number, got 0.0", None, EARLY),
    ("bench.py", "quickstart --seeds 0", "--seeds must be at least 1, got 0", None, EARLY),
    ("bench.py", "quickstart --threads 0", "--threads must be at least 1, got 0", None, EARLY),
    ("bench.py", "quickstart --candidates baseline,nope", "--candidates: unknown candidate(s) ['nope']", None, EARLY),
    ("bench.py", "quickstart --candidates lr-5e-3 --train-flags='--lr 1e-3'", "--train-flags sets --lr, which "
     "candidate lr-5e-3 sets too", None, EARLY),
    ("bench.py", "quickstart --train-flags='--seed 3'", "--train-flags may not set --seed", None, EARLY),
    ("bench.py", "quickstart --train-flags='--dim 0'", "candidate baseline (with --train-flags): --dim must be at "
     "least 1, got 0", None, EARLY),
    # bench.py kv
    ("bench.py", "kv --kv-budgets 0", "--kv-budgets: kv budget must be in (0, 1]", None, EARLY),
    ("bench.py", "kv --kv-budgets 2", "--kv-budgets: kv budget must be in (0, 1]", None, EARLY),
    ("bench.py", "kv --kv-budgets -1", "--kv-budgets: kv budget must be in (0, 1]", None, EARLY),
    ("bench.py", "kv --kv-budgets 0.1,abc", "--kv-budgets '0.1,abc' is not a comma-separated list", None, EARLY),
    ("bench.py", "kv --kv-byte-fracs 0", "--kv-byte-fracs: each must be positive", None, EARLY),
    ("bench.py", "kv --kv-policies keepkv,lru", "--kv-policies: unknown KV policy 'lru'", None, EARLY),
    ("bench.py", "kv --kv-perhead-policies lru", "--kv-perhead-policies: unknown KV policy 'lru'", None, EARLY),
    ("bench.py", "kv --kv-alphas 1", "--kv-alphas: alpha must be in [0, 1)", None, EARLY),
    ("bench.py", "kv --kv-obs-windows 0", "--kv-obs-windows: each must be positive", None, EARLY),
    ("bench.py", "kv --kv-windows 0", "--kv-windows must be at least 1, got 0", None, EARLY),
    ("bench.py", "kv --kv-new 0", "--kv-new must be at least 1, got 0", None, EARLY),
    ("bench.py", "kv --kv-prompt 8", "--kv-prompt must be at least 16, got 8", None, EARLY),
    ("bench.py", "kv --kv-prompt 2000", "a 2000-token prompt (--kv-prompt, at least 16) + --kv-new 32 tokens "
     "exceed the testbed's 1024-token context", None, EARLY),
    ("bench.py", "kv --kv-new 1020", "--kv-new 1020 tokens exceed the testbed's 1024-token context", None, EARLY),
    ("bench.py", "kv --kv-skip quality,nope", "--kv-skip 'quality,nope': unknown part(s) ['nope']", None, EARLY),
    ("bench.py", "kv --kv-tp-steps 2", "--kv-tp-steps must be at least 3, got 2", None, EARLY),
    ("bench.py", "kv --kv-tp-mem-mib -1", "--kv-tp-mem-mib must be a positive number", None, EARLY),
    ("bench.py", "kv --kv-val-frac 0", "--kv-val-frac must be between 0 and 1", None, EARLY),
    ("bench.py", "kv --kv-ckpt {tmp}/none", "--kv-ckpt '{tmp}/none': no checkpoint there", None, EARLY),
    ("bench.py", "kv --kv-ckpt {ckpt} --kv-data {tmp}/none", "--kv-data '{tmp}/none' does not exist", None, EARLY),
    ("bench.py", "kv --kv-ckpt {out} --kv-skip throughput,memory", "model.safetensors is not a readable "
     "safetensors file", "garbage weights", LATE),
    ("bench.py", "kv --kv-ckpt {out} --kv-skip throughput,memory", "does not match", "other model's config", LATE),
    ("bench.py", "kv --kv-ckpt {ckpt} --kv-data {corpus} --kv-prompt 100 --kv-skip throughput,memory",
     "must fit the model's 64-token context", None, LATE),
    # bench.py testbed
    ("bench.py", "testbed --tb-steps 0", "--tb-steps must be at least 1, got 0", None, EARLY),
    ("bench.py", "testbed --tb-context 0", "--tb-context must be at least 1, got 0", None, EARLY),
    ("bench.py", "testbed --tb-data {tmp}/none", "--tb-data '{tmp}/none' does not exist", None, EARLY),
    ("bench.py", "testbed --tb-model-flags='--dim 0'", "the testbed's train.py flags (--tb-* and "
     "--tb-model-flags): --dim must be at least 1", None, EARLY),
    # bench.py dist and its worker
    ("bench.py", "dist --steps 0", "--steps must be at least 1, got 0", None, EARLY),
    ("bench.py", "dist --seq-len 0", "--seq-len must be at least 1, got 0", None, EARLY),
    ("bench.py", "dist-worker --json {tmp}/w.json --preset nope", "unknown preset 'nope'", None, EARLY),
    ("bench.py", "dist-worker", "the following arguments are required: --json", None, EARLY),
]
if not torch.cuda.is_available():  # on a CPU, bench.py dist splits each batch over 2 ranks
    CASES.append(("bench.py", "dist --batch-size 3", "--batch-size must be even on a CPU", None, EARLY))


def _case_id(case):
    entry, flags, _, damage, _ = case
    return f"{entry} {flags[:60]}" + (f" [{damage}]" if damage else "")


# ----------------------------------------------------------------------------- running a case

def snapshot(folder) -> dict:
    """{relative path: sha256} of every file (and "folder" for each folder) under folder: equal
    before and after = nothing was written, removed or created there."""
    out = {}
    for d, dirs, files in os.walk(folder):
        out.update({os.path.relpath(os.path.join(d, sub), folder): "folder" for sub in dirs})
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def place(trained_checkpoint, corpus_dir, cache_dir, tmp_path, monkeypatch):
    """The folders and files a case's placeholders name, and a working directory of its own (so
    that a benchmark's out/bench/ would land there, and be seen)."""
    (tmp_path / "tmp").mkdir()
    shutil.copytree(trained_checkpoint, tmp_path / "out")
    (tmp_path / "short.txt").write_text("x = 1\n" * 8)
    (tmp_path / "binary.bin").write_bytes(bytes(range(128, 256)) * 4)
    (tmp_path / "long.py").write_text("return x + 1\n" * 64)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return {"out": str(tmp_path / "out"), "ckpt": trained_checkpoint, "tmp": str(tmp_path / "tmp"),
            "short": str(tmp_path / "short.txt"), "binary": str(tmp_path / "binary.bin"),
            "long": str(tmp_path / "long.py"), "corpus": corpus_dir, "cache": cache_dir,
            "cwd": str(tmp_path / "cwd")}


def argv_for(entry, flags, place) -> list[str]:
    argv = [a.format(**place) for a in shlex.split(flags)]
    if entry == "train.py":
        return train_flags(place["corpus"], place["cache"], place["out"], "--max-steps", "1") + argv
    if entry == "generate.py":
        prompt = [] if {"--prompt", "--prompt-file"} & set(argv) else ["--prompt", "def f(x):"]
        return ["--out", place["out"], *prompt, "--max-new-tokens", "2"] + argv
    return argv


def arm_tripwires(entry, monkeypatch):
    """Expensive work, each replaced by a failure: an EARLY case must be refused before any."""
    import benchmarks.kernel_speed
    import benchmarks.kv
    import benchmarks.testbed
    import benchmarks.train_speed
    import parallel
    from benchmarks import kv_speed

    def wire(obj, name):
        def tripped(*args, **kwargs):
            raise AssertionError(f"{name} started before the bad input was refused")
        monkeypatch.setattr(obj, name, tripped)

    if entry == "train.py":
        wire(data, "load_dataset")                  # the corpus, the tokenizer, the token cache
    elif entry == "generate.py":
        wire(generate, "load_pretrained")
    elif entry == "hf.py":
        wire(hf, "export")
    else:
        wire(train, "main")                         # optim's runs, the testbed's stages
        for module, name in [(benchmarks.train_speed, "build_model"), (benchmarks.train_speed, "matmul_rate"),
                             (benchmarks.kv, "load_pretrained"), (benchmarks.testbed, "build_testbed"),
                             (kv_speed, "throughput"), (kv_speed, "prefill_memory"),
                             (benchmarks.kernel_speed, "bench_kernels"), (subprocess, "run"),
                             (parallel, "setup_distributed")]:
            wire(module, name)


MAINS = {"train.py": lambda argv: train.cli(argv), "generate.py": lambda argv: generate.main(argv),
         "bench.py": lambda argv: bench.main(argv), "hf.py": lambda argv: hf.main(argv)}


def run_in_process(entry, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `python ENTRY argv`, run as a function call."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        MAINS[entry](argv)
    code, err = e.value.code, capsys.readouterr().err
    if isinstance(code, str):  # sys.exit("error: ...") prints the text, and the status is 1
        code, err = 1, err + code + "\n"
    return code, err


def check_one_clear_line(entry, code, err, message):
    # 2: bad flags (argparse's status) and train.py's and bench.py's refusals; 1: generate.py's, hf.py's
    assert code == 2 or entry in ("generate.py", "hf.py") and code == 1, f"exit status {code}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    assert lines[0].startswith("error:"), lines[0]
    assert message in lines[0], f"{message!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input_is_one_clear_line(case, place, capsys, monkeypatch):
    entry, flags, message, damage, early = case
    if damage in DAMAGE:
        DAMAGE[damage](pathlib.Path(place["out"]))
    argv = argv_for(entry, flags, place)
    before = {f: snapshot(place[f]) for f in ("out", "cwd", "tmp")}
    if damage in FULL_DISK:
        monkeypatch.setattr(*FULL_DISK[damage])
    if early:
        arm_tripwires(entry, monkeypatch)
    code, err = run_in_process(entry, argv, capsys)
    monkeypatch.undo()
    check_one_clear_line(entry, code, err, message.format(**place))
    assert {f: snapshot(place[f]) for f in ("out", "cwd", "tmp")} == before, "a file was written"


# ----------------------------------------------------------------------------- as real processes

PROCESS_CASES = [  # one per entry point, each one that printed a traceback before (issue 14)
    ("train.py", "--grad-accum 0", "--grad-accum must be at least 1, got 0", None),
    ("generate.py", "", "model.safetensors is not a readable safetensors file", "garbage weights"),
    ("bench.py", "kv --kv-budgets 0", "--kv-budgets: kv budget must be in (0, 1]", None),
    ("hf.py", "export {out}", "the following arguments are required: hf_dir", None),  # was two lines (issue 27)
]


@pytest.mark.parametrize("case", PROCESS_CASES, ids=lambda c: f"{c[0]} {c[1]}")
def test_as_a_process(case, place):
    entry, flags, message, damage = case
    if damage:
        DAMAGE[damage](pathlib.Path(place["out"]))
    before = {f: snapshot(place[f]) for f in ("out", "cwd")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, entry), *argv_for(entry, flags, place)],
                       cwd=place["cwd"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    check_one_clear_line(entry, r.returncode, r.stderr, message)
    assert {f: snapshot(place[f]) for f in ("out", "cwd")} == before, "a file was written"


# ----------------------------------------------------------------------------- repaired, or meant

def test_empty_prompt_starts_a_document(place, capsys):
    """An empty prompt is not an error: generation starts a new document (the EOT token)."""
    generate.main(["--out", place["ckpt"], "--prompt", "", "--max-new-tokens", "3", "--seed", "1"])
    out, err = capsys.readouterr()
    assert "prompt 1 tokens, generated" in out.splitlines()[-1] and "error" not in err


@pytest.mark.parametrize("damage", ["truncated", "another tokenizer's"])
def test_damaged_token_cache_is_encoded_again(damage, place, tmp_path, capsys):
    """A token cache cut short, or holding another tokenizer's ids: said, rebuilt, and the run goes
    on (tests/test_data.py checks the rebuilt tokens are exact)."""
    cache = tmp_path / "cache"
    shutil.copytree(place["cache"], cache)
    tokens = next(cache.glob(f"tokens-*-{data.load_encoding(place['ckpt']).name}"))  # the run's tokens
    if damage == "truncated":
        (tokens / "train.bin").write_bytes((tokens / "train.bin").read_bytes()[:-2])
        said = "is stale (train.bin is truncated); encoding again"
    else:
        meta = json.loads((tokens / "meta.json").read_text())
        meta["tokenizer_fingerprint"] = "0" * 16
        (tokens / "meta.json").write_text(json.dumps(meta))
        said = "is stale (it was made by another tokenizer); encoding again"
    final = train.cli(train_flags(place["corpus"], str(cache), tmp_path / "run", "--max-steps", "1"))
    assert final["steps"] == 1 and said in capsys.readouterr().out
