"""The executor (executor.py): a program runs in a confined child process, and each containment
holds: an infinite loop, a fork bomb (with the audit hook, and with the kernel layers alone), writes
and deletions outside the scratch directory, a network connection, a memory hog."""
import os
import socket
import time

import pytest

import executor


def test_runs_a_program_and_reports_its_layers():
    r = executor.run_python("print(sum(range(5)))\nopen('here.txt', 'w').write('ok')\nprint(open('here.txt').read())")
    assert r.ok and r.output.split() == ["10", "ok"] and r.error == ""
    assert {"rlimits", "audit"} <= set(r.layers)
    r = executor.run_python("def f(x):\n    return x\nassert f(1) == 1\nassert f(2) == 3")
    assert not r.ok and r.reply() == "AssertionError at line 4: assert f(2) == 3"


def test_contains_an_infinite_loop():
    t0 = time.time()
    r = executor.run_python("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass", timeout=1.0)
    assert not r.ok and r.error == "timeout after 1 s" and time.time() - t0 < 5
    with pytest.raises(ProcessLookupError):  # the process is gone, not left spinning
        os.kill(int(r.output.split()[0]), 0)


def test_contains_a_fork_bomb():
    bomb = "import os\nwhile True:\n    os.fork()"
    t0 = time.time()
    r = executor.run_python(bomb)
    assert not r.ok and "os.fork is not allowed" in r.error and time.time() - t0 < 5
    for code in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                 "import multiprocessing\nmultiprocessing.Process(target=print).start()"):
        assert not executor.run_python(code).ok
    # the kernel layers alone (no audit hook): seccomp refuses the fork itself
    probe = executor.run_python("pass", audit=False)
    if "seccomp" not in probe.layers:
        pytest.skip("no seccomp on this machine; RLIMIT_NPROC alone does not bind root")
    r = executor.run_python(bomb, audit=False)
    assert not r.ok and "Operation not permitted" in r.error and time.time() - t0 < 10


def test_contains_writes_outside_the_scratch_dir(tmp_path):
    victim, keep = tmp_path / "victim.txt", tmp_path / "keep.txt"
    keep.write_text("precious")
    for code in (f"open({str(victim)!r}, 'w').write('x')",
                 f"import os\nos.close(os.open({str(victim)!r}, os.O_WRONLY | os.O_CREAT))",
                 f"import os\nos.remove({str(keep)!r})",
                 f"import os\nos.rename({str(keep)!r}, 'mine.txt')",
                 f"import os\nos.symlink({str(keep)!r}, 'link')\nopen('link', 'w').write('x')",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        r = executor.run_python(code)
        assert not r.ok and "sandbox:" in r.error, (code, r)
    assert not victim.exists() and keep.read_text() == "precious"


def test_contains_a_network_attempt():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')"
    try:
        r = executor.run_python(code)
        assert not r.ok and "sandbox: import is not allowed" in r.error
        assert not executor.run_python("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1')").ok
        kernel = executor.run_python(code, audit=False)  # the network namespace / seccomp alone
        if {"netns", "seccomp"} & set(kernel.layers):
            assert not kernel.ok and ("unreachable" in kernel.error or "not permitted" in kernel.error)
        with pytest.raises(socket.timeout):
            server.accept()  # nobody ever connected
    finally:
        server.close()


def test_contains_a_memory_hog():
    r = executor.run_python("x = bytearray(2 * 1024 ** 3)", memory_mb=256)
    assert not r.ok and r.error.startswith("MemoryError")


