"""
Generation speed of the C engine: ./run (the runomp build for --arch) on random-weight models of
llama2.c's sizes, fp32 (version 1) and Q8_0 (version 2), beside the same models in llama2.c's
run.c and runq.c (--llama2c=DIR, its source) and llama.cpp's llama-bench (--llama_cpp=DIR, a
build with llama-bench, llama-quantize and llama-convert-llama2c-to-ggml in DIR/bin), engines
alternating within each round. Each speed is also given as a share of the machine's read-bandwidth
roofline: the tok/s at which a plain OpenMP read loop (bench/bandwidth.c, same flags and threads)
reads what a token must read: the model's weights once, and the keys and values of the positions
before it at the run's mean position (fp32, as the engine caches them by default: 8% of a 42M Q8_0
token's bytes at 256 steps; --kv_cache=f16 runs ours with its fp16 cache, half those bytes, as
llama.cpp caches them). Reports medians as a JSON blob and a markdown table.

    python bench/run_speed.py
    python bench/run_speed.py --shapes=15M,42M --threads=2 --llama2c=../llama2.c --llama_cpp=../llama.cpp/build
    python bench/run_speed.py --arch=x86-64-v3 ...   # the AVX2 path (and AVX2 builds of the anchors)
    python bench/run_speed.py --shapes=110M --steps=1024 --kv_cache=f16   # the whole context

Generation is greedy (-t 0, 256 tokens from BOS by default, at most the model's seq_len): with
random weights the next-token distribution is flat, so top-p sampling would sort the whole
vocabulary every step, which no real model makes it do. Token 1 (BOS, which stops generation) gets
the same embedding as token 0, so its logit ties with token 0's and greedy decoding, which keeps the
first maximum, never picks it.
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
from common import cpu_name  # noqa: E402
from csrc import formats  # noqa: E402
from csrc.formats import Config  # noqa: E402
from model import PRESETS, ModelArgs  # noqa: E402


def llama2c_shape(preset, **overrides):
    """An engine Config of one of model.py's presets (llama2.c's sizes), with overrides."""
    a = ModelArgs(**{**PRESETS[preset], **overrides})
    return Config(a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len)


SHAPES = {
    "260K": llama2c_shape("260K"),
    "15M": llama2c_shape("15M"),
    "15M-GQA-4096": llama2c_shape("15M", n_kv_heads=2, vocab_size=4096),
    "42M": llama2c_shape("42M"),
    "110M": llama2c_shape("110M"),
}
FORMATS = ["fp32", "q8_0"]


def group_size(c):
    """export.py's Q8_0 group size, 64 halved until it divides dim, and here hidden_dim too."""
    gs = 64
    while c.dim % gs or c.hidden_dim % gs:
        gs //= 2
    return gs


def matmul_params(c):
    kv_dim = c.dim * c.n_kv_heads // c.n_heads
    return c.n_layers * (2 * c.dim * c.dim + 2 * c.dim * kv_dim + 3 * c.dim * c.hidden_dim) + c.vocab_size * c.dim


def weight_bytes_per_token(c, fmt):
    params = matmul_params(c)
    return params * (1 + 4 / group_size(c)) if fmt == "q8_0" else params * 4


def kv_bytes_per_token(c, steps, kv_cache):
    """The keys and values a token's attention reads, at the mean position of a run of steps."""
    kv_dim = c.dim * c.n_kv_heads // c.n_heads
    return c.n_layers * 2 * kv_dim * (2 if kv_cache == "f16" else 4) * (steps + 1) / 2


def sh(*cmd, env=None):
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=True, env=env, cwd=ROOT)


# ---------------------------------------------------------------------------
# the engines: each prepares its files for a model once, then times one generation


def generate(cmd, threads):
    """run.c-style generation: the text goes to /dev/null, stderr (its tok/s) is returned. A pipe
    read by this process would wake it at every token (run.c flushes each one) and take a core
    from the engine: 7% of 15M's speed at 2 threads here, a cost llama-bench, which prints
    nothing while it generates, does not pay."""
    return subprocess.run(
        list(map(str, cmd)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        cwd=ROOT,
    ).stderr


def achieved_tok_s(stderr):
    return float(re.search(r"achieved tok/s: ([0-9.]+)", stderr).group(1))


class Ours:
    name = "ours"

    def __init__(self, tmp, arch, kv_cache):
        self.kv_cache = kv_cache
        self.bin = os.path.join(tmp, "run")
        sh("make", "-s", "-B", "runomp", f"ARCH={arch}", f"BIN={self.bin}")
        self.kernels = None  # read from run's stderr

    def prepare(self, models, tokenizer):
        self.models, self.tokenizer = models, tokenizer

    def tok_s(self, fmt, threads, steps):
        stderr = generate(
            [self.bin, self.models[fmt], "-z", self.tokenizer, "-t", "0", "-n", steps, "-k", self.kv_cache], threads
        )
        self.kernels = re.search(r"kernels: ([\w-]+)", stderr).group(1)
        return achieved_tok_s(stderr)


class Llama2c:
    """run.c (fp32, version 0 files) and runq.c (Q8_0, version 2) from llama2.c's source, built as
    its `make runomp` does, with -march=ARCH."""

    name = "llama2.c"

    def __init__(self, tmp, arch, source):
        self.bins = {}
        for fmt, src in [("fp32", "run.c"), ("q8_0", "runq.c")]:
            self.bins[fmt] = os.path.join(tmp, f"llama2c-{fmt}")
            sh(
                os.environ.get("CC", "cc"),
                "-Ofast",
                "-fopenmp",
                f"-march={arch}" if arch != "portable" else "-O3",
                os.path.join(source, src),
                "-lm",
                "-o",
                self.bins[fmt],
            )

    def prepare(self, models, tokenizer):
        self.models, self.tokenizer = models, tokenizer

    def tok_s(self, fmt, threads, steps):
        model = self.models["fp32_v0" if fmt == "fp32" else fmt]
        return achieved_tok_s(generate([self.bins[fmt], model, "-z", self.tokenizer, "-t", "0", "-n", steps], threads))


class LlamaCpp:
    """llama-bench's text generation (tg256) on GGUF files made by llama.cpp's own tools: the
    version 0 file through llama-convert-llama2c-to-ggml (f32), then llama-quantize (Q8_0)."""

    name = "llama.cpp"

    def __init__(self, tmp, build):
        self.tmp, self.bin = tmp, os.path.join(build, "bin")

    def prepare(self, models, tokenizer):
        f32 = models["fp32_v0"] + ".gguf"
        sh(
            os.path.join(self.bin, "llama-convert-llama2c-to-ggml"),
            "--copy-vocab-from-model",
            tokenizer,
            "--llama2c-model",
            models["fp32_v0"],
            "--llama2c-output-model",
            f32,
        )
        q8 = models["fp32_v0"] + ".q8_0.gguf"
        sh(os.path.join(self.bin, "llama-quantize"), f32, q8, "Q8_0")
        self.models = {"fp32": f32, "q8_0": q8}

    def tok_s(self, fmt, threads, steps):
        r = sh(
            os.path.join(self.bin, "llama-bench"),
            "-m",
            self.models[fmt],
            "-p",
            0,
            "-n",
            steps,
            "-t",
            threads,
            "-r",
            1,
            "-o",
            "json",
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        return json.loads(r.stdout)[0]["avg_ts"]


def write_models(name, c, tmp):
    w = formats.random_weights(c, shared=True, seed=0)
    w["token_embedding_table"][1] = w["token_embedding_table"][0]  # BOS never wins greedy decoding
    paths = {}
    for fmt, version in [("fp32", 1), ("q8_0", 2), ("fp32_v0", 0)]:
        paths[fmt] = os.path.join(tmp, f"{name}-{fmt}.bin")
        formats.write_checkpoint(paths[fmt], c, w, version, group_size(c))
    tokenizer = os.path.join(tmp, f"tok{c.vocab_size}.bin")
    formats.write_tokenizer(tokenizer, *formats.synthetic_tokenizer(c.vocab_size))
    return paths, tokenizer


def bandwidth(tmp, arch, nbytes, threads):
    """GB/s of the best pass of bench/bandwidth.c over nbytes with `threads` threads."""
    exe = os.path.join(tmp, "bandwidth")
    if not os.path.exists(exe):
        sh(
            os.environ.get("CC", "cc"),
            "-Ofast",
            "-fopenmp",
            f"-march={arch}" if arch != "portable" else "-O3",
            os.path.join(ROOT, "bench", "bandwidth.c"),
            "-o",
            exe,
        )
    return float(sh(exe, int(nbytes), 1.0, env={**os.environ, "OMP_NUM_THREADS": str(threads)}).stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, from: " + ", ".join(SHAPES))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--threads", default="1,2", help="comma-separated OMP_NUM_THREADS values")
    parser.add_argument("--runs", type=int, default=3, help="rounds per measurement (the median is reported)")
    parser.add_argument("--arch", default="native", help="make's ARCH for our build and -march for the anchors")
    parser.add_argument("--llama2c", help="llama2.c's source directory (run.c, runq.c)")
    parser.add_argument("--llama_cpp", help="a llama.cpp build directory (bin/llama-bench, ...)")
    parser.add_argument("--steps", type=int, default=256, help="tokens generated (at most each model's seq_len)")
    parser.add_argument("--kv_cache", default="f32", choices=["f32", "f16"], help="our engine's KV cache type")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        engines = [Ours(tmp, args.arch, args.kv_cache)]
        if args.llama2c:
            engines.append(Llama2c(tmp, args.arch, args.llama2c))
        if args.llama_cpp:
            engines.append(LlamaCpp(tmp, args.llama_cpp))
        threads = list(map(int, args.threads.split(",")))
        peaks = {t: {size: bandwidth(tmp, args.arch, size, t) for size in (16e6, 1e9)} for t in threads}
        for name in args.shapes.split(","):
            c = SHAPES[name]
            steps = min(args.steps, c.seq_len)
            paths, tokenizer = write_models(name, c, tmp)
            for e in engines:
                e.prepare(paths, tokenizer)
            for fmt in args.formats.split(","):
                weight_bytes, kv_bytes = weight_bytes_per_token(c, fmt), kv_bytes_per_token(c, steps, args.kv_cache)
                nbytes = weight_bytes + kv_bytes
                for t in threads:
                    speeds = {e.name: [] for e in engines}
                    for _ in range(args.runs):  # one run of each engine a round: drift hits all alike
                        for e in engines:
                            speeds[e.name].append(e.tok_s(fmt, t, steps))
                    roof_gb_s = bandwidth(tmp, args.arch, nbytes, t)
                    row = dict(
                        model=name,
                        format=fmt,
                        threads=t,
                        steps=steps,
                        weights_mb=round(weight_bytes / 1e6, 1),
                        kv_mb=round(kv_bytes / 1e6, 1),
                        roofline_gb_s=roof_gb_s,
                        roofline_tok_s=round(roof_gb_s * 1e9 / nbytes, 1),
                    )
                    for e in engines:
                        row[e.name] = round(statistics.median(speeds[e.name]), 1)
                        row[e.name + "_runs"] = [round(s, 1) for s in speeds[e.name]]
                    row["ours_share_of_roofline"] = round(row["ours"] / row["roofline_tok_s"], 3)
                    for anchor in ("llama2.c", "llama.cpp"):
                        if anchor in row:
                            row["ours_vs_" + anchor] = round(row["ours"] / row[anchor], 2)
                    results.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items() if not k.endswith("_runs")), file=sys.stderr)
    report = dict(
        kv_cache=args.kv_cache,
        cpu=cpu_name(),
        arch=args.arch,
        kernels=engines[0].kernels,
        bandwidth_gb_s={t: {"16MB": p[16e6], "1GB": p[1e9]} for t, p in peaks.items()},
        results=results,
    )
    print(json.dumps(report, indent=1))
    print(
        f"\n{report['cpu']}, ARCH={args.arch} (kernels: {report['kernels']}, {args.kv_cache} KV cache); "
        "read bandwidth, GB/s: "
        + "; ".join(f"{t} threads {p[16e6]:.0f} (16 MB) / {p[1e9]:.0f} (1 GB)" for t, p in peaks.items())
    )
    anchors = [e.name for e in engines[1:]]
    header = [
        "model",
        "format",
        "threads",
        "steps",
        "ours tok/s",
        *(f"{a} tok/s" for a in anchors),
        *(f"ours / {a}" for a in anchors),
        "roofline tok/s",
        "ours / roofline",
    ]
    print("\n| " + " | ".join(header) + " |")
    print("|---|---|---|" + "---:|" * (len(header) - 3))
    for r in results:
        cells = [
            r["model"],
            r["format"],
            r["threads"],
            r["steps"],
            r["ours"],
            *(r[a] for a in anchors),
            *(f"{r['ours_vs_' + a]:.2f}x" for a in anchors),
            r["roofline_tok_s"],
            f"{r['ours_share_of_roofline']:.0%}",
        ]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
