"""
RL speed on this machine: one iteration of an RL method, as the training loop runs it
(rl_train.next_batch, then the method's iteration), split into rollout (sampling), scoring (the
policy's and reference's log-probabilities, rewards, advantages) and optimisation seconds, for each
rollout engine (rollouts.py: PyTorch, or the C engine), beside Hugging Face TRL's GRPOTrainer on the
same model and settings (bench/trl_anchor.py, with --trl).

    python bench/rl_speed.py [--workloads=grpo,ppo,fork] [--engines=torch,c] [--threads=2] [--repeats=3]
    python bench/rl_speed.py --workloads= --checkpoint=out/sft_ckpt.pt --trl=/path/to/trl-venv/bin/python --rounds=3
    python bench/rl_speed.py --workloads=grpo --engines=c --attention=torch --dtype=bfloat16 --compile  # the update
    python bench/rl_speed.py --workloads=fork --engines=c --fork=../FullLLM --fork_python=fork-venv/bin/python

Workloads (but fork260K: random weights, prompts of BOS and random tokens, no stop token: every
rollout runs to the length cap, the worst case):
  grpo  the default model, GRPO: 64 rollouts (8 prompts x 8) of up to 226 tokens (the context's room
        after 30 prompt tokens), 8 optimizer steps of 8, learning rate 1e-4, beta 0.04, temperature 1
  ppo   the same shape and rollouts, PPO (value head, GAE), 1 epoch of 8 steps of 8
  fork  the llama2.c PPO fork's iteration on the 260K preset: 400 rollouts (8 x 50) of up to 300 new
        tokens, 4 epochs of 8 minibatches of 50; beside it, with --fork (a checkout of the fork,
        github.com/schinger/FullLLM, and --fork_python, a Python with its requirements), the fork itself
        on this machine: its README's PPO command line on the CPU (fp32, no torch.compile), from
        Karpathy's stories260K with prompts from the shared stories (its rollouts end where the model
        ends its story), for --repeats iterations after a first one
  fork260K  the fork's workload on the fork's own model, prompts and stop: stories260K, prompts of BOS
        and the first 0-29 tokens of a shared training story in its tokenizer, rollouts ending at the
        BOS that ends its stories (the fork's iteration like for like)
  instruct (--checkpoint=SFT checkpoint) GRPO on the instruct task as train.py runs it, 64 rollouts an
        iteration (8 headers x 8) to their own ends, 8 steps of 8, learning rate 1e-4, beta 0.04,
        temperature 1, for --iterations; beside it, with --trl (a venv with trl installed, see
        bench/trl_anchor.py), TRL's GRPOTrainer on the same checkpoint exported to transformers, the
        same settings, data and reward; skipped with a message without it
Each setting runs --repeats times after a warm-up iteration, the engines' iterations alternating
(instruct: the iterations after the first, in each of --rounds alternating runs of ours and TRL's);
the table gives the medians, and for instruct the mean reward over the iterations and TRL's time
over ours, round by round; for fork, the fork's time over ours. Prints a JSON line and a markdown
table naming the CPU.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import sentencepiece as spm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import configurator  # noqa: E402
import export  # noqa: E402
import grpo  # noqa: E402
import ppo  # noqa: E402
import rl  # noqa: E402
import rl_train  # noqa: E402
import sources  # noqa: E402
import tasks  # noqa: E402
from common import autocast, cpu_name, reuse_freed_memory  # noqa: E402
from csrc import formats  # noqa: E402
from model import PRESETS, ModelArgs, Transformer  # noqa: E402
from rollouts import Engines  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared")

# name: (method, preset, rollouts, group size, new tokens, epochs, minibatch size, prompt tokens)
WORKLOADS = {
    "grpo": (grpo, "default", 64, 8, 226, 1, 8, 30),
    "ppo": (ppo, "default", 64, 1, 226, 1, 8, 30),
    "fork": (ppo, "260K", 400, 1, 300, 4, 50, 30),
    "fork260K": (ppo, "260K", 400, 1, 300, 4, 50, 30),
}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--workloads", default="grpo,ppo,fork", help="comma-separated: " + ", ".join(WORKLOADS))
parser.add_argument("--engines", default="torch,c", help="comma-separated rollout engines: torch, c")
parser.add_argument("--threads", type=int, default=os.cpu_count())
parser.add_argument("--attention", default="auto", help="the forward passes' attention: auto, c or torch (model.py)")
parser.add_argument("--dtype", default="float32", help="autocast of the forward passes and updates: float32, bfloat16")
parser.add_argument("--compile", action="store_true", help="the update's forward and backward through torch.compile")
parser.add_argument("--repeats", type=int, default=3, help="timed iterations a setting, after one warm-up")
parser.add_argument("--checkpoint", default="", help="an SFT checkpoint: GRPO on the instruct task, ours and TRL's")
parser.add_argument("--iterations", type=int, default=20, help="the instruct task's iterations")
parser.add_argument("--trl", default="", help="a Python with trl installed (bench/trl_anchor.py): TRL's GRPO too")
parser.add_argument("--rounds", type=int, default=1, help="instruct: runs of ours and TRL's, alternating (medians)")
parser.add_argument("--fork", default="", help="a checkout of the llama2.c PPO fork: its own iteration too")
parser.add_argument("--fork_python", default=sys.executable, help="a Python with the fork's requirements (tyro)")
# the fork's README command line for PPO from stories260K, on the CPU
FORK_FLAGS = """--batch_size=50 --max_seq_len=512 --gradient_accumulation_steps=1 --vocab_source=custom --vocab_size=512
    --dim=64 --n_layers=5 --n_heads=8 --n_kv_heads=4 --multiple_of=4 --learning_rate=1e-4 --dropout=0.00
    --weight_decay=0.01 --beta2=0.99 --warmup_iters=1000 --eval_iters=5 --eval_only=False --init_from=resume
    --ppo=True --decay_lr=False --always_save_checkpoint=False --start_len=30 --device=cpu --compile=False""".split()


def make_run(workload, engine, seed, attention="auto"):
    """A Run of the workload's method on a random model of its shape, prompts of BOS + random tokens and
    the length reward, as rl_train.setup makes one from a checkpoint."""
    method, preset, n, group, new_tokens, epochs, minibatch, prompt_len = WORKLOADS[workload]
    torch.manual_seed(seed)
    shape = PRESETS[preset]
    policy = rl.Policy(Transformer(ModelArgs(**shape)), value_head=getattr(method, "VALUE_HEAD", False)).eval()
    reference = rl.Policy(Transformer(ModelArgs(**shape))).eval().requires_grad_(False)
    reference.model.load_state_dict(policy.model.state_dict())
    for p in (policy, reference):
        p.model.set_attention(attention)
    cfg = {
        **configurator.split(method.config)[0],
        "batch_size": minibatch,
        "num_mini_batches": n // minibatch,
        "max_new_tokens": new_tokens,
        "ppo_epochs": epochs,
        "temperature": 1.0,
        "learning_rate": 1e-4,
        "init_kl_coef": 0.04 if method is grpo else 0.2,
        "target_len": 200,
        "seed": seed,
    }
    if group > 1:
        cfg["group_size"] = group
    rng, stop = np.random.default_rng(seed), ()
    if workload == "fork260K":  # the fork's model, prompts and stop token (stories260K ends a story with BOS)
        model, tok = stories260k()
        for p in (policy, reference):
            p.model.load_state_dict(model.state_dict())
        stories, stop = story_tokens(tok, "train-000.txt"), (tok.bos_id(),)

        def draw(_, k):
            return [[tok.bos_id(), *stories[i][: rng.integers(prompt_len)]] for i in rng.integers(len(stories), size=k)]
    else:

        def draw(_, k):
            return [[1] + rng.integers(3, shape["vocab_size"], prompt_len - 1).tolist() for _ in range(k)]

    def score(batch):
        return tasks.length_reward(batch.lengths(), cfg["target_len"])

    engines = Engines(policy.model, reference.model) if engine == "c" else None
    return rl_train.run_of(
        method, policy, reference, tasks.Task("length", draw, [], score, lambda *a: {}), cfg, stop, engines
    )


def iteration(run, it, workload):
    """One iteration's phases, in seconds."""
    run.iter_num, run.rng = it, np.random.default_rng([run.cfg["seed"], 0, it])
    run.shuffle = torch.Generator().manual_seed(it)
    t0 = time.perf_counter()
    batch = rl_train.next_batch(run)
    stats = run.method.iteration(run, batch)
    total = time.perf_counter() - t0
    _, _, n, _, new_tokens, *_ = WORKLOADS[workload]
    assert len(batch.tokens) == n
    if not run.stop_tokens:
        assert batch.mask.sum(1).eq(new_tokens).all()  # no stop token: every rollout ran to full length
    rollout, optimisation = run.timing["time/rollout"], stats["time/optimize_step"]
    return {
        "rollout": rollout,
        "scoring": total - rollout - optimisation,
        "optimisation": optimisation,
        "total": total,
        "mean_length": batch.row_lengths().float().mean().item(),
    }


def ours(workload, engines, args):
    """The medians of each phase for each rollout engine, their iterations alternating (after a warm-up
    iteration each), so that a slow spell of a shared machine falls on all of them."""
    runs = {}
    for engine in engines:
        runs[engine] = run = make_run(workload, engine, seed=0, attention=args.attention)
        run.dtype, run.ctx = args.dtype, autocast("cpu", args.dtype)
        if args.compile:
            run.train_policy = torch.compile(run.policy, dynamic=True)
        iteration(run, 0, workload)
    times = {engine: [] for engine in engines}
    for it in range(1, args.repeats + 1):
        for engine, run in runs.items():
            times[engine].append(iteration(run, it, workload))
    return {engine: {k: statistics.median(r[k] for r in t) for k in t[0]} for engine, t in times.items()}


def run_or_exit(argv, env, who):
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"error: {who} failed: {(p.stderr.strip().splitlines() or [p.returncode])[-1]}")
    return p


def instruct_runs(args):
    """GRPO on the instruct task from an SFT checkpoint (--checkpoint) for --iterations iterations, ours
    through train.py with each rollout engine and, with --trl, TRL's GRPOTrainer (bench/trl_anchor.py)
    on the checkpoint exported to transformers, every setting the same: the medians of each phase
    after the first iteration, and each iteration's mean reward (their curves should agree)."""
    import checkpoint

    ckpt = checkpoint.load(args.checkpoint, kinds=("sft",))
    data_dir = checkpoint.data_dir_of(ckpt, args.checkpoint, "data")
    n, settings = (
        args.iterations,
        dict(group_size=8, batch_size=8, num_mini_batches=8, learning_rate=1e-4, temperature=1.0, seed=1337),
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            run_dir = os.path.join(tmp, engine)
            os.makedirs(run_dir)
            os.symlink(os.path.abspath(args.checkpoint), os.path.join(run_dir, "sft_ckpt.pt"))
            argv = [
                sys.executable,
                os.path.join(ROOT, "train.py"),
                "--rl=grpo",
                "--reward=instruct",
                f"--out_dir={run_dir}",
                *(f"--{k}={v}" for k, v in settings.items()),
                "--init_kl_coef=0.04",
                f"--max_iters={n}",
                f"--eval_interval={n}",
                "--eval_prompts=8",
                f"--rollout_engine={engine}",
                f"--attention={args.attention}",
                f"--compile={args.compile}",
            ]
            run_or_exit(argv, env, f"our run ({engine})")
            rows = [json.loads(line) for line in open(os.path.join(run_dir, "grpo_log.jsonl"))][1:]
            phase = {
                "rollout": "time/rollout",
                "scoring": ("time/forward_pass", "time/score"),
                "optimisation": "time/optimize_step",
                "total": "time/total",
            }
            med = {
                k: statistics.median(sum(r[x] for x in (v if isinstance(v, tuple) else (v,))) for r in rows[1:])
                for k, v in phase.items()
            }
            out.append(
                {
                    "workload": "instruct",
                    "who": f"ours, rollouts by {engine}",
                    **med,
                    "reward": [r["env/reward_mean"] for r in rows],
                }
            )
        if args.trl:
            hf = os.path.join(tmp, "hf")
            with torch.no_grad():
                export.export_hf(checkpoint.model_from(ckpt), hf, checkpoint.tokenizer_of(ckpt, args.checkpoint))
            argv = [
                args.trl,
                os.path.join(ROOT, "bench", "trl_anchor.py"),
                "--mode=grpo",
                f"--model={hf}",
                f"--data_dir={data_dir}",
                f"--vocab_size={ckpt['model_args']['vocab_size']}",
                f"--iterations={n}",
                "--beta=0.04",
                f"--threads={args.threads}",
                *(f"--{k}={v}" for k, v in settings.items()),
            ]
            r = json.loads(run_or_exit(argv, env, "TRL's run").stdout.strip().splitlines()[-1])
            ph = r["phases"]
            out.append(
                {
                    "workload": "instruct",
                    "who": "TRL GRPOTrainer",
                    "rollout": ph["rollout"],
                    "scoring": ph["forward_pass"] + ph["score"],
                    "optimisation": ph["optimize"],
                    "total": r["seconds_per_iteration"],
                    "reward": r["reward_mean"],
                }
            )
        else:
            print(
                "instruct: TRL skipped (no --trl=PYTHON with trl installed; see bench/trl_anchor.py)", file=sys.stderr
            )
    return out


def stories260k():
    """Karpathy's stories260K (../shared), where the fork's PPO starts, and its tokenizer."""
    llama2c = os.path.join(SHARED, "models", "llama2c")
    model = export.model_from_llama2c(*formats.read_v0(os.path.join(llama2c, "stories260K.bin")))
    return model, spm.SentencePieceProcessor(model_file=os.path.join(llama2c, "tok512.model"))


def story_tokens(tok, name):
    """The tokens of each shared story in one of ../shared/tinystories' files."""
    return tok.encode([s.strip() for s in sources.read_stories(os.path.join(SHARED, "tinystories", name))])


def fork_run(args):
    """The llama2.c PPO fork's own iterations on this machine, in a scratch directory laid out as its
    train.py reads it: out/ckpt.pt (stories260K, whose value head the fork adds), data/tok512.model
    (stories260K's tokenizer) and data/tok512/*.bin (uint16 shards of BOS + story, the first its
    validation split) from the shared stories. The medians of each phase after the first iteration."""
    model, tok = stories260k()
    with tempfile.TemporaryDirectory() as tmp:
        for name in os.listdir(args.fork):
            if name.endswith(".py"):
                os.symlink(os.path.join(os.path.abspath(args.fork), name), os.path.join(tmp, name))
        os.makedirs(os.path.join(tmp, "data", "tok512"))
        os.makedirs(os.path.join(tmp, "out"))
        ckpt = {"model": model.state_dict(), "model_args": PRESETS["260K"], "iter_num": 1, "best_val_loss": 0.0}
        torch.save({**ckpt, "config": {"vocab_source": "custom"}}, os.path.join(tmp, "out", "ckpt.pt"))
        with open(os.path.join(tmp, "data", "tok512.model"), "wb") as f:
            f.write(tok.serialized_model_proto())
        for i, name in enumerate(("valid-000.txt", "train-000.txt")):
            tokens = [t for story in story_tokens(tok, name) for t in (tok.bos_id(), *story)]
            np.array(tokens, dtype=np.uint16).tofile(os.path.join(tmp, "data", "tok512", f"data{i:02d}.bin"))
        iterations = args.repeats + 1  # it counts from the checkpoint's iter_num, 1
        argv = [args.fork_python, "train.py", *FORK_FLAGS, "--out_dir=out", f"--max_iters={iterations}"]
        argv.append(f"--eval_interval={iterations + 1}")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        p = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"error: the fork's run failed: {(p.stderr.strip().splitlines() or [p.returncode])[-1]}")
    # each iteration prints 'q+r lengths avg N', '<iter> | reward R | lr L | <ms>ms', then its stats as JSON
    lines, rows = p.stdout.splitlines(), []
    for i, line in enumerate(lines):
        if " | reward " in line:
            end = lines.index("}", i)
            stats = json.loads("\n".join(lines[i + 1 : end + 1]))
            total = float(line.rsplit("| ", 1)[1].removesuffix("ms")) / 1000
            length = float(lines[i - 1].split()[-1])
            ppo_step = stats["time/ppo/total"]
            optimisation = stats["time/ppo/optimize_step"]
            rows.append(
                {
                    "rollout": total - ppo_step,
                    "scoring": ppo_step - optimisation,
                    "optimisation": optimisation,
                    "total": total,
                    "mean_length": length,
                }
            )
    if len(rows) != iterations:
        raise SystemExit(f"error: the fork printed {len(rows)} iterations of the {iterations} asked")
    return {k: statistics.median(r[k] for r in rows[1:]) for k in rows[0]}


def main(args):
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats={args.repeats}: must be >= 1")
    if args.fork and not os.path.isfile(os.path.join(args.fork, "ppo.py")):
        raise SystemExit(f"error: --fork={args.fork} is not a checkout of the fork (no ppo.py in it)")
    reuse_freed_memory()
    torch.set_num_threads(args.threads)
    results = []
    for workload in filter(None, args.workloads.split(",")):
        if workload not in WORKLOADS:
            raise SystemExit(f"error: unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
        for engine, r in ours(workload, args.engines.split(","), args).items():
            results.append({"workload": workload, "who": f"ours, rollouts by {engine}", **r})
            phases = ", ".join(f"{k} {r[k]:.2f} s" for k in ("rollout", "scoring", "optimisation", "total"))
            print(f"{workload} ours ({engine}): {phases}", file=sys.stderr)
    if any(w.startswith("fork") for w in args.workloads.split(",")):
        if args.fork:
            results.append({"workload": "fork", "who": "the llama2.c PPO fork", **fork_run(args)})
        else:
            print("fork: the fork itself skipped (no --fork=DIR, a checkout of it)", file=sys.stderr)
    if args.checkpoint:
        # ours and TRL's alternate, so that a slow spell of a shared machine falls on both
        rounds = [instruct_runs(args) for _ in range(args.rounds)]
        for rows in zip(*rounds):
            totals = [r["total"] for r in rows]
            phases = {k: statistics.median(r[k] for r in rows) for k in ("rollout", "scoring", "optimisation", "total")}
            results.append({**rows[0], **phases, "round_totals": totals})
    cpu = cpu_name()
    from csrc import engine as c_engine

    print(
        json.dumps(
            {
                "bench": "rl_speed",
                "cpu": cpu,
                "kernels": c_engine.kernels(),
                "threads": args.threads,
                "dtype": args.dtype,
                "attention": args.attention,
                "compile": args.compile,
                "torch": torch.__version__,
                "results": results,
            }
        )
    )
    print(
        f"\n{cpu}, {args.threads} threads, {args.dtype}, attention {args.attention}"
        + (", torch.compile" if args.compile else "")
        + f", C kernels {c_engine.kernels()}; medians of {args.repeats} iterations\n"
    )
    print("| workload | who | rollout s | scoring s | optimisation s | total s | mean reward |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        reward = f"{statistics.mean(r['reward']):.3f}" if "reward" in r else ""
        print(
            f"| {r['workload']} | {r['who']} | {r['rollout']:.2f} | {r['scoring']:.2f} | {r['optimisation']:.2f} | "
            f"**{r['total']:.2f}** | {reward} |"
        )
    fork = next((r for r in results if r["who"] == "the llama2.c PPO fork"), None)
    for r in results:
        if fork and r["workload"].startswith("fork") and r is not fork:
            print(
                f"\nThe fork's seconds over {r['workload']} {r['who']}'s: {fork['total'] / r['total']:.2f}x "
                f"(prompt + response, mean tokens: the fork's {fork['mean_length']:.0f}, ours {r['mean_length']:.0f})"
            )
    trl = next((r for r in results if r["who"] == "TRL GRPOTrainer"), None)
    for r in results:
        if trl and r["workload"] == "instruct" and r is not trl:
            ratios = [t / o for t, o in zip(trl["round_totals"], r["round_totals"])]
            print(
                f"\nTRL's seconds over {r['who']}'s, a round: "
                + ", ".join(f"{x:.2f}x" for x in ratios)
                + f" (median {statistics.median(ratios):.2f}x)"
            )


if __name__ == "__main__":
    main(parser.parse_args())
