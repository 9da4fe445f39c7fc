"""Tests for generate.py: two runs as a subprocess (as a user would), the bad inputs in-process."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import generate  # noqa: E402

CONTEXT = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def ckpt(trained_checkpoint):
    """A real tiny training run's out/ (tests/conftest.py), context 64 tokens."""
    return trained_checkpoint


def run_cli(*argv, stdin=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *argv], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_generate_end_to_end(ckpt):
    r = run_cli("--out", ckpt, "--prompt", "def f_1_2(x):\n    return", "--max-new-tokens", "12",
                "--kv-budget", "0.1", "--seed", "3")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("[generate] decode") and "tok/s" in last
    assert "generated 12" in last and "latent KV cache keepkv (budget 0.1)" in last
    assert "of the full latent cache" in last and "of the full per-head cache" in last


def test_generate_reads_stdin_and_full_policy(ckpt):
    """`--kv-policy full` is the uncompressed latent cache (100% of itself), and greedy decoding
    from it writes the same text as from the full per-head cache."""
    texts = []
    for cache, share in (("latent", "100.0% of the full latent cache"), ("per-head", "of the full per-head cache")):
        r = run_cli("--out", ckpt, "--kv-policy", "full", "--temperature", "0", "--max-new-tokens", "5",
                    "--kv-cache", cache, stdin="def f_0_1(x):")
        assert r.returncode == 0, r.stderr
        last = r.stdout.splitlines()[-1]
        assert re.search(rf"prompt \d+ tokens, generated 5 \| {cache} KV cache full: ", last) and share in last
        texts.append(r.stdout.rsplit("[generate]", 1)[0])
    assert texts[0] == texts[1]


def test_same_seed_same_text(ckpt, capsys):
    argv = ["--out", ckpt, "--prompt", "def", "--max-new-tokens", "10", "--seed", "7", "--kv-policy", "h2o"]
    texts = []
    for _ in range(2):
        generate.main(argv)
        texts.append(capsys.readouterr().out.rsplit("[generate]", 1)[0])
    assert texts[0] == texts[1] and len(texts[0]) > 0


@pytest.mark.parametrize("argv,message", [
    (["--kv-budget", "0"], "--kv-budget must be in (0, 1]"),
    (["--kv-budget", "1.5"], "--kv-budget must be in (0, 1]"),
    (["--kv-policy", "lru"], "invalid choice: 'lru'"),
    (["--kv-alpha", "5"], "--kv-alpha must be in [0, 1)"),
    (["--kv-window", "-3"], "--kv-window must be at least 1"),
])
def test_bad_arguments(ckpt, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        generate.main(["--out", ckpt, "--prompt", "x", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_no_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as e:
        generate.main(["--out", str(tmp_path), "--prompt", "x"])
    assert "run `python train.py` first" in str(e.value.code)


def test_prompt_beyond_context(ckpt):
    with pytest.raises(SystemExit) as e:
        generate.main(["--out", ckpt, "--prompt", "return x + 1\n" * CONTEXT])
    assert "context is 64" in str(e.value.code)


def test_missing_prompt_file(ckpt, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        generate.main(["--out", ckpt, "--prompt-file", str(tmp_path / "nope.py")])
    assert e.value.code == 2 and "--prompt-file" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("garbage", "not a readable safetensors file"),
    ("truncated", "not a readable safetensors file"),
    ("other_config", "does not match"),
    ("bad_json", "not a nanoK2 model config"),
])
def test_corrupt_checkpoint_is_one_clear_line(ckpt, tmp_path, damage, message):
    """A damaged checkpoint ends in one line naming the file, not a traceback; nothing is written."""
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    weights, config = bad / "model.safetensors", bad / "config.json"
    if damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "other_config":
        cfg = json.loads(config.read_text())
        cfg["model_args"]["n_layers"] += 1
        config.write_text(json.dumps(cfg))
    else:
        config.write_text("{not json")
    before = {p.name: p.read_bytes() for p in bad.iterdir() if p.is_file()}
    r = run_cli("--out", str(bad), "--prompt", "x", "--max-new-tokens", "2")
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0                        # one line
    assert {p.name: p.read_bytes() for p in bad.iterdir() if p.is_file()} == before
