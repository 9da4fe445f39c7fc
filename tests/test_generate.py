"""Tests for generate.py: two runs as a subprocess (as a user would), one in-process. Its bad input
(one clear line each) is in tests/test_bad_input.py."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import generate  # noqa: E402


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


# Bad flags, prompts and checkpoints (one clear line each): tests/test_bad_input.py


def test_help_states_every_default(capsys):
    """--help gives each flag's default (config.DefaultsHelpFormatter, as train.py's)."""
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--max-new-tokens MAX_NEW_TOKENS (default: 100)" in out
    assert "--kv-budget KV_BUDGET fraction of the prompt the cache keeps, in (0, 1] (default: 0.1)" in out
    assert "--kv-policy {keepkv,convex,h2o,snapkv,streaming,full} (default: keepkv)" in out
    assert "default: None" not in out
