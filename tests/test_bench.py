"""bench.py and benchmarks/: every subcommand is wired to its module, the paths the benchmarks
re-invoke (bench.py dist-worker, the kernel checks' child process) are valid, and the kernel checks
that `bench.py kernels` prints and saves on a CPU pass. The benchmarks themselves are run by hand.

TRITON_INTERPRET=1 is set before triton or kernels.py is imported, as in tests/test_kernels.py."""
import json
import os
import re

os.environ["TRITON_INTERPRET"] = "1"  # must precede the imports of triton / kernels

import pytest
import torch

import bench
import benchmarks.dist
from benchmarks.common import train_flops_per_token
from model import get_args
from benchmarks.kernel_speed import _kernel_errors_in_child, kernel_errors
from test_kernels import interpreter, needs_triton  # noqa: F401 (interpreter: a fixture)

KERNEL_CHECKS = {"attn_out", "attn_max_logits", "attn_dq", "attn_dk", "attn_dv",
                 "decode_out", "decode_logits", "sym_matmul"}


@pytest.mark.parametrize("name", ["train", "optim", "optim-match", "optim-clip", "quickstart", "kv", "testbed",
                                  "kernels", "dist", "dist-worker", "rl"])
def test_every_benchmark_has_its_subcommand(name, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f" {name} [-h]" in out.split("\n")[0]  # usage: PROG NAME [-h] ...
    # --help states the defaults (config.DefaultsHelpFormatter), never "None", never two of them
    entries = re.split(r"\n  (?=-)", out.split("options:")[-1])[1:]  # each flag's lines
    assert "default: None" not in out and (len(entries) == 1 or "(default: " in out)  # (kernels: only -h)
    for entry in entries:
        assert entry.count("default") <= 1, entry


def test_dist_workers_run_bench_py():  # bench.py dist launches `BENCH_PY dist-worker` per config
    assert os.path.samefile(benchmarks.dist.BENCH_PY, bench.__file__)


@needs_triton
def test_kernel_errors_report():  # what bench_kernels prints and saves on a CPU
    errs = kernel_errors(torch.float32, "small")
    assert set(errs) == KERNEL_CHECKS
    assert all(err < 1e-5 for err in errs.values()), errs


@needs_triton
def test_kernel_errors_in_child():  # bench_kernels on a CPU runs them in a fresh interpreter process
    errs = _kernel_errors_in_child("float32")
    assert set(errs) == KERNEL_CHECKS
    assert all(err < 1e-5 for err in errs.values()), errs


def test_train_speed_setups_side_by_side(tmp_path, monkeypatch, one_thread):
    """bench.py train --setups: one row per (setup, mode) in one run, each with the FLOPs of its own
    shape (train_flops_per_token) over the one matmul rate measured first."""
    monkeypatch.chdir(tmp_path)  # out/bench/ lands here
    bench.main(["train", "--setups", "nano/512/2x16,tiny/512/4x8", "--modes", "eager", "--steps", "1",
                "--warmup", "0"])
    out = json.load(open(tmp_path / "out" / "bench" / "train.json"))
    assert [r["setup"] for r in out["rows"]] == ["nano/512/2x16", "tiny/512/4x8"]
    for r, (preset, seq) in zip(out["rows"], [("nano", 16), ("tiny", 8)]):
        flops = train_flops_per_token(get_args(preset, vocab_size=512), seq)
        assert r["mflop_per_token"] == pytest.approx(flops / 1e6)
        assert r["frac_of_matmul_rate"] == pytest.approx(r["tok_s"] * flops / out["matmul_flops"])
