"""
Pretrain a Llama-style model on TinyStories, or fine-tune it on instructions (SFT). Runs on one CPU,
one GPU, or many with DDP:

    python train.py                                   # the CPU default on the prepared data -> out/ckpt.pt
    python train.py --preset=15M --vocab_size=4096    # llama2.c's 15M shape
    python train.py --sft=True                        # out/ckpt.pt -> out/sft_ckpt.pt: stories on request
    torchrun --standalone --nproc_per_node=4 train.py # DDP (NCCL on GPUs, gloo on CPU)
    python train.py --rl=grpo                         # an RL stage (rl_train.py): ppo, grpo, rloo, reinforce_pp, dpo
    python train.py recipes/length_ppo.conf           # the settings of a recipe file, then any flags

Config keys and meanings are llama2.c's, so llama2.c training command lines run unchanged (and the
llama2.c PPO fork's --ppo=True, which means --rl=ppo).

SFT starts from out_dir's ckpt.pt and trains on tinystories.py instruct's examples: an instruction
header, then the story that follows it; the loss counts the story's tokens only, never the
header's. It writes sft_ckpt.pt (the best validation loss), sft_last.pt (where the same command
resumes), sft_log.jsonl and sft_loss.png; SFT_DEFAULTS below are its settings where none is given.
"""

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import configurator
import plots
from common import (
    PTDTYPES,
    DataError,
    MetricsLog,
    autocast,
    get_lr,
    init_ddp,
    one_line_errors,
    out_dir_lock,
    peak_matmul_flops,
    rank_sums,
    resolve_device_dtype,
    start_wandb,
)
from model import ATTENTION_KERNELS, PRESETS, ModelArgs, Transformer
from tinystories import iter_batches, iter_instruct_batches, read_token_meta, resolve_tokenizer, token_dir

# -----------------------------------------------------------------------------
# config: plain defaults, (default, rule) where values have a rule (configurator.py); overridable as
# --key=value or from a recipe file. The defaults train the CPU default model on the prepared shared
# data to llama2.c's bar (val loss 1.80) in 5 to 13 minutes on 2 cores.
config = dict(
    # I/O
    out_dir="out",
    eval_interval=(200, "> 0"),
    log_interval=(10, "> 0"),
    eval_iters=(20, "> 0"),
    eval_only=False,  # if True, evaluate once and exit
    always_save_checkpoint=False,  # if True, write ckpt.pt at every eval, not only on a new best val loss
    init_from=("scratch", "scratch | resume"),  # 'resume': from out_dir's last.pt (SFT resumes by itself)
    overwrite=False,  # a run from scratch replaces the model already in out_dir only when this is True
    seed=1337,
    # data
    data_dir="data",
    batch_size=(16, "> 0"),  # micro-batch size
    max_seq_len=(256, "> 1"),
    vocab_source=("custom", "custom | llama2"),  # 'llama2' (32000 tokens) or 'custom' (data/tok{vocab_size}.model)
    vocab_size=(512, "> 0"),
    # model
    preset="",  # '260K', '15M', '42M', '110M' or 'default': sets the shape keys below
    dim=(128, "> 0"),
    n_layers=(6, "> 0"),
    n_heads=(8, "> 0"),
    n_kv_heads=(4, "> 0"),
    multiple_of=(32, "> 0"),
    dropout=(0.0, "[0, 1)"),
    # adamw optimizer
    gradient_accumulation_steps=(1, "> 0"),  # used to simulate larger batch sizes
    learning_rate=(3e-3, "> 0"),
    max_iters=(1000, ">= 0"),
    weight_decay=(1e-1, ">= 0"),
    beta1=(0.9, "[0, 1)"),
    beta2=(0.95, "[0, 1)"),
    grad_clip=(1.0, ">= 0"),  # clip gradients at this value, or disable if == 0.0
    # learning rate decay settings
    decay_lr=True,  # linear warmup, then cosine decay to min_lr
    warmup_iters=(100, ">= 0"),
    lr_decay_iters=(0, ">= 0"),  # cosine decay ends here; 0 = max_iters
    min_lr=(0.0, ">= 0"),  # 0.0 = learning_rate / 10, as Chinchilla
    # system
    device="auto",  # 'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype=(
        "auto",
        "auto | float32 | bfloat16 | float16",
    ),  # 'auto': bfloat16 where the hardware runs it fast, else float32
    compile=False,  # torch.compile: 1.0-1.2x at the default size on CPU, 1.25x from 15M up (bench/train_speed.py)
    attention=(
        "auto",
        " | ".join(ATTENTION_KERNELS),
    ),  # causal attention: csrc/train/attention.c or PyTorch's (model.set_attention)
    # experiment tracking (llama2.c's keys): every row of log.jsonl also goes to Weights & Biases
    wandb_log=False,
    wandb_project="tinystories-rl",
    wandb_run_name="",  # empty: wandb names the run
    # stages
    sft=False,  # supervised fine-tuning on instructions, from out_dir/ckpt.pt (above)
    rl="",  # an RL method (rl_train.py), from out_dir's checkpoint
    ppo=False,  # the llama2.c PPO fork's switch: --rl=ppo
)
PLOT_SECONDS = 60  # the loss figure is drawn at the end and at a save this long after the last (it takes seconds)
SFT_DEFAULTS = dict(learning_rate=1e-3, max_iters=600, warmup_iters=20, eval_interval=100, weight_decay=0.0)
SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "vocab_size")
# -----------------------------------------------------------------------------


def stage(argv):
    """'pretrain', 'sft', or the RL method that --rl=NAME (or the fork's --ppo=True) asks for, in argv or
    its recipes."""
    flags = {key: text for key, text, _ in configurator.assignments(argv)[0]}
    method = flags.get("rl", "")
    if flags.get("ppo") == "True":
        if method not in ("", "ppo"):
            raise DataError(f"--ppo=True means --rl=ppo, not --rl={method}")
        method = "ppo"
    if method and flags.get("sft") == "True":
        raise DataError(f"--sft=True and --rl={method} are two stages: run SFT first, then the RL stage")
    return method or ("sft" if flags.get("sft") == "True" else "pretrain")


def start(cfg, given, master):
    """The model to train and where it comes from: (model, model_args, tokenizer record, iter_num,
    best_val_loss, the resumed checkpoint or None). Pretraining starts from scratch, or from
    last.pt with --init_from=resume; SFT from ckpt.pt, or from its own sft_last.pt."""
    out_dir, sft = cfg["out_dir"], cfg["sft"]
    last = os.path.join(out_dir, "sft_last.pt" if sft else "last.pt")
    if sft:
        resuming = os.path.exists(last) and not cfg["overwrite"]
        path = last if resuming else os.path.join(out_dir, "ckpt.pt")
    else:
        resuming = cfg["init_from"] == "resume"
        path = last if os.path.exists(last) else os.path.join(out_dir, "ckpt.pt")
        trained = [p for p in ("ckpt.pt", "last.pt") if os.path.exists(os.path.join(out_dir, p))]
        if not resuming and trained and not cfg["overwrite"]:
            raise DataError(
                f"{out_dir} already holds a trained model ({trained[0]}): --init_from=resume continues it, "
                "--overwrite=True replaces it, or choose another --out_dir"
            )
    if not resuming and not sft:
        model_args = {k: cfg[k] for k in SHAPE} | {"dropout": cfg["dropout"]}
        return Transformer(ModelArgs(**model_args)), model_args, None, 0, 1e9, None
    ckpt = checkpoint.load(path, kinds=("sft",) if sft and resuming else ("pretrain", "sft", "import"))
    checkpoint.check_given(ckpt, path, given)
    checkpoint.tokenizer_of(ckpt, path)  # it still exists and fits the model
    if master:
        print(
            f"{'resuming' if resuming else 'starting'} from {path} at iteration {ckpt['iter_num'] if resuming else 0}"
        )
    model_args = {**ckpt["model_args"], "dropout": cfg["dropout"]}
    iter_num, best = (ckpt["iter_num"], ckpt["best_val_loss"]) if resuming else (0, 1e9)
    return (
        checkpoint.model_from(ckpt, dropout=cfg["dropout"]),
        model_args,
        ckpt,
        iter_num,
        best,
        ckpt if resuming else None,
    )


def main(cfg, given):
    sft, out_dir = cfg["sft"], cfg["out_dir"]
    prefix = "sft_" if sft else ""
    with one_line_errors():
        device, device_type, dtype = resolve_device_dtype(cfg["device"], cfg["dtype"])
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = init_ddp(device, device_type)
    accumulation = cfg["gradient_accumulation_steps"]
    if accumulation % ddp_world_size:
        sys.exit(
            f"error: --gradient_accumulation_steps={accumulation} must be a multiple of the world size {ddp_world_size}"
        )
    accumulation //= ddp_world_size
    master_process = ddp_rank == 0
    torch.manual_seed(cfg["seed"] + ddp_rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ctx = autocast(device_type, dtype)

    with one_line_errors():
        model, model_args, source, iter_num, best_val_loss, resumed = start(cfg, given, master_process)
        os.makedirs(out_dir, exist_ok=True)
        lock = out_dir_lock(out_dir)  # after start(), which only reads: a run already writing here is refused
        # data and tokenizer: a checkpoint's own, else data_dir's for vocab_size
        data_dir = checkpoint.data_dir_of(source, out_dir, cfg["data_dir"]) if source else cfg["data_dir"]
        if source:
            tokenizer_info = source["tokenizer"]
        else:
            if cfg["vocab_source"] == "llama2" and cfg["vocab_size"] != 32000:
                raise DataError(f"--vocab_source=llama2 has 32000 tokens, not --vocab_size={cfg['vocab_size']}")
            resolve_tokenizer(data_dir, 0 if cfg["vocab_source"] == "llama2" else cfg["vocab_size"])
            tokenizer_info = read_token_meta(data_dir, model_args["vocab_size"])
        bin_dir = token_dir(data_dir, model_args["vocab_size"])
        T = model_args["max_seq_len"]
        tokens_per_iter = accumulation * ddp_world_size * cfg["batch_size"] * T
        attention = model.set_attention(cfg["attention"], device_type)

        def batches(split, start_step=0, rank=ddp_rank, stream_seed=cfg["seed"]):
            if sft:
                return iter_instruct_batches(
                    bin_dir, split, cfg["batch_size"], T, device, seed=stream_seed, rank=rank, start_step=start_step
                )
            return iter_batches(
                os.path.join(bin_dir, f"{split}.bin"),
                cfg["batch_size"],
                T,
                device,
                seed=stream_seed,
                rank=rank,
                start_step=start_step,
            )

        train_stream = batches("train", start_step=iter_num * accumulation)
        X, Y = next(train_stream)
    if master_process:
        print(
            f"tokens per iteration: {tokens_per_iter:,} ({accumulation} accum x {ddp_world_size} ranks x "
            f"{cfg['batch_size']} batch x {T} seq); attention: {attention}"
        )
    model.to(device)

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(
        cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), device_type
    )
    if resumed is not None and "optimizer" in resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        torch.set_rng_state(resumed["rng_state"])
    resumed = None  # free memory
    raw_model = model
    if cfg["compile"]:
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
            stream = batches(split, rank=0, stream_seed=cfg["seed"] + 1)
            losses = torch.zeros(cfg["eval_iters"])
            for k in range(cfg["eval_iters"]):
                X, Y = next(stream)
                with ctx:
                    _, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    def save(name):
        checkpoint.save(
            os.path.join(out_dir, name),
            "sft" if sft else "pretrain",
            raw_model.state_dict(),
            model_args,
            tokenizer_info,
            data_dir,
            config=cfg,
            iter_num=iter_num,
            best_val_loss=best_val_loss,
            optimizer=optimizer.state_dict(),
            rng_state=torch.get_rng_state(),
        )

    log_path = os.path.join(out_dir, f"{prefix}log.jsonl")
    with one_line_errors():
        wandb_run = start_wandb(cfg, out_dir) if master_process else None
    log = MetricsLog(log_path, iter_num if iter_num else None, master_process, wandb_run)

    # training loop
    t0 = time.time()
    local_iter_num = 0  # iterations in this process, to skip timing the compile warm-up
    running_mfu = -1.0
    finite = torch.ones(
        (), dtype=torch.bool, device=device
    )  # every loss and gradient norm so far, checked before a save
    bar = tqdm(total=cfg["max_iters"], initial=iter_num, disable=not master_process, unit="it", dynamic_ncols=True)
    plotted = time.time()
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        just_resumed = iter_num > 0 and local_iter_num == 0 and not cfg["eval_only"]  # evaluated before saving
        if (iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]) and not just_resumed:
            losses = estimate_loss()
            row = {
                "iter": iter_num,
                "tokens": iter_num * tokens_per_iter,
                "train/loss": losses["train"],
                "val/loss": losses["val"],
                "lr": lr,
                "mfu": running_mfu,
            }
            if ddp:
                row.update(rank_sums(raw_model, X))
            if not (finite.item() and all(map(torch.isfinite, torch.tensor(list(losses.values()))))):
                sys.exit(
                    f"error: iteration {iter_num}: the loss or a gradient norm is not finite "
                    f"(train {losses['train']:.4g}, "
                    f"val {losses['val']:.4g}); lower --learning_rate or check the data. Nothing was saved"
                )
            if master_process:
                tqdm.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if iter_num > 0:
                    with one_line_errors():  # e.g. a full disk: one line, and the earlier checkpoints (and log) stay
                        save(f"{prefix}last.pt")
                        if losses["val"] < best_val_loss or cfg["always_save_checkpoint"]:
                            best_val_loss = min(best_val_loss, losses["val"])
                            save(f"{prefix}ckpt.pt")
                            tqdm.write(f"saved checkpoint to {out_dir}/{prefix}ckpt.pt")
            log(row)
            if iter_num > 0:
                log.commit()  # after the saves: the log never runs ahead of its checkpoint
            if (
                master_process
                and iter_num > 0
                and (iter_num >= cfg["max_iters"] or time.time() - plotted > PLOT_SECONDS)
            ):
                with one_line_errors():
                    plots.losses(log_path, os.path.join(out_dir, f"{prefix}loss.png"))
                plotted = time.time()
        if cfg["eval_only"] or iter_num >= cfg["max_iters"]:
            break

        # forward, backward, update, with gradient accumulation; only the last micro-step
        # of an iteration all-reduces the gradients under DDP
        for micro_step in range(accumulation):
            if ddp:
                model.require_backward_grad_sync = micro_step == accumulation - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / accumulation
            X, Y = next(train_stream)  # prefetch the next batch while the backward runs on the GPU
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or float("inf"))
        finite &= (
            torch.isfinite(grad_norm) | scaler.is_enabled()
        )  # fp16's scaler skips a step with inf gradients itself
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        iter_num += 1
        local_iter_num += 1
        bar.update(1)
        if iter_num % cfg["log_interval"] == 0 and master_process:
            lossf = loss.item() * accumulation
            if local_iter_num >= 5:  # let the loop settle a bit
                mfu = raw_model.estimate_mfu(cfg["batch_size"] * accumulation, dt, peak_flops)
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            bar.set_postfix(
                loss=f"{lossf:.4f}",
                lr=f"{lr:.1e}",
                tok_s=f"{tokens_per_iter / dt:,.0f}",
                mfu=f"{running_mfu * 100:.1f}%",
            )
            log(
                {
                    "iter": iter_num,
                    "tokens": iter_num * tokens_per_iter,
                    "train/loss_step": lossf,
                    "lr": lr,
                    "dt_ms": round(dt * 1000, 2),
                    "tok_per_s": round(tokens_per_iter / dt),
                    "mfu": running_mfu,
                }
            )
    bar.close()
    if ddp:
        dist.destroy_process_group()
    lock.close()


if __name__ == "__main__":
    with one_line_errors():
        name = stage(sys.argv[1:])
    if name not in ("pretrain", "sft"):  # an RL stage, from out_dir's checkpoint: the same keys plus the method's
        import rl_train

        rl_train.main(name, sys.argv[1:], ignored=configurator.split(config)[0])
        sys.exit(0)
    presets = {name: {k: v for k, v in p.items() if k in config} for name, p in PRESETS.items()}
    cfg, given = configurator.configure(config, presets=presets)
    if cfg["sft"]:
        cfg.update({k: v for k, v in SFT_DEFAULTS.items() if k not in given})
    main(cfg, given)
