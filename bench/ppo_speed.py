"""
PPO speed on this machine: two workloads on llama2.c's 260K preset (vocabulary 512), each split into
rollout (batched KV-cache generation), scoring (the policy and reference forward passes, rewards, GAE)
and optimisation (the PPO epochs) seconds.

  (a) the llama2.c PPO fork's iteration: 400 rollouts (8 minibatches x 50) of up to 300 new tokens,
      4 PPO epochs of 8 minibatches of 50. Fork: 57-61 s; TRL 0.11's PPOTrainer: 54-56 s. Target: 15 s.
  (b) 50 rollouts of 200 new tokens, 1 PPO epoch (one minibatch of 50). Fork: 2.5 s; TRL: 2.2 s. Target: 0.8 s.

    python bench/ppo_speed.py [--workloads=a,b] [--threads=2] [--dtype=auto] [--gen_dtype=float32] [--repeats=1]

Random weights, prompts of BOS + 29 random tokens (the fork's start_len=30), and no stop tokens: every
rollout runs to its full length, the worst case (a trained model ends most stories earlier). --dtype is
the autocast dtype of the forward passes and the optimisation ('auto': train.py's choice, bf16 on CPUs
with AMX or AVX512-BF16), --gen_dtype that of generation (float32, as ppo.py on a CPU). Prints a JSON
line and a markdown table; --repeats > 1 reports the fastest repeat after one warm-up.
"""
import argparse
import copy
import json
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import PRESETS, ModelArgs, Transformer  # noqa: E402
from ppo import PolicyWithValueHead, config, length_reward, make_experience, ppo_update, reuse_freed_memory  # noqa: E402
from common import resolve_device_dtype  # noqa: E402

WORKLOADS = {  # name: (rollouts, new tokens, PPO epochs, minibatch size)
    "a": (400, 300, 4, 50),
    "b": (50, 200, 1, 50),
}
REFERENCE = {"a": {"fork": "57-61", "TRL 0.11": "54-56", "target": 15.0}, "b": {"fork": "2.5", "TRL 0.11": "2.2", "target": 0.8}}

parser = argparse.ArgumentParser()
parser.add_argument("--workloads", default="a,b")
parser.add_argument("--threads", type=int, default=os.cpu_count())
parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
parser.add_argument("--gen_dtype", default="float32", help="float32 or bfloat16")
parser.add_argument("--repeats", type=int, default=1)
parser.add_argument("--glibc_default", action="store_true", help="skip ppo.reuse_freed_memory(), to measure what it saves")
args = parser.parse_args()
if not args.glibc_default:
    reuse_freed_memory()
torch.set_num_threads(args.threads)
_, _, dtype = resolve_device_dtype("cpu", args.dtype)
gen_dtype = args.gen_dtype


def autocast(name):
    return nullcontext() if name == "float32" else torch.autocast("cpu", dtype=getattr(torch, name))


def iteration(workload, seed):
    n, new_tokens, epochs, bs = WORKLOADS[workload]
    torch.manual_seed(seed)
    policy = PolicyWithValueHead(Transformer(ModelArgs(**PRESETS["260K"]))).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = policy.model.configure_optimizers(0.0, 1e-4, (0.9, 0.95), "cpu")
    optimizer.add_param_group({"params": list(policy.value_head.parameters()), "weight_decay": 0.0})
    cfg = {**config, "batch_size": bs, "max_new_tokens": new_tokens, "ppo_epochs": epochs, "temperature": 1.0}
    prompts = torch.cat([torch.ones(n, 1, dtype=torch.long), torch.randint(3, 512, (n, 29))], 1)
    generator = torch.Generator().manual_seed(seed)

    def score_fn(tokens, mask, ended):
        return length_reward(mask.sum(1), 200)

    t0 = time.perf_counter()
    batch, timing = make_experience(policy, reference, prompts, score_fn, 0.2, cfg, generator, (), autocast(dtype), autocast(gen_dtype))
    t1 = time.perf_counter()
    ppo_update(policy, optimizer, batch, cfg, generator, autocast(dtype))
    t2 = time.perf_counter()
    assert batch["mask"].sum(1).eq(new_tokens).all()  # every rollout ran to full length
    return {"rollout": timing["time/ppo/rollout"], "scoring": timing["time/ppo/forward_pass"] + timing["time/ppo/compute_rewards"],
            "optimisation": t2 - t1, "total": t2 - t0}


results = []
for workload in args.workloads.split(","):
    runs = [iteration(workload, seed) for seed in range(args.repeats + (args.repeats > 1))][args.repeats > 1:]
    best = min(runs, key=lambda r: r["total"])
    n, new_tokens, epochs, bs = WORKLOADS[workload]
    results.append({"workload": workload, "rollouts": n, "new_tokens": new_tokens, "ppo_epochs": epochs, "minibatch": bs,
                    **{k: round(v, 2) for k, v in best.items()}})
    print(f"({workload}) " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()), file=sys.stderr)

print(json.dumps({"bench": "ppo_speed", "threads": args.threads, "dtype": dtype, "gen_dtype": gen_dtype,
                  "reuse_freed_memory": not args.glibc_default, "results": results}))
print(f"\n260K preset, {args.threads} threads, forward and optimisation in {dtype}, generation in {gen_dtype}; "
      "every rollout at full length (no stop tokens)\n")
print("| workload | rollouts x new tokens | PPO epochs | rollout s | scoring s | optimisation s | total s | fork s | TRL 0.11 s | target s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in results:
    ref = REFERENCE[r["workload"]]
    print(f"| ({r['workload']}) | {r['rollouts']} x {r['new_tokens']} | {r['ppo_epochs']} x {r['rollouts'] // r['minibatch']} of {r['minibatch']} | "
          f"{r['rollout']:.2f} | {r['scoring']:.2f} | {r['optimisation']:.2f} | **{r['total']:.2f}** | {ref['fork']} | {ref['TRL 0.11']} | {ref['target']} |")
