"""
Training speed on this machine: peak matmul GFLOP/s, then tokens/s and MFU of a full
training step (forward, backward, AdamW) for llama2.c's presets, comparing the plain fp32
eager loop (llama2.c's baseline) with bf16 autocast, torch.compile and thread counts.

    python bench/train_speed.py [--presets=260K,15M-4096,15M,42M] [--batch_size=32] [--seconds=4] [--only=fp32]

Random tokens: speed does not depend on the data. Prints a JSON line and a markdown table.
The "C attention" settings train through csrc/train/attention.c (`make lib`) at any head size (by
default model.py uses it at sizes up to 16), the others through PyTorch's attention. PyTorch's AVX2
path can be timed on an AVX-512 machine: ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2 (with --only=fp32: bf16 has no fast path there).
"""

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import peak_matmul_flops  # noqa: E402
from model import PRESETS, ModelArgs, Transformer  # noqa: E402

SHAPES = {  # name: (preset, overrides); seq lengths as in llama2.c's own measurements
    "default": ("default", {}),
    "260K": ("260K", dict(max_seq_len=512)),
    "15M-4096": ("15M", dict(vocab_size=4096, max_seq_len=256)),
    "15M": ("15M", dict(max_seq_len=256)),
    "42M": ("42M", dict(max_seq_len=256)),
}
SETTINGS = [  # name, dtype, compile, threads, whether C attention (else PyTorch's) at every head size
    ("fp32 eager", torch.float32, False, 2, False),
    ("fp32 eager, C attention", torch.float32, False, 2, True),
    ("bf16 autocast", torch.bfloat16, False, 2, False),
    ("fp32 + compile", torch.float32, True, 2, False),
    ("fp32 + compile, C attention", torch.float32, True, 2, True),
    ("fp32 + compile, 1 thread", torch.float32, True, 1, False),
    ("bf16 autocast + compile", torch.bfloat16, True, 2, False),
    ("bf16 autocast + compile, 1 thread", torch.bfloat16, True, 1, False),
]

parser = argparse.ArgumentParser()
parser.add_argument("--presets", default=",".join(SHAPES))
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--seconds", type=float, default=4.0, help="time each setting for at least this long")
parser.add_argument("--only", default="", help="comma-separated: run the settings whose name contains one of these")
args = parser.parse_args()


def tokens_per_second(shape, dtype, use_compile, threads, c_attention):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    preset, overrides = SHAPES[shape]
    margs = ModelArgs(**{**PRESETS[preset], **overrides})
    model = Transformer(margs)
    model.set_attention("c" if c_attention else "torch")
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
    step_model = torch.compile(model) if use_compile else model
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)
    x = torch.randint(0, margs.vocab_size, (args.batch_size, margs.max_seq_len + 1))

    def step():
        with ctx:
            _, loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (and compilation)
        step()
    times = []
    while sum(times) < args.seconds or len(times) < 3:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    return (
        args.batch_size * margs.max_seq_len / dt,
        model.estimate_mfu(args.batch_size, dt, PEAK[dtype]),
        model.num_params(),
    )


torch.set_num_threads(2)
PEAK = {dt: peak_matmul_flops("cpu", dt, n=2048) for dt in (torch.float32, torch.bfloat16)}
print(
    f"peak matmul, 2 threads: fp32 {PEAK[torch.float32] / 1e9:,.0f} GFLOP/s, "
    f"bf16 {PEAK[torch.bfloat16] / 1e9:,.0f} GFLOP/s",
    file=sys.stderr,
)
results = []
for shape in args.presets.split(","):
    base = None
    for name, dtype, use_compile, threads, c_attention in SETTINGS:
        if args.only and not any(word in name for word in args.only.split(",")):
            continue
        tps, mfu, n_params = tokens_per_second(shape, dtype, use_compile, threads, c_attention)
        base = base or tps
        results.append(
            {
                "shape": shape,
                "params": n_params,
                "setting": name,
                "tok_per_s": round(tps),
                "mfu": round(mfu, 4),
                "speedup": round(tps / base, 2),
            }
        )  # vs the first setting run
        print(f"{shape:9s} {name:34s} {tps:10,.0f} tok/s  MFU {mfu * 100:5.1f}%  {tps / base:.2f}x", file=sys.stderr)

print(
    json.dumps(
        {
            "bench": "train_speed",
            "batch_size": args.batch_size,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "peak_gflops": {"fp32": round(PEAK[torch.float32] / 1e9), "bf16": round(PEAK[torch.bfloat16] / 1e9)},
            "results": results,
        }
    )
)
print(
    f"\npeak matmul (2 threads): fp32 {PEAK[torch.float32] / 1e9:,.0f} GFLOP/s, "
    f"bf16 {PEAK[torch.bfloat16] / 1e9:,.0f} GFLOP/s; "
    f"batch {args.batch_size}; MFU against the peak of the setting's dtype\n"
)
print(f"PyTorch CPU capability: {torch.backends.cpu.get_cpu_capability()}\n")
print("| shape | params | setting | tok/s | MFU | vs fp32 eager |\n|---|---|---|---|---|---|")
for r in results:
    print(
        f"| {r['shape']} | {r['params'] / 1e6:.2f}M | {r['setting']} | {r['tok_per_s']:,} | {r['mfu'] * 100:.1f}% "
        f"| {r['speedup']:.2f}x |"
    )
