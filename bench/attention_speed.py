"""
Causal attention for training on this CPU: csrc/train/attention.c (model.py's C kernel) against
PyTorch's scaled_dot_product_attention, forward and backward, at the shapes the presets train and
the RL update runs (B, heads, T, head size).

    python bench/attention_speed.py [--threads=2] [--repeats=9] [--lib=path/to/libattention.so]
    ATEN_CPU_CAPABILITY=avx2 python bench/attention_speed.py --lib=avx2/libattention.so   # the AVX2 path

Milliseconds are medians of --repeats after a warm-up; prints a JSON line and a markdown table.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cpu_name  # noqa: E402
from model import c_attention  # noqa: E402

SHAPES = {  # name: (B, heads, T, head size)
    "default, pretraining (batch 16)": (16, 8, 256, 16),
    "default, RL update (minibatch 8)": (8, 8, 255, 16),
    "default, RL update, shorter": (8, 8, 140, 16),
    "260K, the fork's minibatch of 50": (50, 8, 329, 8),
    "15M (head size 48)": (4, 6, 256, 48),
    "110M (head size 64)": (4, 12, 256, 64),
}


def milliseconds(attention, shape, repeats):
    """Medians of the forward and the backward pass, in ms."""
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    forward, backward = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out = attention(q, k, v)
        t1 = time.perf_counter()
        out.backward(torch.ones_like(out))
        forward.append(t1 - t0)
        backward.append(time.perf_counter() - t1)
    return statistics.median(forward[1:]) * 1e3, statistics.median(backward[1:]) * 1e3


def main(args):
    torch.set_num_threads(args.threads)
    kernels = {
        "torch": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "c": lambda q, k, v: c_attention(q, k, v, args.lib),
    }
    results = []
    for name, shape in SHAPES.items():
        (tf, tb), (cf, cb) = (milliseconds(kernels[k], shape, args.repeats) for k in ("torch", "c"))
        results.append({"shape": name, "dims": shape, "torch_ms": [tf, tb], "c_ms": [cf, cb]})
    print(json.dumps({"bench": "attention_speed", "cpu": cpu_name(), "threads": args.threads, "results": results}))
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"\n{cpu_name()}, {args.threads} threads, PyTorch's {capability} kernels; ms, medians of {args.repeats}\n")
    print("| shape | B, heads, T, head size | PyTorch forward + backward | C forward + backward | C's speed-up |")
    print("|---|---|---|---|---|")
    for r in results:
        (tf, tb), (cf, cb) = r["torch_ms"], r["c_ms"]
        dims = ", ".join(map(str, r["dims"]))
        print(f"| {r['shape']} | {dims} | {tf:.1f} + {tb:.1f} | {cf:.1f} + {cb:.1f} | {(tf + tb) / (cf + cb):.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--lib", default="", help="another build of csrc/libattention.so (default: that one)")
    main(parser.parse_args())
