"""train.py end to end: a real run whose loss falls, bit-identical resume, clean errors."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT, train_flags


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


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
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.mark.parametrize("optimizer", ["adamw", "muonclip"])
def test_resume_is_bit_identical(corpus_dir, cache_dir, tmp_path, optimizer):
    """Stop after step 4 and resume: steps 5-8 have exactly the losses of an uninterrupted run."""
    common = ["--max-steps", "8", "--eval-every", "100", "--optimizer", optimizer, "--grad-accum", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(train_flags(corpus_dir, cache_dir, full, *common))
    train.main(train_flags(corpus_dir, cache_dir, part, *common, "--stop-at", "4"))
    assert json.load(open(part / "train_state.json"))["step"] == 4
    # a crash while saving a later step leaves a half-written staging folder: the step-4
    # checkpoint beside it is untouched, and the next save clears the leftover
    os.makedirs(part / "checkpoint.tmp")
    (part / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half a file")
    train.main(train_flags(corpus_dir, cache_dir, part, *common, "--resume"))
    assert not os.path.exists(part / "checkpoint.tmp")
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 9))
    for s in range(1, 9):
        assert a[s]["loss"] == b[s]["loss"], (s, a[s]["loss"], b[s]["loss"])
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_finishes_a_save_cut_short_while_moving_in(corpus_dir, cache_dir, tmp_path):
    """A crash between moving the first and the last part of a complete staged checkpoint: the
    next --resume finishes the move and continues from the new step, as if nothing happened."""
    common = ["--max-steps", "6", "--eval-every", "100", "--optimizer", "adamw"]
    full, part, later = tmp_path / "full", tmp_path / "part", tmp_path / "later"
    train.main(train_flags(corpus_dir, cache_dir, full, *common))
    train.main(train_flags(corpus_dir, cache_dir, part, *common, "--stop-at", "2"))
    train.main(train_flags(corpus_dir, cache_dir, later, *common, "--stop-at", "4"))
    os.replace(later / "metrics.jsonl", part / "metrics.jsonl")   # logged before the save began
    os.replace(later, part / "checkpoint.tmp")                     # the complete stage of step 4
    os.remove(part / "train_state.json")                           # the commit removed the old marker,
    os.replace(part / "checkpoint.tmp" / "model.safetensors", part / "model.safetensors")  # moved one part
    train.main(train_flags(corpus_dir, cache_dir, part, *common, "--resume"))
    assert not os.path.exists(part / "checkpoint.tmp")
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 7)) and all(a[s]["loss"] == b[s]["loss"] for s in a)


def test_resume_refuses_stray_safetensors_and_the_old_format(trained_checkpoint, tmp_path, corpus_dir, cache_dir):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, ckpt)
    (ckpt / "backup.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    flags = train_flags(corpus_dir, cache_dir, ckpt, "--resume", "--max-steps", "31")
    with pytest.raises(ValueError, match="backup.safetensors"):
        train.main(flags)
    os.remove(ckpt / "backup.safetensors")
    os.remove(ckpt / "train_state.json")
    (ckpt / "train_state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="older single-file format"):
        train.main(flags)


def test_checkpoint_holds_no_pickled_code(trained_checkpoint):
    """Weights and optimizer tensors are safetensors (a JSON header + raw bytes), the rest JSON."""
    from safetensors import safe_open
    files = sorted(os.listdir(os.path.join(trained_checkpoint, "train_state")))
    assert files and all(f.endswith(".safetensors") for f in files), files
    with safe_open(os.path.join(trained_checkpoint, "train_state", files[0]), "pt") as f:
        keys = set(f.keys())
    assert "rng_cpu" in keys and "layers.0.attn.wkv_b.weight.momentum_buffer" in keys
    assert "embed.weight.exp_avg_sq" in keys       # MuonClip's AdamW half
    assert not [f for f in os.listdir(trained_checkpoint) if f.endswith((".pt", ".pkl", ".bin"))]
    cfg = json.load(open(os.path.join(trained_checkpoint, "config.json")))
    assert cfg["model_args"]["dim"] == 32 and cfg["step"] == 30


def test_resume_with_different_config_names_the_field(corpus_dir, cache_dir, trained_checkpoint):
    with pytest.raises(ValueError, match="n_layers=2.*n_layers=3"):
        train.main(train_flags(corpus_dir, cache_dir, trained_checkpoint, "--optimizer", "adamw",
                               "--n-layers", "3", "--resume", "--max-steps", "31"))
    with pytest.raises(ValueError, match="--seq-len 32.*16"):
        train.main(train_flags(corpus_dir, cache_dir, trained_checkpoint, "--optimizer", "adamw",
                               "--seq-len", "16", "--resume", "--max-steps", "31"))


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


def test_zero_steps_is_refused(corpus_dir, cache_dir, tmp_path):
    with pytest.raises(ValueError, match="--max-steps must be at least 1"):
        train.main(train_flags(corpus_dir, cache_dir, tmp_path, "--max-steps", "0"))
