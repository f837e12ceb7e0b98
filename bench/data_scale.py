"""
Memory and speed of `download` and `pretokenize` as the text grows toward the full dataset.

    python bench/data_scale.py [--sizes=32,128,512,2048] [--vocab_size=512] [--work_dir=DIR]

For each size N the shared training text (../shared/tinystories/train-000.txt, 2.1 MB) is
tiled to about N MiB as a local source, beside the shared validation text. A tokenizer is
trained once on the shared text; then `tinystories.py download` and `tinystories.py
pretokenize --force` run each in a fresh process. Per step: wall seconds, MB/s of source
text, peak RSS (the largest resident set among the step's processes, as /usr/bin/time
reports it, from wait4) and peak PSS (the step's processes together, shared pages split
between them: what the machine must hold; sampled every 0.1 s from /proc, Linux only).
MB is 10^6 bytes. Prints a JSON line and a markdown table, and plots both against the size
(--plot). The tiled files live in a temporary directory (or --work_dir) and are removed.
Needs about 3x the largest size in free disk.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "tinystories")

parser = argparse.ArgumentParser()
parser.add_argument("--sizes", default="32,128,512,2048", help="MiB of training text, comma-separated")
parser.add_argument("--vocab_size", type=int, default=512)
parser.add_argument("--work_dir", default=None, help="where the tiled text goes (default: a temporary directory)")
parser.add_argument("--plot", default=os.path.join(ROOT, "reports", "data_scale.png"))
args = parser.parse_args()
sizes = [int(s) for s in args.sizes.split(",")]


def pss_mb(pid):
    """PSS of a process and all its descendants, in MB; 0 where /proc cannot tell."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total * 1024 / 1e6


def run(stage, *flags):
    """One tinystories.py stage in a fresh process: (seconds, peak RSS MB, peak PSS MB)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tinystories.py"), stage, *flags], stdout=subprocess.DEVNULL, stderr=err
        )
        peak_pss, done = [0.0], threading.Event()

        def sample():
            while not done.wait(0.1):
                peak_pss[0] = max(peak_pss[0], pss_mb(p.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        _, status, usage = os.wait4(p.pid, 0)  # this child's usage, its reaped workers included
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"tinystories.py {stage} failed:\n{err.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024 / 1e6, peak_pss[0]


def tile(src, dst, mib):
    """Write `src` repeated to about `mib` MiB, one copy at a time; returns the copies."""
    with open(src, "rb") as f:
        blob = f.read()
    copies = max(1, round(mib * 2**20 / len(blob)))
    with open(dst, "wb") as f:
        for _ in range(copies):
            f.write(blob)
    return copies


work = tempfile.mkdtemp(prefix="data_scale.", dir=args.work_dir)
results = []
try:
    vocab_dir = os.path.join(work, "vocab")
    run("download", f"--source={SHARED}", f"--data_dir={vocab_dir}")
    run("train_vocab", f"--vocab_size={args.vocab_size}", f"--data_dir={vocab_dir}")
    model = os.path.join(vocab_dir, f"tok{args.vocab_size}.model")
    stories = sum(
        1 for line in open(os.path.join(SHARED, "train-000.txt"), encoding="utf-8") if line == "<|endoftext|>\n"
    )
    for mib in sizes:
        source, data_dir = os.path.join(work, f"source{mib}"), os.path.join(work, f"data{mib}")
        os.makedirs(source)
        copies = tile(os.path.join(SHARED, "train-000.txt"), os.path.join(source, "train-000.txt"), mib)
        shutil.copy(os.path.join(SHARED, "valid-000.txt"), source)
        mb = sum(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source)) / 1e6
        row = {"size_mib": mib, "text_mb": round(mb, 1), "train_stories": copies * stories}
        steps = {
            "download": [f"--source={source}"],
            "pretokenize": [f"--vocab_size={args.vocab_size}", f"--tokenizer={model}", "--force"],
        }
        for stage, flags in steps.items():
            seconds, rss, pss = run(stage, *flags, f"--data_dir={data_dir}")
            row[stage] = {
                "seconds": round(seconds, 2),
                "mb_per_s": round(mb / seconds, 2),
                "peak_rss_mb": round(rss),
                "peak_pss_mb": round(pss),
            }
            print(f"{mb:.0f} MB {stage}: {seconds:.1f} s, peak RSS {rss:.0f} MB, PSS {pss:.0f} MB", file=sys.stderr)
        results.append(row)
        shutil.rmtree(source)
        shutil.rmtree(data_dir)
finally:
    shutil.rmtree(work, ignore_errors=True)

print(
    json.dumps({"bench": "data_scale", "vocab_size": args.vocab_size, "processes": os.cpu_count(), "results": results})
)
print(f"\ndownload and pretokenize (tok{args.vocab_size}, {os.cpu_count()} processes), each in a fresh process\n")
print(
    "| text MB | train stories | download s | MB/s | peak RSS MB | peak PSS MB "
    "| pretokenize s | MB/s | peak RSS MB | peak PSS MB |\n|---|---|---|---|---|---|---|---|---|---|"
)
for r in results:
    d, p = r["download"], r["pretokenize"]
    print(
        f"| {r['text_mb']} | {r['train_stories']:,} | {d['seconds']} | {d['mb_per_s']} | {d['peak_rss_mb']} "
        f"| {d['peak_pss_mb']} "
        f"| {p['seconds']} | {p['mb_per_s']} | {p['peak_rss_mb']} | {p['peak_pss_mb']} |"
    )

fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(10, 4))
x = [r["text_mb"] for r in results]
for stage, color in (("download", "tab:blue"), ("pretokenize", "tab:orange")):
    ax_mem.plot(x, [r[stage]["peak_rss_mb"] for r in results], "o-", color=color, label=f"{stage}, peak RSS")
    ax_mem.plot(
        x, [r[stage]["peak_pss_mb"] for r in results], "s--", color=color, label=f"{stage}, peak PSS (all processes)"
    )
    ax_speed.plot(x, [r[stage]["mb_per_s"] for r in results], "o-", color=color, label=stage)
for ax, ylabel in ((ax_mem, "MB"), (ax_speed, "MB of text / s")):
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:.0f}" for v in x])
    ax.minorticks_off()
    ax.set_xlabel("text (MB)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
ax_mem.set_title("peak memory")
ax_speed.set_title(f"throughput ({os.cpu_count()} processes)")
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
fig.savefig(args.plot, dpi=120)
print(f"\nwrote {args.plot}")
