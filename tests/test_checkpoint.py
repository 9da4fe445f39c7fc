"""checkpoint.py: weights that load back exactly, a resume with exactly the losses of an
uninterrupted run (also after a crash mid-save), no pickles, and clear refusals."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import train
from checkpoint import load_pretrained, save_pretrained
from conftest import metrics as losses, train_flags
from test_model import small_model


def test_save_load_roundtrip(tmp_path):
    model = small_model(torch.float32)
    model.moe_layers()[0].gate.bias.fill_(0.5)  # buffers travel too
    save_pretrained(model, str(tmp_path))
    loaded = load_pretrained(str(tmp_path))
    x = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="run `python train.py` first"):
        load_pretrained(str(tmp_path / "nothing"))


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
