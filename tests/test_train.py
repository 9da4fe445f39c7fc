"""train.py end to end: a real run whose loss falls, Ctrl-C and NaN stops, clean errors."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest

import train
from conftest import ROOT, metrics as losses, train_flags


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_wsd_schedule():
    m = lambda s: train.lr_multiplier(s, 100, 10, 0.3, 0.1)
    assert [m(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert m(10) == m(50) == m(69) == 1.0                  # constant stage
    assert m(70) == pytest.approx(1.0)                       # cosine decay starts
    assert m(85) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert m(100) == pytest.approx(0.1)


def test_cli_run_loss_falls(corpus_dir, cache_dir, tmp_path):
    r = run_cli(*train_flags(corpus_dir, cache_dir, tmp_path, "--max-steps", "40", "--eval-every", "20",
                             "--lr", "1e-2"))
    assert r.returncode == 0, r.stderr
    assert "step    40/40" in r.stdout and "tok/s" in r.stdout and "ETA" in r.stdout
    assert "gzip -9" in r.stdout and "bpb" in r.stdout
    m = losses(tmp_path)
    first = sum(m[s]["loss"] for s in range(1, 6)) / 5
    last = sum(m[s]["loss"] for s in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)
    assert m[40]["val_loss"] < m[20]["val_loss"] + 0.05 and "val_bpb" in m[40]
    for f in ("model.safetensors", "config.json", "tokenizer.json", "train_state.json", "train_state"):
        assert os.path.exists(tmp_path / f)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_ctrl_c_saves_a_checkpoint(corpus_dir, cache_dir, tmp_path):
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                          *train_flags(corpus_dir, cache_dir, tmp_path, "--max-steps", "100000",
                                       "--optimizer", "adamw", "--save-every", "100000")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("step"):
            break
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and "stopped at step" in out
    step = json.load(open(tmp_path / "train_state.json"))["step"]
    assert step >= 1 and json.load(open(tmp_path / "config.json"))["step"] == step


def test_nan_loss_stops_and_keeps_last_checkpoint(corpus_dir, cache_dir, tmp_path):
    r = run_cli(*train_flags(corpus_dir, cache_dir, tmp_path, "--max-steps", "50", "--optimizer", "adamw",
                             "--lr", "1e12", "--warmup-steps", "1", "--grad-clip", "0", "--save-every", "1"))
    assert r.returncode == 1 and ("loss is nan" in r.stdout or "loss is inf" in r.stdout), r.stdout
    assert "last good checkpoint" in r.stdout
    state = json.load(open(tmp_path / "train_state.json"))
    assert math.isfinite(losses(tmp_path)[state["step"]]["loss"])


@pytest.mark.parametrize("flags, message", [
    (["--preset", "huge"], "unknown preset 'huge'; choose one of tiny, small, kimi-k2, deepseek-v3"),
    (["--data", "/no/such/corpus"], "does not exist"),
    (["--seq-len", "64", "--max-seq-len", "64", "--data", "SHORT"], "needs at least seq_len+1"),
    (["--resume"], "no checkpoint"),
    (["--grad-accum", "3"], "not divisible by --grad-accum"),
    (["--seq-len", "128"], "exceeds the model's max_seq_len"),
    (["--qk-clip-tau", "0"], "--no-qk-clip"),
])
def test_bad_input_gives_a_clear_error(corpus_dir, cache_dir, tmp_path, flags, message):
    if "SHORT" in flags:
        short = tmp_path / "short.txt"
        short.write_text("x = 1\n" * 8)
        flags = [str(short) if f == "SHORT" else f for f in flags]
    r = run_cli(*train_flags(corpus_dir, cache_dir, tmp_path / "out"), *flags, "--max-steps", "1")
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_bad_model_flags_fail_before_the_corpus_is_read(corpus_dir, tmp_path):
    """An unknown preset is reported at once, not after training a tokenizer and encoding the corpus."""
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        train.main(train_flags(corpus_dir, str(cache), tmp_path / "out", "--preset", "nope"))
    assert not cache.exists() or not any(cache.iterdir())


def test_zero_steps_is_refused(corpus_dir, cache_dir, tmp_path):
    with pytest.raises(ValueError, match="--max-steps must be at least 1"):
        train.main(train_flags(corpus_dir, cache_dir, tmp_path, "--max-steps", "0"))


def test_resume_of_a_finished_run_and_a_metrics_line_cut_short(trained_checkpoint, tmp_path,
                                                                corpus_dir, cache_dir):
    """A kill while a metrics line was being written leaves half a line: --resume drops it. A
    checkpoint already at --max-steps has nothing to train: a clear line, nothing changed."""
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, ckpt)
    before = (ckpt / "metrics.jsonl").read_text()
    assert train.main(train_flags(corpus_dir, cache_dir, ckpt, "--resume", "--max-steps", "30")) is None
    assert (ckpt / "metrics.jsonl").read_text() == before
    with open(ckpt / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "lo')
    train.main(train_flags(corpus_dir, cache_dir, ckpt, "--resume", "--max-steps", "31",
                           "--eval-every", "100", "--log-every", "100"))
    steps = sorted(losses(ckpt))
    assert steps[-1] == 31 and (ckpt / "metrics.jsonl").read_text().startswith(before)
