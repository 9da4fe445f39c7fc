"""train.py end to end: a real run whose loss falls, Ctrl-C and NaN stops, a finished run resumed.
Its bad input (one clear line each) is in tests/test_bad_input.py."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import config
import train
from conftest import ROOT, metrics as losses, train_flags
from model import build_model, get_args
from parallel import Dist


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


def test_sequence_length_warmup():
    """train.window: the first --short-seq-frac of the steps (of the plan, under --time-budget) get
    --short-seq-len windows (default: a quarter of --seq-len where 4 divides it), the rest --seq-len ones."""
    a = train.parse_args(["--seq-len", "256", "--short-seq-frac", "0.75"])
    assert a.short_seq_len == 64 and train.parse_args(["--seq-len", "32"]).short_seq_len == 8
    assert train.parse_args(["--seq-len", "30"]).short_seq_len == 30  # 4 does not divide it: no short windows
    assert [train.window(s, 100, a) for s in (0, 74, 75, 99)] == [64, 64, 256, 256]
    assert [train.window(s, 40, a) for s in (29, 30)] == [64, 256]  # a shorter plan switches sooner
    a.short_seq_len = 128
    assert train.window(0, 100, a) == 128
    a.short_seq_frac = 0.0
    assert train.window(0, 100, a) == 256


def test_help_states_every_default(capsys):
    """--help gives each flag's default, flags without a help text too (argparse alone prints nothing
    for them), and never "(default: None)": a None default's help says what leaving it out does."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--max-steps MAX_STEPS (default: 450)" in out and "--out-dir OUT_DIR (default: out)" in out
    assert "--seq-len SEQ_LEN tokens per window (and per eval window) (default: 256)" in out
    assert "--lr LR peak lr (default: per optimizer) --weight-decay" in out
    assert "default: None" not in out


def test_cli_run_loss_falls(corpus_dir, cache_dir, tmp_path):
    r = run_cli(*train_flags(corpus_dir, cache_dir, tmp_path, "--max-steps", "40", "--eval-every", "20",
                             "--lr", "1e-2"))
    assert r.returncode == 0, r.stderr
    assert "step    40/40" in r.stdout and "tok/s" in r.stdout and "ETA" in r.stdout
    assert "gzip -9" in r.stdout and "bpb" in r.stdout
    assert "\noptimizer: MuonClip lr 1e-2, tau 100, wd 0.1\n" in r.stdout  # the startup line
    m = losses(tmp_path)
    first = sum(m[s]["loss"] for s in range(1, 6)) / 5
    last = sum(m[s]["loss"] for s in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)
    assert m[40]["val_loss"] < m[20]["val_loss"] + 0.05 and "val_bpb" in m[40]
    for f in ("model.safetensors", "config.json", "tokenizer.json", "train_state.json", "train_state"):
        assert os.path.exists(tmp_path / f)
    assert json.load(open(tmp_path / "config.json"))["model_args"]["yarn"] is False  # for generate, resume
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
    assert "\noptimizer: AdamW lr 1e12, betas 0.9/0.95, wd 0.1\n" in r.stdout  # the startup line
    state = json.load(open(tmp_path / "train_state.json"))
    assert f"The last good checkpoint (step {state['step']})" in r.stdout  # the step saved last, not the last step
    assert math.isfinite(losses(tmp_path)[state["step"]]["loss"])


# Bad flags and files (one clear line, checked before the corpus is read): tests/test_bad_input.py


def test_training_runs_plain_rope_unless_yarn():
    """The kimi-k2 preset is the released inference config (YaRN on); train.py trains with plain
    RoPE unless --yarn, whatever the preset, as K2 pretrained at 4k."""
    margs = lambda *flags: config.args_from_flags(train.parse_args(["--seq-len", "64", *flags]), 300)
    assert get_args("kimi-k2").yarn and get_args("deepseek-v3").yarn
    assert not margs().yarn and not margs("--preset", "kimi-k2").yarn
    assert margs("--preset", "kimi-k2", "--yarn").yarn and margs("--yarn").yarn


def test_balance_loss_gradient_does_not_depend_on_grad_accum():
    """forward_backward backpropagates each micro-batch's LM loss / grad_accum. The balance loss
    (aux_loss_alpha > 0), which joins the objective inside backward, must be scaled alike: then
    --grad-accum 1 and 2 on the same global batch give the same gradients (fp64)."""
    small = dict(vocab_size=97, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_heads=2,
                 n_routed_experts=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                 v_head_dim=8, max_seq_len=16, aux_loss_alpha=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 97, (4, 16), generator=g), torch.randint(0, 97, (4, 16), generator=g)
    grads = []
    for accum in (1, 2):
        model = build_model(get_args("tiny", **small), seed=0).double()
        args = train.parse_args(["--grad-accum", str(accum), "--batch-size", "4"])
        no_autocast = torch.autocast("cpu", enabled=False)
        train.forward_backward(model, x, y, args, torch.device("cpu"), no_autocast, Dist())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g1 in grads[0].items():
        torch.testing.assert_close(grads[1][n], g1, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")


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
