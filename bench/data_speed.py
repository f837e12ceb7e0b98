"""
Pretokenize throughput (MB of text per second) with 1 process and with all cores, in one run.

    python bench/data_speed.py [--vocab_size=4096] [--repeat=8] [--runs=3]

The shared TinyStories text is only ~2.9 MB, which sentencepiece encodes in well under a
second, so the bench tiles it `--repeat` times to measure steady throughput rather than
process start-up. Prints a JSON line and a markdown table; quotes the median of `--runs`.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tinystories  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--vocab_size", type=int, default=4096)
parser.add_argument("--repeat", type=int, default=8)
parser.add_argument("--runs", type=int, default=3)
parser.add_argument("--data_dir", type=str, default=tinystories.DATA_DIR, help="where the trained tokenizer is")
args = parser.parse_args()

model = tinystories.resolve_tokenizer(args.data_dir, args.vocab_size)
with tempfile.TemporaryDirectory() as tmp:
    data = {s: tinystories.load_text(args.data_dir, s) * args.repeat for s in tinystories.SPLITS}
    tinystories.write_text({s: [(stories, 0)] for s, stories in data.items()}, tmp, "bench")
    mb = sum(len(s.encode()) for split in data.values() for s in split) / 1e6
    workers = sorted({1, os.cpu_count()})
    seconds = {w: [] for w in workers}
    for _ in range(args.runs):  # interleave the settings so drift hits both alike
        for w in workers:
            t0 = time.perf_counter()
            tinystories.pretokenize(args.vocab_size, tmp, tokenizer=model, force=True, num_workers=w, quiet=True)
            seconds[w].append(time.perf_counter() - t0)

rows = [
    {
        "processes": w,
        "seconds": round(statistics.median(seconds[w]), 3),
        "mb_per_s": round(mb / statistics.median(seconds[w]), 2),
    }
    for w in workers
]
speedup = rows[-1]["mb_per_s"] / rows[0]["mb_per_s"]
print(
    json.dumps(
        {
            "bench": "data_speed",
            "vocab_size": args.vocab_size,
            "text_mb": round(mb, 2),
            "runs": args.runs,
            "results": rows,
            "speedup": round(speedup, 2),
        }
    )
)
print(f"\npretokenize, tok{args.vocab_size}, {mb:.1f} MB of text, median of {args.runs} runs\n")
print("| processes | seconds | MB/s |\n|---|---|---|")
for r in rows:
    print(f"| {r['processes']} | {r['seconds']} | {r['mb_per_s']} |")
print(f"\nall cores vs 1 process: {speedup:.2f}x")
