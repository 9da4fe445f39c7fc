"""bench.py kernels: the Triton kernels of kernels.py against their torch references. On a GPU it
times each kernel and the usual alternative at K2-like shapes in bf16 (flash attention with its max
logit vs SDPA plus a separate max-logit pass, flash-decoding with KeepKV's bias vs SDPA with a float
mask, the symmetric X X^T vs a full matmul) and checks their results there. The claim it checks:
each kernel matches its reference, and computing QK-Clip's max logit inside flash attention, and only
the upper half of X X^T, is faster than the torch paths. On a CPU there is nothing to time: it
checks the kernels' results under the Triton interpreter at small ragged shapes instead."""
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from kernels import (HAS_TRITON, attention_reference, causal_max_logits, decode_attention,
                     decode_attention_reference, flash_attention, sym_matmul)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: kernels.py's folder


def _rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


SHAPES = {"small": dict(attn=(2, 3, 37, 48, 32), decode=(2, 45), sym=(3, 20, 53)),   # ragged toys
          "k2": dict(attn=(1, 16, 4096, 192, 128), decode=(8, 4096), sym=(1, 2048, 7168))}


def kernel_errors(dtype=torch.float32, shapes="small"):
    """Relative error, max |a - b| / max |b|, of each Triton kernel's results against its reference,
    at SHAPES[shapes]. On the CPU this needs TRITON_INTERPRET=1 set before import."""
    g = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rnd = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)
    (B, H, T, Dqk, Dv), (Bd, S), sym_shape = (SHAPES[shapes][key] for key in ("attn", "decode", "sym"))
    q, k, v, do = rnd(B, H, T, Dqk), rnd(B, H, T, Dqk), rnd(B, H, T, Dv), rnd(B, H, T, Dv)
    res = []
    for fn in (flash_attention, attention_reference):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, mx = fn(*leaves, Dqk ** -0.5)
        res.append((out, mx, *torch.autograd.grad(out, leaves, do)))
    names = ("attn_out", "attn_max_logits", "attn_dq", "attn_dk", "attn_dv")
    errs = {name: _rel_err(a, b) for name, a, b in zip(names, *res)}
    del res
    qd, kd, vd = rnd(Bd, H, Dqk), rnd(Bd, H, S, Dqk), rnd(Bd, H, S, Dv)
    bias = torch.randn(Bd, H, S, generator=g).to(dev)
    bias[:, :, ::7] = float("-inf")
    lengths = torch.arange(Bd, 0, -1, device=dev) * S // Bd                # full, then shorter
    (o1, l1), (o2, l2) = (f(qd, kd, vd, bias, lengths, Dqk ** -0.5, return_logits=True)
                          for f in (decode_attention, decode_attention_reference))
    errs["decode_out"] = _rel_err(o1, o2)
    errs["decode_logits"] = _rel_err(l1.nan_to_num(neginf=0.0), l2.nan_to_num(neginf=0.0))
    X = rnd(*sym_shape)
    errs["sym_matmul"] = _rel_err(sym_matmul(X), X.float() @ X.float().mT)
    return errs


def _kernel_errors_in_child(dtype_name):
    """kernel_errors in a fresh python with TRITON_INTERPRET=1: triton picks the interpreter when it
    is imported, so a process that imported it for the GPU cannot switch."""
    code = ("import json, torch; from benchmarks.kernel_speed import kernel_errors; "
            f"print(json.dumps(kernel_errors(torch.{dtype_name})))")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"interpreter checks failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_kernels(out_json="out/bench/kernels.json"):
    """GPU: time each kernel against its torch reference and the usual alternative at K2-like
    shapes (bf16), check its results there, print a table and write JSON. CPU: say that the table
    needs a GPU, and check the kernels under the Triton interpreter at small shapes instead."""
    os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, so no timing table (it needs a GPU). Checking the Triton "
              "kernels against their references under the CPU interpreter at small shapes instead.")
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed: there is no kernel to check")
        errors = {name: _kernel_errors_in_child(name) for name in ("float32", "bfloat16")}
        report = {"device": "cpu (TRITON_INTERPRET=1)", "shapes": SHAPES["small"], "max_rel_error": errors}
    else:
        from triton.testing import do_bench
        bf, rows = torch.bfloat16, []
        (B, H, T, Dqk, Dv), (Bd, S), (_, n, m) = (SHAPES["k2"][key] for key in ("attn", "decode", "sym"))
        rnd = lambda *s, grad=False: torch.randn(*s, device="cuda", dtype=bf, requires_grad=grad)
        q, k, v = rnd(B, H, T, Dqk, grad=True), rnd(B, H, T, Dqk, grad=True), rnd(B, H, T, Dv, grad=True)
        do, X = rnd(B, H, T, Dv), rnd(n, m)
        qd, kd, vd = rnd(Bd, H, Dqk), rnd(Bd, H, S, Dqk), rnd(Bd, H, S, Dv)
        bias, lengths = torch.randn(Bd, H, S, device="cuda"), torch.full((Bd,), S, device="cuda")
        sc = Dqk ** -0.5
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sc)
        grads = lambda f: (lambda: torch.autograd.grad(f(), (q, k, v), do))
        nograd = lambda f: (lambda: torch.no_grad()(f)())
        maxpass = lambda: causal_max_logits(q, k, sc)                   # the torch path's QK-Clip pass
        pairs = B * H * T * T / 2                                        # causal (query, key) pairs
        flops = {"attention fwd": pairs * 2 * (Dqk + Dv),                # QK^T, PV
                 "attention fwd+bwd": pairs * 2 * (4 * Dqk + 3 * Dv),    # + QK^T again, dV, dP, dQ, dK
                 "decode": 2 * Bd * H * S * (Dqk + Dv), "sym_matmul": 2 * n * n * m}
        nbytes = {"decode": Bd * H * S * ((Dqk + Dv) * 2 + 4)}          # the cache and the bias, read once
        dec = (qd, kd, vd, bias, lengths, sc)
        cases = [  # (group, name, fn); the first row of a group is the one to beat
            ("attention fwd", "sdpa (no max logit)", nograd(sdpa)),
            ("attention fwd", "sdpa + max-logit pass", nograd(lambda: (sdpa(), maxpass()))),
            ("attention fwd", "reference (fp32)", nograd(lambda: attention_reference(q, k, v, sc))),
            ("attention fwd", "triton flash_attention", nograd(lambda: flash_attention(q, k, v, sc))),
            ("attention fwd+bwd", "sdpa (no max logit)", grads(sdpa)),
            ("attention fwd+bwd", "reference (fp32)", grads(lambda: attention_reference(q, k, v, sc)[0])),
            ("attention fwd+bwd", "triton flash_attention", grads(lambda: flash_attention(q, k, v, sc)[0])),
            ("decode", "sdpa, bias as float mask", lambda: F.scaled_dot_product_attention(
                qd[:, :, None], kd, vd, attn_mask=bias[:, :, None].to(bf), scale=sc)),
            ("decode", "reference (fp32 einsum)", lambda: decode_attention_reference(*dec)),
            ("decode", "triton decode_attention", lambda: decode_attention(*dec)),
            ("sym_matmul", "torch.matmul (= reference)", lambda: X @ X.mT),
            ("sym_matmul", "triton sym_matmul", lambda: sym_matmul(X))]
        print(f"{'group':18s} {'kernel':28s} {'ms':>8s} {'TFLOP/s':>8s} {'GB/s':>6s} {'speedup':>8s}")
        for group, name, fn in cases:
            ms = do_bench(fn, warmup=25, rep=100)
            base = ms if not rows or rows[-1]["group"] != group else rows[-1]["base_ms"]
            gbps = nbytes[group] / ms / 1e6 if group in nbytes else None
            rows.append(dict(group=group, kernel=name, ms=ms, base_ms=base, tflops=flops[group] / ms / 1e9,
                             gbps=gbps, speedup=base / ms))
            print(f"{group:18s} {name:28s} {ms:8.3f} {flops[group] / ms / 1e9:8.1f} "
                  f"{'' if gbps is None else f'{gbps:.0f}':>6s} {base / ms:7.2f}x")
        print("speedup: the group's first row time / this row's time. TFLOP/s counts the causal half for "
              "attention and the full X X^T for both sym_matmul rows.")
        report = {"device": torch.cuda.get_device_name(), "shapes": SHAPES["k2"], "rows": rows,
                  "max_rel_error": {"bfloat16 k2": kernel_errors(bf, "k2"), "bfloat16 small":
                                    kernel_errors(bf, "small"), "float32 small": kernel_errors(torch.float32)}}
    for dtype_name, errs in report["max_rel_error"].items():
        for check, err in errs.items():
            print(f"  {dtype_name:14s} {check:16s} max rel error {err:.2e}")
    with open(out_json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out_json}")
    return report


def add_parser(sub):
    k = sub.add_parser("kernels", help="Triton kernels vs torch references")
    k.set_defaults(fn=lambda a: bench_kernels())
