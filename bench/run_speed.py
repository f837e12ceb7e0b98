"""
Generation speed of the C engine: ./run (the runomp build) on random-weight models of
llama2.c's sizes, fp32 (version 1) and int8 (Q8_0, version 2), at 1 and 2 threads. Reports
the median tok/s of a few runs of 256 tokens, the achieved GFLOP/s, and the GB/s of weights
read, as a JSON blob and a markdown table.

    python bench/run_speed.py
    python bench/run_speed.py --shapes=15M,15M-GQA-4096 --runs=1 --threads=2

Generation is greedy (-t 0): with random weights the next-token distribution is flat, so
top-p sampling would sort the whole vocabulary every step, which no real model makes it do.
Token 1 (BOS, which stops generation) gets the same embedding as token 0, so its logit ties
with token 0's and greedy decoding, which keeps the first maximum, never picks it.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from csrc import formats  # noqa: E402
from csrc.formats import Config  # noqa: E402

# llama2.c's model sizes (hidden_dim as its model.py computes it, multiple_of=32; 4 for 260K)
SHAPES = {
    "260K": Config(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, seq_len=512),
    "15M": Config(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, seq_len=256),
    "15M-GQA-4096": Config(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=2, vocab_size=4096, seq_len=256),
    "42M": Config(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, seq_len=1024),
    "110M": Config(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, seq_len=1024),
}
STEPS = 256


def group_size(c):
    """export.py's Q8_0 group size, 64 halved until it divides dim, and here hidden_dim too."""
    gs = 64
    while c.dim % gs or c.hidden_dim % gs:
        gs //= 2
    return gs


def matmul_params(c):
    kv_dim = c.dim * c.n_kv_heads // c.n_heads
    return c.n_layers * (2 * c.dim * c.dim + 2 * c.dim * kv_dim + 3 * c.dim * c.hidden_dim) + c.vocab_size * c.dim


def flops_per_token(c, steps):
    """2 per multiply-add: the matmuls, and attention's q.k and att.v over the average context."""
    attention = c.n_layers * 2 * 2 * c.dim * (steps + 1) / 2
    return 2 * matmul_params(c) + attention


def weight_bytes_per_token(c, quantised):
    params = matmul_params(c)
    return params * (1 + 4 / group_size(c)) if quantised else params * 4


def write_models(name, c, tmp):
    w = formats.random_weights(c, shared=True, seed=0)
    w["token_embedding_table"][1] = w["token_embedding_table"][0]  # BOS never wins greedy decoding
    paths = {}
    for fmt, version in [("fp32", 1), ("int8", 2)]:
        paths[fmt] = os.path.join(tmp, f"{name}-{fmt}.bin")
        formats.write_checkpoint(paths[fmt], c, w, version, group_size(c))
    tokenizer = os.path.join(tmp, f"tok{c.vocab_size}.bin")
    formats.write_tokenizer(tokenizer, *formats.synthetic_tokenizer(c.vocab_size))
    return paths, tokenizer


def tok_per_s(model, tokenizer, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([os.path.join(ROOT, "run"), model, "-z", tokenizer, "-t", "0", "-n", str(STEPS)],
                       capture_output=True, text=True, env=env, check=True)
    return float(re.search(r"achieved tok/s: ([0-9.]+)", r.stderr).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, from: " + ", ".join(SHAPES))
    parser.add_argument("--threads", default="1,2", help="comma-separated OMP_NUM_THREADS values")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (the median is reported)")
    args = parser.parse_args()
    subprocess.run(["make", "-s", "runomp"], cwd=ROOT, check=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes.split(","):
            c = SHAPES[name]
            paths, tokenizer = write_models(name, c, tmp)
            for fmt, path in paths.items():
                for threads in map(int, args.threads.split(",")):
                    speeds = [tok_per_s(path, tokenizer, threads) for _ in range(args.runs)]
                    tps = statistics.median(speeds)
                    results.append(dict(
                        model=name, format=fmt, threads=threads, tok_s=round(tps, 1),
                        gflop_s=round(tps * flops_per_token(c, STEPS) / 1e9, 1),
                        weights_gb_s=round(tps * weight_bytes_per_token(c, fmt == "int8") / 1e9, 1),
                        runs=[round(s, 1) for s in speeds]))
                    print(f"{name:>13} {fmt} {threads} threads: {tps:8.1f} tok/s", file=sys.stderr)
    print(json.dumps(dict(steps=STEPS, cpu=cpu_name(), results=results), indent=1))
    print("\n| model | format | threads | tok/s | GFLOP/s | weights GB/s |")
    print("|---|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['format']} | {r['threads']} | {r['tok_s']:.1f} | {r['gflop_s']:.1f} | {r['weights_gb_s']:.1f} |")


def cpu_name():
    try:
        return re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    except (OSError, AttributeError):
        return "unknown"


if __name__ == "__main__":
    main()
