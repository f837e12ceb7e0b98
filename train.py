"""
Pretrain a Llama-style model on TinyStories. Runs on one CPU, one GPU, or many with DDP:

    python train.py                                   # the CPU default on the prepared data
    python train.py --preset=15M --vocab_size=4096    # llama2.c's 15M shape
    python train.py --batch_size=32 --compile=False   # any config key below, --key=value
    torchrun --standalone --nproc_per_node=4 train.py # DDP (NCCL on GPUs, gloo on CPU)
    python train.py --rl=grpo                         # an RL stage from out/ckpt.pt: ppo, grpo, rloo or dpo (rl.py)

Config keys and meanings are llama2.c's, so llama2.c training command lines run unchanged (and the
llama2.c PPO fork's --ppo=True, which means --rl=ppo).
"""
import importlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import configurator
from common import (DataError, PTDTYPES, autocast, get_lr, init_ddp, jsonl_log, one_line_errors, peak_matmul_flops,
                    pyplot, rank_sums, read_jsonl, resolve_device_dtype, save_atomic, save_figure, start_wandb)
from model import PRESETS, ModelArgs, Transformer, load_checkpoint, model_from_checkpoint
from tinystories import iter_batches, resolve_tokenizer, token_dir

# -----------------------------------------------------------------------------
# config: plain defaults, overridable as --key=value. The defaults train the CPU default
# model on the prepared shared data to llama2.c's bar (val loss 1.80) in 5 to 13 minutes on 2 cores.
# I/O
out_dir = "out"
eval_interval = 200
log_interval = 10
eval_iters = 20
eval_only = False  # if True, evaluate once and exit
always_save_checkpoint = False  # if True, write ckpt.pt at every eval, not only on a new best val loss
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir)
seed = 1337
# data
data_dir = "data"
batch_size = 16  # micro-batch size
max_seq_len = 256
vocab_source = "custom"  # 'llama2' (32000 tokens) or 'custom' (data/tok{vocab_size}.model)
vocab_size = 512
# model
preset = ""  # '260K', '15M', '42M', '110M' or 'default': sets the shape keys below
dim = 128
n_layers = 6
n_heads = 8
n_kv_heads = 4
multiple_of = 32
dropout = 0.0
# adamw optimizer
gradient_accumulation_steps = 1  # used to simulate larger batch sizes
learning_rate = 3e-3
max_iters = 1000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
# learning rate decay settings
decay_lr = True  # linear warmup, then cosine decay to min_lr
warmup_iters = 100
lr_decay_iters = 0  # cosine decay ends here; 0 = max_iters
min_lr = 0.0  # 0.0 = learning_rate / 10, as Chinchilla
# system
device = "auto"  # 'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bfloat16 where the hardware runs it fast, else float32), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile the model: 1.0x to 1.2x at the default size on CPU, 1.25x from 15M up, ~20 s to compile (bench/train_speed.py)
# experiment tracking (llama2.c's keys): every row of log.jsonl also goes to Weights & Biases
wandb_log = False
wandb_project = "tinystories-rl"
wandb_run_name = ""  # empty: wandb names the run
# -----------------------------------------------------------------------------
RL_METHODS = ("ppo", "grpo", "rloo", "dpo")  # --rl=NAME runs NAME.py's stage from out_dir's checkpoint
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
config = {k: globals()[k] for k in config_keys}  # what the command line may set, and what checkpoints record
# -----------------------------------------------------------------------------


def rl_method(argv):
    """The RL method that --rl=ppo|grpo|rloo|dpo (or the llama2.c PPO fork's --ppo=True) asks for, or None."""
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    method = flags.get("rl", "")
    if flags.get("ppo") == "True":
        if method not in ("", "ppo"):
            sys.exit(f"error: --ppo=True means --rl=ppo, not --rl={method}")
        method = "ppo"
    if method and method not in RL_METHODS:
        sys.exit(f"error: unknown --rl={method}; choose from {', '.join(RL_METHODS)}")
    return method or None


def plot_losses(log_path, png_path):
    plt = pyplot()
    rows = read_jsonl(log_path)
    evals = [r for r in rows if "val/loss" in r]
    steps = [r for r in rows if "train/loss_step" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in steps], [r["train/loss_step"] for r in steps], alpha=0.3, label="train (batch)")
    ax.plot([r["tokens"] for r in evals], [r["train/loss"] for r in evals], "o-", label="train (eval)")
    ax.plot([r["tokens"] for r in evals], [r["val/loss"] for r in evals], "o-", label="val (eval)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, png_path)


if __name__ == "__main__":
    method = rl_method(sys.argv[1:])
    if method:  # an RL stage, from out_dir's checkpoint: the same keys plus the method's, in {method}.py
        importlib.import_module(method).main(sys.argv[1:])
        sys.exit(0)
    config = configurator.configure(config, presets={name: {k: v for k, v in p.items() if k in config} for name, p in PRESETS.items()})
    globals().update(config)
    with one_line_errors():
        device, device_type, dtype = resolve_device_dtype(device, dtype)
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = init_ddp(device, device_type)
    if gradient_accumulation_steps % ddp_world_size:
        sys.exit(f"error: gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the world size {ddp_world_size}")
    gradient_accumulation_steps //= ddp_world_size
    master_process = ddp_rank == 0
    tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * max_seq_len
    if master_process:
        print(f"tokens per iteration: {tokens_per_iter:,} ({gradient_accumulation_steps} accum x {ddp_world_size} ranks x {batch_size} batch x {max_seq_len} seq)")
        os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed + ddp_rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ctx = autocast(device_type, dtype)

    with one_line_errors():
        # data and tokenizer
        if vocab_source == "llama2" and vocab_size != 32000:
            raise DataError(f"vocab_source=llama2 has 32000 tokens, not --vocab_size={vocab_size}")
        tokenizer_model = resolve_tokenizer(data_dir, 0 if vocab_source == "llama2" else vocab_size)
        bin_dir = token_dir(data_dir, vocab_size)
        meta_path = os.path.join(bin_dir, "meta.json")
        if not os.path.exists(meta_path):
            raise DataError(f"no token files in {bin_dir}; run `python tinystories.py pretokenize --vocab_size={0 if vocab_source == 'llama2' else vocab_size}` first")
        tokenizer_info = {k: v for k, v in json.load(open(meta_path)).items() if k in ("tokenizer", "tokenizer_sha256", "vocab_size", "bos_id")}

        def batches(split, start_step=0, rank=ddp_rank, stream_seed=seed):
            return iter_batches(os.path.join(bin_dir, f"{split}.bin"), batch_size, max_seq_len, device,
                                seed=stream_seed, rank=rank, start_step=start_step)

        # model
        iter_num, best_val_loss = 0, 1e9
        model_args = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                          multiple_of=multiple_of, max_seq_len=max_seq_len, dropout=dropout)
        if init_from == "resume":
            resume_path = os.path.join(out_dir, "last.pt")
            if not os.path.exists(resume_path):
                resume_path = os.path.join(out_dir, "ckpt.pt")
            checkpoint = load_checkpoint(resume_path, device)
            if checkpoint["model_args"]["vocab_size"] != vocab_size:
                raise DataError(f"{resume_path} has vocab_size {checkpoint['model_args']['vocab_size']}, not --vocab_size={vocab_size}")
            model_args = checkpoint["model_args"]  # the shape comes from the checkpoint
            model = model_from_checkpoint(checkpoint)
            iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
            if master_process:
                print(f"resuming from {resume_path} at iteration {iter_num}")
        elif init_from == "scratch":
            model = Transformer(ModelArgs(**model_args))
        else:
            raise DataError(f"--init_from must be 'scratch' or 'resume', not {init_from!r}")
    model.to(device)

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    if init_from == "resume" and "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng_state"])
        checkpoint = None  # free memory
    raw_model = model
    if compile:
        if master_process:
            print("compiling the model... (takes a minute)")
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)
    peak_flops = peak_matmul_flops(device, PTDTYPES[dtype])

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over the same eval_iters batches of each split at every eval."""
        out = {}
        model.eval()
        for split in ("train", "val"):
            stream = batches(split, rank=0, stream_seed=seed + 1)
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                X, Y = next(stream)
                with ctx:
                    _, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    def checkpoint_dict():
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
                "iter_num": iter_num, "best_val_loss": best_val_loss, "config": config,
                "tokenizer": tokenizer_info, "rng_state": torch.get_rng_state()}

    log_path = os.path.join(out_dir, "log.jsonl")
    with one_line_errors():
        wandb_run = start_wandb(config, out_dir) if master_process else None
    log = jsonl_log(log_path, iter_num if init_from == "resume" else None, master_process, wandb_run)

    # training loop
    train_stream = batches("train", start_step=iter_num * gradient_accumulation_steps)
    X, Y = next(train_stream)
    t0 = time.time()
    local_iter_num = 0  # iterations in this process, to skip timing the compile warm-up
    running_mfu = -1.0
    bar = tqdm(total=max_iters, initial=iter_num, disable=not master_process, unit="it", dynamic_ncols=True)
    while True:
        lr = get_lr(iter_num, config)
        for group in optimizer.param_groups:
            group["lr"] = lr

        just_resumed = init_from == "resume" and local_iter_num == 0 and not eval_only  # evaluated before saving
        if (iter_num % eval_interval == 0 or iter_num == max_iters) and not just_resumed:
            losses = estimate_loss()
            row = {"iter": iter_num, "tokens": iter_num * tokens_per_iter, "train/loss": losses["train"],
                   "val/loss": losses["val"], "lr": lr, "mfu": running_mfu}
            if ddp:
                row.update(rank_sums(raw_model, X))
            log(row)
            if master_process:
                tqdm.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if iter_num > 0:
                    with one_line_errors():  # e.g. a full disk
                        save_atomic(checkpoint_dict(), os.path.join(out_dir, "last.pt"))
                        if losses["val"] < best_val_loss or always_save_checkpoint:
                            best_val_loss = min(best_val_loss, losses["val"])
                            save_atomic(checkpoint_dict(), os.path.join(out_dir, "ckpt.pt"))
                            tqdm.write(f"saved checkpoint to {out_dir}/ckpt.pt")
                        plot_losses(log_path, os.path.join(out_dir, "loss.png"))
        if eval_only or iter_num >= max_iters:
            break

        # forward, backward, update, with gradient accumulation; only the last micro-step
        # of an iteration all-reduces the gradients under DDP
        for micro_step in range(gradient_accumulation_steps):
            if ddp:
                model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / gradient_accumulation_steps
            X, Y = next(train_stream)  # prefetch the next batch while the backward runs on the GPU
            scaler.scale(loss).backward()
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        iter_num += 1
        local_iter_num += 1
        bar.update(1)
        if iter_num % log_interval == 0 and master_process:
            lossf = loss.item() * gradient_accumulation_steps
            if local_iter_num >= 5:  # let the loop settle a bit
                mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt, peak_flops)
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            bar.set_postfix(loss=f"{lossf:.4f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_iter / dt:,.0f}",
                            mfu=f"{running_mfu * 100:.1f}%")
            log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, "train/loss_step": lossf, "lr": lr,
                 "dt_ms": round(dt * 1000, 2), "tok_per_s": round(tokens_per_iter / dt), "mfu": running_mfu})
    bar.close()
    if ddp:
        dist.destroy_process_group()
