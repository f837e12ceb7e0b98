"""compare.py: several models side by side on a task's held-out prompts, best-of-n, and the curves of
several runs' logs."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT


def compare(*flags):
    return subprocess.run(
        [sys.executable, str(ROOT / "compare.py"), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_models_side_by_side_with_best_of_n_on_held_out_prompts(small_data, pretrained, tiny_ckpt, tmp_path):
    md = tmp_path / "compare.md"
    p = compare(
        f"--models=random:{pretrained / 'ckpt.pt'},trained:{tiny_ckpt}",
        "--reference=trained",
        f"--data_dir={small_data}",
        "--reward=length",
        "--target_len=20",
        "--max_new_tokens=40",
        "--start_len=8",
        "--prompts=8",
        "--best_of=1,2,4",
        "--num_show=2",
        "--val_windows=16",
        f"--report_path={md}",
        "--device=cpu",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    text = md.read_text()
    row = {
        m[1]: [float(x) for x in m[2].split(" | ")]
        for m in re.finditer(r"^\| ([^|]+?) \| ([-\d. |nan]+) \|$", text, re.M)
    }
    assert row["KL to the reference (nats/response)"][1] == 0.0  # the reference against itself
    assert row["fluency: NLL ratio under the reference"][1] == 1.0
    assert row["KL to the reference (nats/response)"][0] > 0 and row["fluency: NLL ratio under the reference"][0] > 1
    best_of = text[text.index("Best-of-n") :]
    best = [float(x) for x in re.search(r"^\| reward \| (.+) \|$", best_of, re.M)[1].split(" | ")]
    assert best == sorted(best)  # the best of more samples (the same ones, and more) is never worse
    assert text.count("- *random*") == 2 and (tmp_path / "compare.png").stat().st_size > 5000


def test_curves_plot_the_held_out_evaluations_of_several_runs(tmp_path):
    logs = []
    for name, extra in (("ppo", "eval/within_10pct"), ("dpo", "eval/judge")):  # each log has a measure the other lacks
        rows = [
            {"iter": i, "episode": 64 * i, "eval/kl": float(i), "eval/score": -1.0 + 0.1 * i, extra: 0.1 * i}
            for i in range(3)
        ]
        rows.insert(1, {"iter": 1, "episode": 64, "objective/kl": 0.5})  # a training row, no evaluation: left out
        path = tmp_path / name / f"{name}_log.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        logs.append(f"{name.upper()}:{path}")
    png = tmp_path / "reports" / "runs.png"
    p = compare(f"--curves={','.join(logs)}", f"--report_path={png}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert png.stat().st_size > 5000
    p = compare("--curves=PPO", f"--report_path={png}")
    assert p.returncode != 0 and p.stderr.strip() == "error: --curves=PPO: expected name:path,name:path,..."
