"""kernels.py: each Triton kernel against its torch reference, on the CPU.

Triton runs on CPU tensors only through its interpreter, and triton decides interpreter-or-GPU
when triton.language and each @triton.jit function are defined, i.e. when triton and kernels.py are
first imported. So TRITON_INTERPRET=1 is set below BEFORE either is imported. If an earlier test
module imported them first, the Triton tests here fail with a message saying so (the cure is the
same line in tests/conftest.py). Shapes are tiny and ragged: T and S are not multiples of the
interpreter's 16-wide blocks and the head dims are not powers of two.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the imports of triton / kernels: see above

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels


@pytest.fixture
def interpreter():
    if type(kernels._sym_matmul_kernel).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (by an earlier test module?), "
                    "so its kernels cannot run on the CPU: set it in tests/conftest.py")


def needs_triton(test):
    skip = pytest.mark.skipif(not kernels.HAS_TRITON,
                              reason="triton is not installed: the Triton kernels cannot run")
    return skip(pytest.mark.usefixtures("interpreter")(test))


TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # relative to the largest reference value


def close(a, b, tol):
    a, b = a.float(), b.float()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("NANOK2_KERNELS", raising=False)


# ----------------------------------------------------------------------------- attention

def _attn_inputs(B, H, T, Dqk, Dv, dtype, seed=0, logit_gain=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, T, Dqk, generator=g) * logit_gain, torch.randn(B, H, T, Dqk, generator=g)
    v, do = torch.randn(B, H, T, Dv, generator=g), torch.randn(B, H, T, Dv, generator=g)
    return [t.to(dtype) for t in (q, k, v, do)]


def _run(fn, q, k, v, do, scale, as_fp32=False):
    leaves = [(t.float() if as_fp32 else t).detach().requires_grad_() for t in (q, k, v)]
    out, max_logits = fn(*leaves, scale)
    out.backward(do.to(out.dtype))
    return out, max_logits, *(t.grad for t in leaves)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,Dqk,Dv,gain", [(2, 3, 37, 48, 32, 1.0),   # ragged T, Dqk != Dv
                                               (1, 2, 21, 24, 40, 6.0),   # Dv > Dqk, large logits
                                               (1, 1, 19, 192, 128, 1.0)])  # K2 head dims (192 -> 256)
def test_flash_attention_matches_reference(dtype, B, H, T, Dqk, Dv, gain):
    q, k, v, do = _attn_inputs(B, H, T, Dqk, Dv, dtype, logit_gain=gain)
    scale = Dqk ** -0.5
    got = _run(kernels.flash_attention, q, k, v, do, scale)
    ref = _run(kernels.attention_reference, q, k, v, do, scale, as_fp32=True)  # fp32, same values
    for name, a, b in zip(("out", "max_logits", "dq", "dk", "dv"), got, ref):
        assert a.dtype == (torch.float32 if name == "max_logits" else dtype), name
        assert torch.isfinite(a).all(), name
        close(a, b, 1e-5 if name == "max_logits" else TOL[dtype])
    assert got[1].shape == (H,) and not got[1].requires_grad


@needs_triton
def test_max_logit_is_signed_and_causal():
    # Query 0 would see a huge logit with the last key, but that key is in its future; the last
    # query sees it with a very negative logit.
    q, k, v, _ = _attn_inputs(1, 2, 23, 48, 32, torch.float32)
    k[:, :, -1] = 8 * q[:, :, 0]
    q[:, :, -1] = -q[:, :, 0]
    out, mx = kernels.flash_attention(q, k, v, 0.2)
    ref_out, ref_mx = kernels.attention_reference(q, k, v, 0.2)
    close(out, ref_out, 1e-5)
    assert torch.allclose(mx, ref_mx, rtol=1e-5)
    assert (mx < 0.2 * 8 * q[0, :, 0].pow(2).sum(-1) / 2).all()   # the future logit was not counted
    # Every logit negative: the max is the (negative) largest logit, not a magnitude.
    mx = kernels.flash_attention(q.abs(), -k.abs(), v, 0.2)[1]
    assert (mx < 0).all()
    assert torch.allclose(mx, kernels.attention_reference(q.abs(), -k.abs(), v, 0.2)[1], rtol=1e-5)


def test_causal_max_logits_chunked_matches_reference():
    q, k, _, _ = _attn_inputs(2, 3, 37, 48, 32, torch.float32, seed=1)
    ref = kernels.attention_reference(q, k, torch.zeros(2, 3, 37, 1), 0.3)[1]
    assert torch.allclose(kernels.causal_max_logits(q, k, 0.3, chunk=8), ref, rtol=1e-6)


def test_attention_with_max_uses_torch_on_cpu():
    q, k, v, _ = _attn_inputs(2, 3, 37, 48, 32, torch.float32)
    out, mx = kernels.attention_with_max(q, k, v, 0.25)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25))
    assert torch.equal(mx, kernels.causal_max_logits(q, k, 0.25))


@needs_triton
def test_attention_with_max_forced_triton(monkeypatch):
    q, k, v, _ = _attn_inputs(1, 2, 20, 48, 32, torch.float32)
    monkeypatch.setenv("NANOK2_KERNELS", "triton")
    out, mx = kernels.attention_with_max(q, k, v, 0.25)
    ref_out, ref_mx = kernels.flash_attention(q, k, v, 0.25)
    assert torch.equal(out, ref_out) and torch.equal(mx, ref_mx)
    monkeypatch.setenv("NANOK2_KERNELS", "cuda")
    with pytest.raises(ValueError, match="NANOK2_KERNELS"):
        kernels.attention_with_max(q, k, v, 0.25)


@needs_triton
def test_attention_input_checks():
    q, k, v, _ = _attn_inputs(1, 2, 20, 48, 32, torch.float32)
    with pytest.raises(ValueError, match="v must be"):
        kernels._flash_fwd(q, k, v[:, :, :5], 0.1)
    with pytest.raises(ValueError, match="one dtype"):
        kernels._flash_fwd(q, k.bfloat16(), v, 0.1)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        kernels._flash_fwd(q.half(), k.half(), v.half(), 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        kernels._flash_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.1)
    out, _ = kernels.flash_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, 0.1)
    close(out, kernels.attention_reference(q, k, v, 0.1)[0], 1e-5)  # the public entry copies


# ----------------------------------------------------------------------------- decode

def _decode_inputs(dtype, B=4, H=3, S=45, Dqk=48, Dv=32):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(B, H, Dqk, generator=g), torch.randn(B, H, S, Dqk, generator=g)
    v = torch.randn(B, H, S, Dv, generator=g)
    bias = torch.randn(B, H, S, generator=g).abs().log()           # ln(votes)-like, some large negative
    bias[:, :, 3::7] = float("-inf")                                # empty slots
    bias[3] = float("-inf")                                         # sequence 3: nothing visible
    lengths = torch.tensor([S, 11, 0, 30])                          # full, short, empty, some
    for b, n in enumerate(lengths.tolist()):                        # past the length: garbage, never read
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    return q.to(dtype), k.to(dtype), v.to(dtype), bias, lengths


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("return_logits", [False, True])
@pytest.mark.parametrize("chunk", [None, 16, 32])  # None: one split on a CPU; 16: a split past all lengths
def test_decode_attention_matches_reference(dtype, return_logits, chunk):
    q, k, v, bias, lengths = _decode_inputs(dtype)
    args = (q, k, v, bias, lengths, 48 ** -0.5)
    got = kernels.decode_attention(*args, return_logits=return_logits, chunk=chunk)
    ref = kernels.decode_attention_reference(*args, return_logits=return_logits)
    out, ref_out = (got[0], ref[0]) if return_logits else (got, ref)
    assert out.dtype == dtype and out.shape == (4, 3, 32)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all() and (out[3] == 0).all()              # no visible key: zeros by definition
    close(out, ref_out, TOL[dtype])
    if return_logits:
        logits, ref_logits = got[1], ref[1]
        assert logits.dtype == torch.float32
        assert torch.equal(torch.isinf(logits), torch.isinf(ref_logits))  # -inf exactly past the length
        assert torch.isinf(logits[1, :, 11:]).all() and torch.isfinite(logits[1, :, :11]).all()
        fin = torch.isfinite(ref_logits)
        assert torch.allclose(logits[fin], ref_logits[fin], rtol=1e-5, atol=1e-5)


def test_decode_reference_is_softmax_with_votes():
    # Electoral votes: an entry with bias ln 3 counts like three copies of itself.
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((1, 1, 8), (1, 1, 5, 8), (1, 1, 5, 4)))
    bias = torch.zeros(1, 1, 5)
    bias[0, 0, 2] = torch.tensor(3.0).log()
    out = kernels.decode_attention_reference(q, k, v, bias, torch.tensor([5]), 0.5)
    idx = torch.tensor([0, 1, 2, 2, 2, 3, 4])
    s = (q[:, :, None] @ k[:, :, idx].mT).squeeze(2) * 0.5
    assert torch.allclose(out, (s.softmax(-1)[:, :, None] @ v[:, :, idx]).squeeze(2), atol=1e-6)


def test_decode_attention_auto_uses_reference_on_cpu():
    q, k, v, bias, lengths = _decode_inputs(torch.float32)
    got = kernels.decode_attention_auto(q, k, v, bias, lengths, 0.2, return_logits=True)
    ref = kernels.decode_attention_reference(q, k, v, bias, lengths, 0.2, return_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@needs_triton
def test_decode_input_checks():
    q, k, v, bias, lengths = _decode_inputs(torch.float32)
    with pytest.raises(ValueError, match="bias must be"):
        kernels.decode_attention(q, k, v, bias.double(), lengths, 0.2)
    with pytest.raises(ValueError, match="lengths must be"):
        kernels.decode_attention(q, k, v, bias, lengths.float(), 0.2)
    with pytest.raises(ValueError, match="q must be"):
        kernels.decode_attention(q[:, :, :5], k, v, bias, lengths, 0.2)
    with pytest.raises(ValueError, match="chunk"):
        kernels.decode_attention(q, k, v, bias, lengths, 0.2, chunk=20)


# ----------------------------------------------------------------------------- sym_matmul

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(20, 53), (45, 19), (3, 20, 53), (2, 33, 16), (1, 7)])
def test_sym_matmul_matches_matmul(dtype, shape):
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    C = kernels.sym_matmul(X)
    assert C.dtype == dtype and C.shape == (*shape[:-1], shape[-2])
    close(C, X.float() @ X.float().mT, TOL[dtype])


def test_sym_matmul_auto_uses_matmul_on_cpu():
    X = torch.randn(3, 20, 53)
    assert torch.equal(kernels.sym_matmul_auto(X), X @ X.mT)
    assert torch.equal(kernels.sym_matmul_reference(X), X @ X.mT)


@needs_triton
def test_sym_matmul_input_checks():
    with pytest.raises(ValueError, match="X must be"):
        kernels.sym_matmul(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.sym_matmul(torch.randn(20, 30).mT)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        kernels.sym_matmul(torch.randn(20, 30).half())


# ----------------------------------------------------------------------------- without triton

def test_forcing_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    monkeypatch.setenv("NANOK2_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="triton is not installed"):
        kernels.sym_matmul_auto(torch.randn(4, 4))


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch, kernels; "
            "assert not kernels.HAS_TRITON; "
            "X = torch.randn(5, 7); assert torch.equal(kernels.sym_matmul_auto(X), X @ X.mT); print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "NANOK2_KERNELS"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@needs_triton
def test_forcing_triton_on_cpu_without_interpreter_raises():
    code = ("import os, torch, kernels; os.environ['NANOK2_KERNELS'] = 'triton'\n"
            "try:\n    kernels.sym_matmul_auto(torch.randn(4, 4))\n"
            "except RuntimeError as e:\n    print(e)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=env)
    assert "TRITON_INTERPRET=1" in r.stdout, r.stdout + r.stderr
