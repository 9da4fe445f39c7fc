"""checkpoint.py: weights that load back exactly, a resume with exactly the losses of an
uninterrupted run (also after a crash mid-save), no pickles, and clear refusals."""
import contextlib
import io
import json
import os
import re
import shutil
import sysconfig

import pytest
import torch
from safetensors.torch import load_file

import faults as faults_mod
import train
from checkpoint import load_pretrained, save_pretrained
from conftest import needs_fork, TINY_FLAGS, metrics as losses, train_flags
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


@pytest.mark.parametrize("max_seq_len", [16, 32])
def test_a_config_from_before_the_yarn_switch_loads_as_it_ran(tmp_path, max_seq_len):
    """config.json written before ModelArgs.yarn existed: YaRN was on iff max_seq_len >
    original_seq_len, and the model loads that way (the same rotary tables and softmax scale)."""
    model = small_model(torch.float32, max_seq_len=max_seq_len, original_seq_len=16, yarn=max_seq_len > 16)
    save_pretrained(model, str(tmp_path))
    config = json.load(open(tmp_path / "config.json"))
    del config["model_args"]["yarn"]
    json.dump(config, open(tmp_path / "config.json", "w"))
    loaded = load_pretrained(str(tmp_path))
    assert loaded.args == model.args and torch.equal(loaded.rope_cos, model.rope_cos)


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
    (part / "metrics.jsonl.tmp4242").write_bytes(b"")  # data.atomic_write's, cut short (issue 27)
    train.main(train_flags(corpus_dir, cache_dir, part, *common, "--resume", "--stop-at", "4"))
    assert not os.path.exists(part / "checkpoint.tmp") and not os.path.exists(part / "metrics.jsonl.tmp4242")
    train.main(train_flags(corpus_dir, cache_dir, part, *common, "--resume"))
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
    with pytest.raises(ValueError, match="--short-seq-frac 0.75, this run has 0.5"):
        train.main(train_flags(corpus_dir, cache_dir, trained_checkpoint, "--short-seq-frac", "0.5",
                               "--resume", "--max-steps", "31"))


def test_corrupt_or_foreign_checkpoint_files_are_one_clear_error(trained_checkpoint, corpus_dir,
                                                                  cache_dir, tmp_path, capfd):
    """--resume over a damaged checkpoint: one ValueError that names the file and the fix, never
    a traceback from DCP or safetensors (nor one logged on the way). With the file sizes the save
    recorded (new checkpoints) and without them (older ones), where DCP has to find the damage."""
    def shard(d):
        return d / "train_state" / sorted(os.listdir(d / "train_state"))[0]

    def truncate(path):
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])

    def garble(path):  # same size, header bytes overwritten
        b = bytearray(path.read_bytes())
        b[9:40] = b"\xff" * 31
        path.write_bytes(bytes(b))

    def foreign_weights(d):  # another model's weights under the same name
        model = small_model(torch.float32)
        save_pretrained(model, str(tmp_path / "other"))
        os.replace(tmp_path / "other" / "model.safetensors", d / "model.safetensors")

    damages = [
        ("truncated shard", lambda d: truncate(shard(d)), "shard-00001.*(has .* bytes|not a readable)"),
        ("garbled shard", lambda d: garble(shard(d)), "shard-00001.*not a readable safetensors"),
        ("truncated weights", lambda d: truncate(d / "model.safetensors"), "model.safetensors (has|is not)"),
        ("garbled weights", lambda d: garble(d / "model.safetensors"), "model.safetensors is not a readable"),
        ("another model's weights", foreign_weights, "model.safetensors (has|do not fit)"),
        ("truncated config", lambda d: truncate(d / "config.json"), "config.json (has|is not readable JSON)"),
        ("another program's config", lambda d: (d / "config.json").write_text('{"hidden_size": 32}'),
         "config.json (has|is not a checkpoint file)"),
        ("truncated marker", lambda d: truncate(d / "train_state.json"),
         "train_state.json is not readable JSON"),
        ("missing shard", lambda d: os.remove(shard(d)), "(shard-00001.*is missing|holds no .safetensors)"),
        ("extra shard", lambda d: shutil.copy(shard(d), d / "train_state" / "shard-00009-x.safetensors"),
         "shard-00009-x.safetensors"),
    ]
    flags = ["--resume", "--max-steps", "31"]
    for legacy in (False, True):
        for name, damage, message in damages:
            if legacy and name == "extra shard":  # without the record, no shard is known to be extra
                continue
            ckpt = tmp_path / f"{name}{' (legacy)' * legacy}"
            shutil.copytree(trained_checkpoint, ckpt)
            if legacy:  # a marker without the recorded file sizes, as older saves wrote it
                state = json.loads((ckpt / "train_state.json").read_text())
                del state["files"]
                (ckpt / "train_state.json").write_text(json.dumps(state))
            damage(ckpt)
            with pytest.raises(ValueError, match=message) as e:
                train.main(train_flags(corpus_dir, cache_dir, ckpt, *flags))
            assert str(e.value).startswith("--resume: ") and str(ckpt) in str(e.value), (name, e.value)
            assert "restore" in str(e.value) or "move them elsewhere" in str(e.value), e.value
            assert "Traceback" not in capfd.readouterr().err, (name, legacy)


# ----------------------------------------------------------------------------- fault battery
# SIGKILL the training process at every filesystem call of a save, before and after it (see
# tests/faults.py), then --resume: each time it must continue with exactly the losses and
# weights of an uninterrupted run, or refuse with a clear message; a mix of two steps, or a
# refusal although the checkpoint before the save was complete, counts as lost.

BATTERY = ["--max-steps", "3", "--save-every", "1", "--eval-every", "100"]


@pytest.fixture(scope="module")
def battery_corpus(tmp_path_factory):
    """One stdlib file, split by position: its val split is small, so each run's final eval
    over the whole of it (the exact val loss the battery compares) is short."""
    d = tmp_path_factory.mktemp("battery_corpus")
    shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"), d / "argparse.py")
    return str(d / "argparse.py")


def judge(out_dir, ref, save_step, error=None, log=""):
    """The outcome of a --resume in out_dir after a fault in the save of save_step: ("resumed
    exactly", the step it resumed from), ("refused cleanly", message) or ("lost", why)."""
    prior = save_step - 1  # the checkpoint complete before the save began (0: none)
    if error is not None:  # an exception, or the message train.py printed for one
        clear = isinstance(error, (str, ValueError, FileNotFoundError))
        if not (clear and str(error).startswith("--resume: ")):
            return "lost", f"not a clear refusal: {type(error).__name__}: {error}"
        if prior:
            return "lost", f"refused, although the step-{prior} checkpoint was complete: {error}"
        return "refused cleanly", str(error)
    found = re.search(r"resumed from .* at step (\d+)", log)
    step = int(found.group(1)) if found else None
    a, b = losses(ref), losses(out_dir)
    if sorted(b) != sorted(a):
        return "lost", f"steps {sorted(b)} logged, not {sorted(a)}"
    diff = [s for s in a if (a[s]["loss"], a[s].get("val_loss")) != (b[s]["loss"], b[s].get("val_loss"))]
    wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (ref, out_dir))
    if diff or wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        return "lost", f"resumed from step {step} with other losses (steps {diff}) or weights"
    if step not in {prior, save_step} - {0}:
        return "lost", f"resumed from step {step}, not from {prior} or {save_step}"
    return "resumed exactly", step


def tally(name, faults, outcome_of, tmp_path_factory, detail):
    """Counts, a summary line (pytest -s shows it) and fault_battery.json in pytest's base temp."""
    counts = {"faults injected": len(faults), "resumed exactly": 0, "refused cleanly": 0, "lost": 0}
    lost = []
    for f in faults:
        outcome, info = outcome_of(f)
        counts[outcome] += 1
        if outcome == "lost":
            lost.append((f["op"], f["when"], info))
    counts.update(detail)
    faults_mod.report(str(tmp_path_factory.getbasetemp()), name, counts)
    assert not lost, lost[:5]


@needs_fork
def test_kill_anywhere_in_a_save_one_rank(battery_corpus, cache_dir, tmp_path, tmp_path_factory, one_thread):
    """Every point of the first save (step 1: nothing to fall back on) and of the next one
    (step 2: the step-1 checkpoint must survive), each in a forked copy of the training process
    (faults.py train); the process itself then runs on uninterrupted: the reference."""
    ref, root = tmp_path / "ref", tmp_path / "faults"
    os.makedirs(root)
    spec = {"fork_steps": [1, 2], "root": str(root), "results": str(tmp_path / "results.json")}
    res = faults_mod.run("train", spec, train_flags(battery_corpus, cache_dir, ref, *BATTERY))
    assert res["exit"] == 0 and sorted(losses(ref)) == [1, 2, 3]
    checkpoint_files = {"model.safetensors", "config.json", "tokenizer.json", "bpe.tiktoken",
                        "train_state.json", *os.listdir(ref / "train_state")}
    for step in ("1", "2"):  # every file of the checkpoint was written by calls the battery saw
        ops = " ".join(res["ops"][step])
        assert all(f in ops for f in checkpoint_files), (checkpoint_files, res["ops"][step])
    outcomes = {}
    for f in res["faults"]:
        f["tree"] = faults_mod.tree_hash(f["dir"])  # all hashed before any resume changes a folder
    for f in res["faults"]:
        if f["tree"] in outcomes:
            continue
        out, err = io.StringIO(), None
        try:
            with contextlib.redirect_stdout(out):
                train.main(train_flags(battery_corpus, cache_dir, f["dir"], *BATTERY, "--resume"))
        except Exception as e:  # judged: only a clear ValueError/FileNotFoundError is a refusal
            err = e
        outcomes[f["tree"]] = judge(f["dir"], str(ref), f["step"], err, out.getvalue())
    tally("1 rank", res["faults"], lambda f: outcomes[f["tree"]], tmp_path_factory,
          {"calls per save": {s: len(o) for s, o in res["ops"].items()},
           "distinct folders resumed": len(outcomes)})
    first = [outcomes[f["tree"]] for f in res["faults"] if f["step"] == 1]
    assert ("resumed exactly", 1) in first and any(o[0] == "refused cleanly" for o in first)
    second = [outcomes[f["tree"]] for f in res["faults"] if f["step"] == 2]
    assert {o for o in second} == {("resumed exactly", 1), ("resumed exactly", 2)}
    shutil.rmtree(root)  # 136 checkpoints: kept only when the test fails


@needs_fork
def test_kill_in_a_save_two_ranks(battery_corpus, cache_dir, tmp_path, tmp_path_factory):
    """Two ranks (faults.py ranks2: forked as torchrun starts them; the other rank gets SIGTERM
    as torchrun would send it). The save of step 2: every point of rank 1 (it writes its own
    shard only) and every 5th of rank 0's (alternately before and after a call), to keep the
    test short (NANOK2_FAULTS=all: every point of both); each resumed with two ranks and
    compared with the uninterrupted 2-rank run."""
    every = os.environ.get("NANOK2_FAULTS") == "all"
    spec = {"step": 2, "root": str(tmp_path), "results": str(tmp_path / "results.json"),
            "stride": {"0": 1 if every else 5, "1": 1}}
    flags = ["--data", battery_corpus, "--cache-dir", cache_dir, *TINY_FLAGS, *BATTERY]
    res = faults_mod.run("ranks2", spec, flags)
    assert len(res["ops"]["1"]) >= 3 and len(res["ops"]["0"]) > 20, res["ops"]

    def outcome_of(f):
        r = res["resumes"][f["tree"]]
        ok = r["status"]["0"] == 0 and r["status"]["1"] == 0
        err = re.search(r"^error: (--resume: .*)$", r["logs"]["0"], re.M)
        if not ok and not (r["status"]["0"] == 2 and err):
            return "lost", f"resume failed: {r['status']}: {r['logs']['0'][-2000:]}"
        return judge(f["dir"], res["ref"], 2, err and err.group(1), r["logs"]["0"])
    tally("2 ranks", res["faults"], outcome_of, tmp_path_factory,
          {"calls in the save": {r: len(o) for r, o in res["ops"].items()},
           "points tried": {r: sum(f["rank"] == int(r) for f in res["faults"]) for r in "01"},
           "distinct folders resumed": len(res["resumes"])})


@needs_fork
def test_full_disk_at_each_write_of_a_save(battery_corpus, cache_dir, tmp_path, tmp_path_factory, one_thread):
    """ENOSPC at each write of the saves at steps 1 and 2 (faults.py enospc): train.py stops with
    one line that names the folder and the bytes needed; the partial stage and temporary files
    are gone; the step-1 checkpoint (for a fault in the save of step 2) is untouched, and
    metrics.jsonl holds no step after it; then --resume continues exactly from it (or, with no
    checkpoint yet, refuses clearly). Anything else counts as lost."""
    ref = tmp_path / "ref"
    spec = {"steps": [1, 2], "root": str(tmp_path), "results": str(tmp_path / "results.json")}
    res = faults_mod.run("enospc", spec, train_flags(battery_corpus, cache_dir, ref, *BATTERY))
    assert res["ref_exit"] == 0 and sorted(losses(ref)) == [1, 2, 3]

    def outcome_of(f):
        lines, prior = f["stderr"].strip().splitlines(), f["step"] - 1 or None
        said = (f"error: No space left on device while saving the step-{f['step']} checkpoint in "
                f"{f['dir']!r}: it needs about ")
        if f["exit"] != 2 or len(lines) != 1 or not lines[0].startswith(said) or " bytes free there" not in lines[0]:
            return "lost", f"not one clear line (exit {f['exit']}): {f['stderr'][-1500:]}"
        left = [p for p in f["paths"] if p.startswith("checkpoint.tmp") or re.search(r"\.tmp\d*$", p)]
        if left or f["committed"] != prior:
            return "lost", f"left {left}, checkpoint at step {f['committed']} (not {prior})"
        if (f["metrics_steps"] or []) != list(range(1, f["step"])):
            return "lost", f"metrics.jsonl holds steps {f['metrics_steps']}, ahead of the step-{prior} checkpoint"
        err = re.search(r"^error: (.*)$", f["resume_err"], re.M)
        if f["resume_exit"] != (2 if err else 0):
            return "lost", f"--resume ended with {f['resume_exit']}: {f['resume_err'][-1500:]}"
        return judge(f["dir"], str(ref), f["step"], err and err.group(1), f["resume_log"])
    tally("ENOSPC at each write of a save", res["faults"], outcome_of, tmp_path_factory,
          {"writes per save": {s: sum(o.startswith(faults_mod.WRITES) for o in ops) for s, ops in res["ops"].items()}})
    by_step = {s: {outcome_of(f)[0] for f in res["faults"] if f["step"] == s} for s in (1, 2)}
    assert by_step == {1: {"refused cleanly"}, 2: {"resumed exactly"}}, by_step
