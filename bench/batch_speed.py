"""
Batched speed of the C engine (csrc/batch.h through engine.py): decoding throughput at B parallel
sequences (generate: one token per sequence a step, sampled at temperature 1 with a stream of its own,
no stop token, so every sequence runs its full length), scoring throughput (score: B sequences of
steps + 1 tokens, every position through the forward at once) and the time of a weight refresh
(Model.update, as the RL loop runs it each iteration), on random-weight models of model.py's presets:
(a) the default shape in fp32, (b) llama2.c's 15M in Q8_0. With --llama_cpp=DIR (a llama.cpp build
with bin/llama-batched-bench), llama.cpp decodes the same model, exported to GGUF by export.py
(q8_0 or fp32, as ours), at the same batch sizes and threads, one prompt token and --steps tokens
each (its S_TG t/s: decoding alone, no sampling). With --torch, model.py's batched generate (what the
RL loop runs today) samples the same batches at temperature 1 with torch's threads set to --threads.
Prints a JSON line and markdown tables.

    python bench/batch_speed.py
    python bench/batch_speed.py --threads=2 --steps=226 --torch --llama_cpp=../llama.cpp/build
    python bench/batch_speed.py --arch=x86-64-v3    # the AVX2 build of the engine
    python bench/batch_speed.py --kv_cache=f16      # our fp16 KV cache (half the bytes attention reads)
    python bench/batch_speed.py --group=64          # beside the engine's groups, 64 sequences decoded together

GRPO's rollouts are the default model's row at B=64 and --steps=226: 64 rollouts of 226 tokens,
beside PyTorch's batched generate (--torch) at the same batch.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import cpu_name  # noqa: E402
from csrc import engine  # noqa: E402
from export import llama2c_config, llama2c_weights, q80_group_size  # noqa: E402
from model import PRESETS, ModelArgs, Transformer  # noqa: E402

TOKENIZERS = {512: "tok512.model", 32000: "tokenizer.model"}  # in ../shared/models/llama2c/, for GGUF files
MODELS = {"default": "fp32", "15M": "q8_0"}


def random_model(preset):
    torch.manual_seed(0)
    return Transformer(ModelArgs(**PRESETS[preset])).eval()


def best_of(runs, *fns):
    """The median seconds of runs calls of fn after one warm-up call, for each of fns (their calls
    alternate, so that a slow spell of the machine falls on all of them); one fn: its median."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    medians = [statistics.median(t) for t in times]
    return medians if len(fns) > 1 else medians[0]


def ours(model, fmt, batches, steps, runs, lib, kv_cache, group):
    """(decode (tok/s, seconds) by B, score (tok/s, seconds) at the largest B, refresh seconds, and the
    decoding seconds by B in groups of `group` if given) of the engine; a refresh is Model.update with
    every weight (copied, or quantised, then packed)."""
    c, w = llama2c_config(model), llama2c_weights(model)
    version = 2 if fmt == "q8_0" else 1
    m = engine.Model.from_weights(c, w, version, q80_group_size(c.dim, c.hidden_dim), lib=lib, kv_cache=kv_cache)
    m._reserve(max(batches))
    refresh = best_of(runs, lambda: m.update(w))
    decode, grouped = {}, {}
    for B in batches:
        runs_of = [lambda g=g: m.generate([[1]] * B, steps, 1.0, seeds=range(1, B + 1), group=g) for g in (0, group)]
        seconds = best_of(runs, *runs_of[: 2 if group else 1])
        if group:
            seconds, grouped[B] = seconds
        decode[B] = (B * steps / seconds, seconds)
    B = max(batches)
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (B, steps + 1)).astype(np.int32)
    seconds = best_of(runs, lambda: m.score(tokens, steps + 1, 1))
    return decode, (B * steps / seconds, seconds), refresh, grouped


def pytorch(model, batches, steps, runs):
    """model.py's batched generate: (tok/s, seconds) by B."""
    out = {}
    for B in batches:
        generator = torch.Generator().manual_seed(0)
        seconds = best_of(runs, lambda: model.generate([[1]] * B, steps, 1.0, generator=generator))
        out[B] = (B * steps / seconds, seconds)
    return out


def llama_cpp(build, model, fmt, batches, steps, threads, tmp):
    """llama-batched-bench's decoding tok/s (S_TG) by B on the model exported to GGUF by export.py."""
    ckpt, gguf = os.path.join(tmp, "ckpt.pt"), os.path.join(tmp, f"model-{fmt}.gguf")
    torch.save({"model": model.state_dict(), "model_args": asdict(model.params)}, ckpt)
    tokenizer = os.path.join(ROOT, "..", "shared", "models", "llama2c", TOKENIZERS[model.params.vocab_size])
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "export.py"),
            gguf,
            f"--checkpoint={ckpt}",
            f"--dtype={fmt}",
            f"--tokenizer={tokenizer}",
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    out = subprocess.run(
        [
            os.path.join(build, "bin", "llama-batched-bench"),
            "-m",
            gguf,
            "-c",
            str(max(batches) * (steps + 1)),
            "-b",
            "2048",
            "-ub",
            "512",
            "-npp",
            "1",
            "-ntg",
            str(steps),
            "-npl",
            ",".join(map(str, batches)),
            "-t",
            str(threads),
            "--output-format",
            "jsonl",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["pl"]: r["speed_tg"] for r in rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--batches", default="1,8,64", help="comma-separated B")
    parser.add_argument("--steps", type=int, default=128, help="new tokens a sequence (at most seq_len - 1)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS (and llama.cpp's -t)")
    parser.add_argument("--runs", type=int, default=1, help="timed runs after a warm-up (the median is reported)")
    parser.add_argument("--arch", default="native", help="make's ARCH for the engine library")
    parser.add_argument("--llama_cpp", help="a llama.cpp build directory with bin/llama-batched-bench")
    parser.add_argument("--torch", action="store_true", help="also time model.py's batched generate")
    parser.add_argument("--kv_cache", default="f32", choices=["f32", "f16"], help="our engine's KV cache type")
    parser.add_argument("--group", type=int, default=0, help="also decode in groups of this many, alternating runs")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before the library starts OpenMP
    torch.set_num_threads(args.threads)
    batches = list(map(int, args.batches.split(",")))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        lib_path = os.path.join(tmp, "libengine.so")
        subprocess.run(["make", "-s", "-B", f"ARCH={args.arch}", f"LIB={lib_path}", lib_path], check=True, cwd=ROOT)
        lib = engine.load(lib_path)
        if not args.llama_cpp:
            print("llama.cpp: skipped (no --llama_cpp=DIR, a build with bin/llama-batched-bench)", file=sys.stderr)
        for name in args.models.split(","):
            fmt, model = MODELS[name], random_model(name)
            steps = min(args.steps, model.params.max_seq_len - 1)
            decode, score, refresh, grouped = ours(
                model, fmt, batches, steps, args.runs, lib, args.kv_cache, args.group
            )
            theirs = llama_cpp(args.llama_cpp, model, fmt, batches, steps, args.threads, tmp) if args.llama_cpp else {}
            torch_decode = pytorch(model, batches, steps, args.runs) if args.torch else {}
            for B in batches:
                row = dict(
                    model=name,
                    format=fmt,
                    B=B,
                    steps=steps,
                    ours_tok_s=round(decode[B][0], 1),
                    ours_seconds=round(decode[B][1], 3),
                )
                if B in theirs:
                    row.update(
                        llama_cpp_tok_s=round(theirs[B], 1), ours_vs_llama_cpp=round(decode[B][0] / theirs[B], 2)
                    )
                if B in grouped:
                    row.update(group_seconds=round(grouped[B], 3), ours_vs_group=round(grouped[B] / decode[B][1], 2))
                if B in torch_decode:
                    row.update(
                        torch_seconds=round(torch_decode[B][1], 3),
                        ours_vs_torch=round(torch_decode[B][1] / decode[B][1], 2),
                    )
                results.append(row)
            results.append(
                dict(
                    model=name,
                    format=fmt,
                    B=max(batches),
                    steps=steps,
                    score_tok_s=round(score[0], 1),
                    score_seconds=round(score[1], 3),
                    refresh_ms=round(1e3 * refresh, 2),
                )
            )
            print(" ".join(f"{k}={v}" for r in results[-len(batches) - 1 :] for k, v in r.items()), file=sys.stderr)
    report = dict(
        cpu=cpu_name(),
        arch=args.arch,
        kernels=engine.kernels(lib),
        threads=args.threads,
        kv_cache=args.kv_cache,
        group=args.group,
        results=results,
    )
    print(json.dumps(report))
    print(
        f"\n{report['cpu']}, ARCH={args.arch} (kernels: {report['kernels']}), {args.threads} threads, "
        f"{args.kv_cache} KV cache; the engine's groups" + (f", and groups of {args.group}" if args.group else "")
    )
    table(
        [
            "model",
            "format",
            "B",
            "steps",
            "ours_tok_s",
            "ours_seconds",
            "llama_cpp_tok_s",
            "ours_vs_llama_cpp",
            "torch_seconds",
            "ours_vs_torch",
            "group_seconds",
            "ours_vs_group",
        ],
        [r for r in results if "ours_tok_s" in r],
    )
    table(
        ["model", "format", "B", "steps", "score_tok_s", "score_seconds", "refresh_ms"],
        [r for r in results if "score_tok_s" in r],
    )


def table(columns, rows):
    """A markdown table of rows (dicts) by column, '-' where a row has none (llama.cpp or torch not run)."""
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in columns) + " |")


if __name__ == "__main__":
    main()
