"""Shared fixtures: a small corpus and one tiny trained checkpoint, built once per test session."""
import os
import shutil
import sys
import sysconfig

import pytest

# Triton picks interpreter or GPU when it is first imported; tests run kernels on the CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A model small enough that a training step takes milliseconds on a CPU.
TINY_FLAGS = ["--dim", "32", "--inter-dim", "64", "--moe-inter-dim", "16", "--n-layers", "2",
              "--n-heads", "2", "--n-routed-experts", "4", "--kv-lora-rank", "16",
              "--qk-nope-head-dim", "8", "--qk-rope-head-dim", "8", "--v-head-dim", "8",
              "--max-seq-len", "64", "--seq-len", "32", "--batch-size", "8", "--vocab-size", "300",
              "--eval-batches", "2", "--no-compile"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and when another process shares the two
    cores, OpenMP's spin-waiting makes tiny matmuls orders of magnitude slower."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """~250 KB of real Python: a few stdlib modules copied into a folder."""
    d = tmp_path_factory.mktemp("corpus")
    lib = sysconfig.get_paths()["stdlib"]
    for name in ["argparse.py", "textwrap.py", "heapq.py", "bisect.py", "glob.py", "shlex.py",
                 "fractions.py", "dataclasses.py"]:
        shutil.copy(os.path.join(lib, name), d / name)
    return str(d)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


# the fault batteries (tests/faults.py) fork the process at each fault point
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the fault battery forks processes")


def metrics(out_dir):
    """metrics.jsonl of a run: {step: record}."""
    import json
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def train_flags(corpus_dir, cache_dir, out_dir, *extra):
    return ["--data", corpus_dir, "--cache-dir", cache_dir, "--out-dir", str(out_dir), *TINY_FLAGS, *extra]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, corpus_dir, cache_dir):
    """out/ of a short real training run (weights, config, tokenizer), for generate/keepkv tests."""
    import train
    out = tmp_path_factory.mktemp("ckpt")
    train.main(train_flags(corpus_dir, cache_dir, out, "--max-steps", "30", "--eval-every", "30",
                           "--log-every", "10"))
    return str(out)


def pytest_configure(config):
    # DCP without a process group (one process) is intended here; it warns on every call
    config.addinivalue_line("filterwarnings", "ignore:torch.distributed is disabled")
