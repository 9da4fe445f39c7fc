"""The executor (executor.py). Each escape a program might try (a write to the project's files, a
read of the project's files and of a secret, a TCP connection, a fork, a memory hog, an endless
loop) runs first with no layer, to show that it works, then under each layer alone, to show that
this layer stops it, by the error only that layer gives. A layer this machine's kernel refuses is
skipped, naming it and the reason."""
import os
import socket
import time

import pytest

import executor

PROJECT = os.path.dirname(os.path.abspath(executor.__file__))
# how each layer refuses: the error a program sees when this layer, and no other, stops it
REFUSAL = {"mountns": ("No such file or directory", "Read-only file system"), "landlock": ("Permission denied",),
           "nonroot": ("Permission denied",), "audit": ("sandbox:",), "netns": ("Network is unreachable",),
           "landlock-net": ("Permission denied",), "seccomp": ("Operation not permitted",),
           "rlimits": ("MemoryError", "Resource temporarily unavailable")}


def run(code, layers, **kw):
    """run_python under `layers` alone; skips where this machine lacks one of them."""
    have = executor.available()
    for name in layers:
        if name not in have.layers:
            pytest.skip(f"layer {name} is missing on this machine: {have.missing.get(name, 'not reported')}")
    r = executor.run_python(code, layers=layers, **kw)
    assert r.layers == [n for n in executor.LAYERS if n in layers], r
    return r


def stopped_by(r, layers):
    """The program failed with the refusal of the first of `layers` (the one that stops it)."""
    assert not r.ok and any(s in r.error for s in REFUSAL[layers[0]]), (layers, r)


def ids(cases):
    return ["none" if not c else "+".join(c) for c in cases]


FILES = [(), ("mountns",), ("landlock",), ("nonroot",), ("audit",)]


@pytest.mark.parametrize("layers", FILES, ids=ids(FILES))
def test_write_to_the_project(layers):
    victim = os.path.join(PROJECT, f".executor-victim-{os.getpid()}")
    try:
        r = run(f"open({victim!r}, 'w').write('escaped')", layers)
        if not layers:
            assert r.ok and open(victim).read() == "escaped"  # uncontained, it writes
        else:
            stopped_by(r, layers)
            assert not os.path.exists(victim)
    finally:
        if os.path.exists(victim):
            os.remove(victim)


READS = [(), ("mountns",), ("landlock",), ("audit",)]  # (the project is world-readable: uid 65534 reads it too)


@pytest.mark.parametrize("layers", READS, ids=ids(READS))
def test_read_the_project(layers):
    r = run(f"print(len(open({executor.__file__!r}).read()))", layers)
    if not layers:
        assert r.ok and int(r.output) == len(open(executor.__file__).read())
    else:
        stopped_by(r, layers)


@pytest.mark.parametrize("layers", FILES, ids=ids(FILES))
def test_read_a_secret(tmp_path, layers):
    secret = tmp_path / "secret"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    r = run(f"print(open({str(secret)!r}).read())", layers)
    if not layers:
        assert r.ok and r.output.strip() == "hunter2"
    else:
        stopped_by(r, layers)
        assert "hunter2" not in r.output


NETWORK = [(), ("netns",), ("landlock-net",), ("seccomp",), ("audit",)]


@pytest.mark.parametrize("layers", NETWORK, ids=ids(NETWORK))
def test_connect_to_a_listening_socket(layers):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=1).sendall(b'leak')"
    try:
        r = run(code, layers)
        if not layers:
            assert r.ok and server.accept()[0].recv(4) == b"leak"
        else:
            stopped_by(r, layers)
            with pytest.raises(socket.timeout):
                server.accept()  # nobody ever connected
    finally:
        server.close()


FORK = [(), ("seccomp",), ("audit",), ("rlimits", "nonroot")]  # (RLIMIT_NPROC binds a uid that is not root)


@pytest.mark.parametrize("layers", FORK, ids=ids(FORK))
def test_fork(layers):
    r = run("import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\nprint('forked')", layers)
    if not layers:
        assert r.ok and r.output.strip() == "forked"
    else:
        stopped_by(r, ("rlimits",) if "rlimits" in layers else layers)


@pytest.mark.parametrize("layers", [(), ("rlimits",)], ids=["none", "rlimits"])
def test_memory_hog(layers):
    r = run("x = bytearray(1 << 30)\nprint(len(x))", layers, memory_mb=256, timeout=10.0)  # (a loaded machine
    # takes seconds to zero 1 GiB)
    if not layers:
        assert r.ok and int(r.output) == 1 << 30
    else:
        stopped_by(r, layers)


@pytest.mark.parametrize("layers", [(), executor.LAYERS], ids=["none", "all"])
def test_endless_loop(layers):  # the parent's timeout: no layer needed, and the process is gone
    t0 = time.time()
    r = executor.run_python("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass", timeout=1.0, layers=layers)
    assert not r.ok and r.error == "timeout after 1 s" and time.time() - t0 < 5
    with pytest.raises(ProcessLookupError):  # not left spinning
        os.kill(int(r.output.split()[0]), 0)


def test_all_layers_run_a_program_with_the_stdlib():
    r = executor.run_python("import collections, datetime, decimal, fractions, hashlib, json, math, random, re\n"
                            "print(sum(range(5)))\nopen('here.txt', 'w').write('ok')\nprint(open('here.txt').read())")
    assert r.ok and r.output.split() == ["10", "ok"] and r.error == ""
    assert r.layers == executor.available().layers and {"rlimits", "audit"} <= set(r.layers)
    r = executor.run_python("def f(x):\n    return x\nassert f(1) == 1\nassert f(2) == 3")
    assert not r.ok and r.reply() == "AssertionError at line 4: assert f(2) == 3"


def test_a_fork_bomb_ends_at_once():
    for layers in (executor.LAYERS, ("seccomp",), ("rlimits", "nonroot")):
        t0 = time.time()
        r = run("import os\nwhile True:\n    os.fork()", layers)
        assert not r.ok and "timeout" not in r.error and time.time() - t0 < 5, (layers, r)  # the first fork fails
    for code in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                 "import multiprocessing\nmultiprocessing.Process(target=print).start()"):
        assert not executor.run_python(code).ok


@pytest.mark.parametrize("layers", [("audit",), tuple(n for n in executor.LAYERS if n != "audit")],
                         ids=["audit", "kernel"])
def test_writes_renames_and_deletions_outside_the_scratch_dir(tmp_path, layers):
    """The audit hook alone, and the kernel's layers without it, each stop every one of these."""
    victim, keep = tmp_path / "victim.txt", tmp_path / "keep.txt"
    keep.write_text("precious")
    for code in (f"open({str(victim)!r}, 'w').write('x')",
                 f"import os\nos.close(os.open({str(victim)!r}, os.O_WRONLY | os.O_CREAT))",
                 f"import os\nos.remove({str(keep)!r})",
                 f"import os\nos.rename({str(keep)!r}, 'mine.txt')",
                 f"import os\nos.symlink({str(keep)!r}, 'link')\nopen('link', 'w').write('x')",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        r = executor.run_python(code, layers=layers)
        assert not r.ok, (code, r)
        assert "sandbox:" in r.error if layers == ("audit",) else "sandbox:" not in r.error
    assert not victim.exists() and keep.read_text() == "precious"


def test_describe_names_the_layers_and_what_is_missing(monkeypatch):
    line = executor.describe()
    assert line.startswith("executor: contained by ") and all(n in line for n in executor.available().layers)
    refused = executor.RunResult(True, "", "", ["rlimits", "audit"], {"netns": "unshare(CLONE_NEWNET): Operation "
                                                                      "not permitted", "landlock": "landlock: ENOSYS"})
    monkeypatch.setattr(executor, "available", lambda: refused)
    line = executor.describe()
    assert "allows none of its containment layers" in line and "netns: unshare" in line and "audit" in line
    with pytest.raises(ValueError, match="unknown executor layers"):
        executor.run_python("pass", layers=("chroot",))
