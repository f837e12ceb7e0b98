"""
RL speed on this machine: one iteration of PPO, GRPO and RLOO (their iteration() functions, the ones the
training loop runs) on two workloads on llama2.c's 260K preset (vocabulary 512), each split into rollout
(batched KV-cache generation), scoring (the policy and reference forward passes, rewards, advantages)
and optimisation (the update epochs) seconds.

  (a) the llama2.c PPO fork's iteration: 400 rollouts (8 minibatches x 50) of up to 300 new tokens,
      4 epochs of 8 minibatches of 50. PPO: fork 57-61 s, TRL 0.11's PPOTrainer 54-56 s, target 15 s.
      GRPO (50 prompts x 8) and RLOO (100 prompts x 4) at the same workload: target, no slower than PPO.
  (b) 50 rollouts of 200 new tokens, 1 epoch (one minibatch of 50). PPO: fork 2.5 s, TRL 2.2 s, target 0.8 s.

    python bench/ppo_speed.py [--methods=ppo,grpo,rloo] [--workloads=a,b] [--epochs=0] [--threads=2] [--repeats=1]

Random weights, prompts of BOS + 29 random tokens (the fork's start_len=30), and no stop tokens: every
rollout runs to its full length, the worst case (a trained model ends most stories earlier). --epochs
overrides the workload's update epochs for every method (GRPO's and RLOO's own default is 1, which
cuts their optimisation time by about 4x at (a)). --dtype is the autocast dtype of the forward passes
and the optimisation ('auto': bf16 on CPUs with AMX), --gen_dtype that of generation
(float32, as the RL stages on a CPU). Prints a JSON line and a markdown table; --repeats > 1 reports
the fastest repeat after one warm-up.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
import ppo  # noqa: E402
import rl  # noqa: E402
import rloo  # noqa: E402
from common import autocast, resolve_device_dtype  # noqa: E402
from model import PRESETS, ModelArgs, Transformer  # noqa: E402

WORKLOADS = {  # name: (rollouts, new tokens, epochs, minibatch size)
    "a": (400, 300, 4, 50),
    "b": (50, 200, 1, 50),
}
METHODS = {
    "ppo": (ppo, ppo.PolicyWithValueHead, 1),
    "grpo": (grpo, rl.Policy, 8),
    "rloo": (rloo, rl.Policy, 4),
}  # module, policy, group
REFERENCE = {
    "a": {"fork": "57-61", "TRL 0.11": "54-56", "target": "15 (PPO)"},
    "b": {"fork": "2.5", "TRL 0.11": "2.2", "target": "0.8 (PPO)"},
}

parser = argparse.ArgumentParser()
parser.add_argument("--methods", default="ppo,grpo,rloo")
parser.add_argument("--workloads", default="a,b")
parser.add_argument("--epochs", type=int, default=0, help="update epochs for every method; 0: the workload's")
parser.add_argument("--threads", type=int, default=os.cpu_count())
parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
parser.add_argument("--gen_dtype", default="float32", help="float32 or bfloat16")
parser.add_argument("--repeats", type=int, default=1)
parser.add_argument(
    "--glibc_default", action="store_true", help="skip rl.reuse_freed_memory(), to measure what it saves"
)
args = parser.parse_args()
if not args.glibc_default:
    rl.reuse_freed_memory()
torch.set_num_threads(args.threads)
_, _, dtype = resolve_device_dtype("cpu", args.dtype)


def iteration(method, workload, seed):
    n, new_tokens, epochs, bs = WORKLOADS[workload]
    module, make_policy, group = METHODS[method]
    group = math.gcd(n, group)  # (b)'s 50 rollouts: groups of 2
    torch.manual_seed(seed)
    policy = make_policy(Transformer(ModelArgs(**PRESETS["260K"]))).eval()
    reference = rl.Policy(copy.deepcopy(policy.model)).requires_grad_(False)
    cfg = {
        **module.config,
        "batch_size": bs,
        "num_mini_batches": n // bs,
        "max_new_tokens": new_tokens,
        "ppo_epochs": args.epochs or epochs,
        "temperature": 1.0,
        **({"group_size": group} if group > 1 else {}),
    }
    optimizer = rl.make_optimizer(policy, cfg, "cpu")
    prompts = torch.cat([torch.ones(n // group, 1, dtype=torch.long), torch.randint(3, 512, (n // group, 29))], 1)

    def score_fn(tokens, mask, ended):
        return rl.length_reward(mask.sum(1), 200)

    t0 = time.perf_counter()
    batch, stats = module.iteration(
        policy,
        reference,
        optimizer,
        prompts,
        score_fn,
        0.2,
        cfg,
        torch.Generator().manual_seed(seed),
        torch.Generator().manual_seed(seed + 1),
        (),
        autocast("cpu", dtype),
        autocast("cpu", args.gen_dtype),
    )
    total = time.perf_counter() - t0
    assert batch["mask"].sum(1).eq(new_tokens).all() and len(batch["tokens"]) == n  # every rollout ran to full length
    scoring = stats["time/forward_pass"] + stats["time/score"] + stats.get("time/compute_advantages", 0.0)
    return {
        "rollout": stats["time/rollout"],
        "scoring": scoring,
        "optimisation": stats["time/optimize_step"],
        "total": total,
    }


results = []
for workload in args.workloads.split(","):
    for method in args.methods.split(","):
        runs = [iteration(method, workload, seed) for seed in range(args.repeats + (args.repeats > 1))][
            args.repeats > 1 :
        ]
        best = min(runs, key=lambda r: r["total"])
        n, new_tokens, epochs, bs = WORKLOADS[workload]
        results.append(
            {
                "method": method,
                "workload": workload,
                "rollouts": n,
                "new_tokens": new_tokens,
                "epochs": args.epochs or epochs,
                "minibatch": bs,
                **{k: round(v, 2) for k, v in best.items()},
            }
        )
        print(f"({workload}) {method}: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()), file=sys.stderr)

print(
    json.dumps(
        {
            "bench": "ppo_speed",
            "threads": args.threads,
            "dtype": dtype,
            "gen_dtype": args.gen_dtype,
            "reuse_freed_memory": not args.glibc_default,
            "results": results,
        }
    )
)
print(
    f"\n260K preset, {args.threads} threads, forward and optimisation in {dtype}, generation in {args.gen_dtype}; "
    "every rollout at full length (no stop tokens)\n"
)
print(
    "| workload | method | rollouts x new tokens | epochs | rollout s | scoring s | optimisation s | total s | fork s | TRL 0.11 s | target s |"
)
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in results:
    ref = REFERENCE[r["workload"]]
    print(
        f"| ({r['workload']}) | {r['method']} | {r['rollouts']} x {r['new_tokens']} | {r['epochs']} x {r['rollouts'] // r['minibatch']} of "
        f"{r['minibatch']} | {r['rollout']:.2f} | {r['scoring']:.2f} | {r['optimisation']:.2f} | **{r['total']:.2f}** | "
        f"{ref['fork']} | {ref['TRL 0.11']} | {ref['target']} |"
    )
