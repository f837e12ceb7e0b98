"""
The RL training loop every method shares (rl.py has the pieces, one file a method the rest):
set-up from the starting checkpoint, resume, DDP, the metrics log, held-out evaluations and
checkpoints, around the method's iteration(run, batch). train.py --rl=NAME calls main().

An iteration reads top-down: next_batch(run) draws this iteration's data by the method's UNIT
(rollouts of fresh prompts, groups of them, or preference pairs); method.iteration(run, batch)
computes its advantages and calls rl.optimize(), which takes one rl.optimizer_step() a minibatch.
Every eval_interval iterations rank 0 evaluates on held-out prompts and writes {method}_ckpt.pt,
from which the same command resumes, with the same random streams.
"""

import importlib
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import ModuleType
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import configurator
import metrics
import plots
import prefs
import tasks
from common import (
    DataError,
    MetricsLog,
    autocast,
    get_lr,
    init_ddp,
    mean_over_ranks,
    one_line_errors,
    out_dir_lock,
    rank_sums,
    resolve_device_dtype,
    reuse_freed_memory,
    start_wandb,
)
from rl import Policy, kl_controller, make_optimizer
from rollouts import Engines, choose_engine, rollout, rollout_stats
from tokenizer import Tokenizer


@dataclass
class Run:
    """What an iteration needs, set up once by setup(); iter_num, rng and shuffle change every iteration."""

    cfg: dict  # the settings
    method: ModuleType  # the method's module: UNIT, VALUE_HEAD, iteration()
    policy: Policy  # the model being trained, with its value head if any
    train_policy: nn.Module  # the policy as the update runs it: compiled (compile), in a DDP wrapper (DDP)
    reference: Policy  # the frozen starting model
    model_args: dict
    optimizer: torch.optim.Optimizer
    kl_ctl: object  # AdaptiveKLController, FixedKLController, or None (DPO)
    task: tasks.Task  # the prompts, the reward and the task's held-out measures
    stop_tokens: tuple  # the tokens that end a story: BOS and EOS
    tok: Optional[Tokenizer] = None
    device: str = "cpu"
    device_type: str = "cpu"  # 'cpu', 'cuda', 'mps'
    dtype: str = "float32"
    ctx: object = nullcontext()  # autocast of the forward passes and updates
    gen_ctx: object = nullcontext()  # autocast of generation: GPUs only (on a CPU its casts cost more than bf16 saves)
    scaler: torch.amp.GradScaler = field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False)
    )  # fp16 only
    ddp: bool = False
    rank: int = 0
    world_size: int = 1
    pairs: Optional[list] = None  # DPO's encoded preference pairs
    start: dict = None  # the starting checkpoint's record: tokenizer, data_dir, best_val_loss
    start_path: str = ""
    ckpt_path: str = ""
    log_path: str = ""
    train_bin: str = ""
    val_bin: str = ""
    attention: str = "torch"  # 'c' or 'torch', as model.set_attention chose
    engines: Optional[Engines] = None  # the C engine's policy and reference, when it samples and scores (rollouts.py)
    resuming: bool = False
    iter_num: int = 0
    rng: np.random.Generator = None  # this iteration's random draws: seeded by (seed, rank, iteration)
    shuffle: torch.Generator = None  # this iteration's minibatch order
    timing: dict = None  # this iteration's rollout timings
    vocabulary: set = None  # the training text's words (rank 0: the fluency measure)
    ref_nll: float = None  # the starting model's own NLL on the held-out prompts: the fluency baseline

    @property
    def episodes(self):
        """Rollouts (DPO: pairs) per iteration, over all ranks."""
        return self.cfg["batch_size"] * self.cfg.get("num_mini_batches", 1) * self.world_size


def run_of(method, policy, reference, task, cfg, stop_tokens, engines=None):
    """A Run of given models and task without a checkpoint, on the CPU (tests and benchmarks): the
    optimizer and KL controller setup() makes."""
    return Run(
        cfg=cfg,
        method=method,
        policy=policy,
        train_policy=policy,
        reference=reference,
        model_args=policy.model.params.__dict__,
        optimizer=make_optimizer(policy, cfg),
        kl_ctl=kl_controller(cfg),
        task=task,
        stop_tokens=stop_tokens,
        engines=engines,
    )


def find_method(name):
    """The module of method `name` (grpo -> grpo.py): any module that declares UNIT and iteration()."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError:
        module = None
    if (
        module is None
        or not hasattr(module, "iteration")
        or getattr(module, "UNIT", None) not in ("rollouts", "groups", "pairs")
    ):
        raise DataError(f"unknown --rl={name}; choose from {', '.join(methods())}")
    return module


def methods():
    """The names of the RL methods: the modules beside this one that declare a UNIT."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = []
    for name in sorted(os.listdir(here)):
        if name.endswith(".py") and any(line.startswith("UNIT = ") for line in open(os.path.join(here, name))):
            found.append(name[:-3])
    return found


def setup(cfg, given, method):
    """Everything a method's iterations need, as a Run: the device and DDP, the policy and the frozen
    reference from the starting checkpoint (or, resuming, from out_dir/{method}_ckpt.pt), its tokenizer
    and data, the optimizer, the KL controller, the task. Bad input raises DataError."""
    name = method.__name__
    tasks.parse_reward(cfg["reward"])  # a bad spec is named before anything else
    reuse_freed_memory()
    device, device_type, dtype = resolve_device_dtype(cfg["device"], cfg["dtype"])
    ddp, rank, local_rank, world_size, device = init_ddp(device, device_type)
    ctx = autocast(device_type, dtype)

    out_dir = cfg["out_dir"]
    ckpt_path = os.path.join(out_dir, f"{name}_ckpt.pt")
    resuming = os.path.exists(ckpt_path) and not cfg["overwrite"]
    start_path = ckpt_path if resuming else os.path.join(out_dir, tasks.start_checkpoint(cfg))
    ckpt = checkpoint.load(start_path, device, kinds=("rl",) if resuming else ("pretrain", "sft", "import"))
    if resuming and ckpt["config"].get("reward") != cfg["reward"]:
        raise DataError(
            f"{start_path} is a run on --reward={ckpt['config'].get('reward')}, not {cfg['reward']}: "
            "--overwrite=True starts afresh in its place, or choose another --out_dir"
        )
    checkpoint.check_given(ckpt, start_path, given)
    if resuming and rank == 0:
        for note in checkpoint.changed_settings(ckpt, cfg):
            print(f"resuming with {note}")
    data_dir = checkpoint.data_dir_of(ckpt, start_path, cfg["data_dir"] or "data")
    tok = checkpoint.tokenizer_of(ckpt, start_path)
    bin_dir = os.path.join(data_dir, f"tok{tok.n_words}")
    model_args = {**ckpt["model_args"], "dropout": 0.0}  # the ratios and the KL compare passes of one function
    policy = Policy(checkpoint.model_from(ckpt, dropout=0.0), value_head=getattr(method, "VALUE_HEAD", False))
    if resuming and ckpt["rl"]["heads"]:
        policy.value_head.load_state_dict(ckpt["rl"]["heads"]["value_head"])
    reference = Policy(checkpoint.model_from(ckpt, ckpt["rl"]["reference"] if resuming else None, dropout=0.0))
    policy.to(device).eval()  # eval: no dropout
    reference.to(device).eval().requires_grad_(False)
    attention = policy.model.set_attention(cfg["attention"], device_type)
    reference.model.set_attention(attention, device_type)
    rollout_engine = choose_engine(cfg["rollout_engine"], device_type, policy.model)
    engines = Engines(policy.model, reference.model) if rollout_engine == "c" else None

    task = tasks.make_task(cfg, tok, data_dir, model_args["max_seq_len"], device, ctx, trains=method.UNIT != "pairs")
    if method.UNIT == "groups":
        check_groups(cfg)
    pairs = (
        method.encode_pairs(tok, prefs.read_pairs(cfg["pairs"]), model_args["max_seq_len"])
        if method.UNIT == "pairs"
        else None
    )

    optimizer = make_optimizer(policy, cfg, device_type)
    kl_ctl = kl_controller(cfg)
    iter_num = 0
    if resuming:
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num = ckpt["iter_num"]
        if kl_ctl:
            kl_ctl.value = ckpt["rl"]["kl_coef"]
    train_policy = torch.compile(policy, dynamic=True) if cfg["compile"] else policy
    if ddp:
        train_policy = DDP(train_policy, device_ids=[local_rank] if device_type == "cuda" else None)
    return Run(
        cfg=cfg,
        method=method,
        device=device,
        device_type=device_type,
        dtype=dtype,
        ctx=ctx,
        gen_ctx=ctx if device_type == "cuda" else nullcontext(),
        ddp=ddp,
        rank=rank,
        world_size=world_size,
        tok=tok,
        stop_tokens=(tok.bos_id, tok.eos_id),
        policy=policy,
        train_policy=train_policy,
        reference=reference,
        model_args=model_args,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device_type, enabled=dtype == "float16"),
        kl_ctl=kl_ctl,
        task=task,
        pairs=pairs,
        start={"tokenizer": ckpt["tokenizer"], "data_dir": data_dir, "best_val_loss": ckpt.get("best_val_loss")},
        start_path=start_path,
        ckpt_path=ckpt_path,
        log_path=os.path.join(out_dir, f"{name}_log.jsonl"),
        train_bin=os.path.join(bin_dir, "train.bin"),
        val_bin=os.path.join(bin_dir, "val.bin"),
        attention=attention,
        engines=engines,
        resuming=resuming,
        iter_num=iter_num,
    )


def check_groups(cfg):
    """The set-up check of the methods that sample group_size responses to each prompt: the groups fill
    the minibatches (which keep a group whole) and so the iteration."""
    if cfg["batch_size"] % cfg["group_size"]:
        raise DataError(
            f"--group_size={cfg['group_size']} must divide --batch_size={cfg['batch_size']}: "
            "a minibatch holds whole groups"
        )


def next_batch(run):
    """This iteration's data, by the method's UNIT: num_mini_batches * batch_size rollouts of fresh
    training prompts (groups: each prompt group_size times in a row), or batch_size preference pairs."""
    cfg = run.cfg
    if run.method.UNIT == "pairs":
        return [run.pairs[i] for i in run.rng.choice(len(run.pairs), size=cfg["batch_size"], replace=False)]
    g = cfg["group_size"] if run.method.UNIT == "groups" else 1
    prompts = run.task.train_prompts(run.rng, cfg["num_mini_batches"] * cfg["batch_size"] // g)
    generator = torch.Generator(run.device).manual_seed(int(run.rng.integers(2**62)))
    batch, timing = rollout(
        run.policy,
        run.reference,
        [p for p in prompts for _ in range(g)],
        run.task.score,
        cfg,
        generator,
        run.stop_tokens,
        run.ctx,
        run.gen_ctx,
        run.engines,
    )
    batch.group_size = g
    run.timing = timing
    return batch


@torch.no_grad()
def evaluate_model(model, reference, task, cfg, tok, seed, vocabulary, ref_nll=None, ctx=nullcontext(), engines=None):
    """One sample per held-out prompt of the task from model (a Transformer), from a generator seeded
    with seed, so that two models draw from the same random stream, measured against reference
    (metrics.of_rollouts); sampled by the C engine where engines (rollouts.Engines, whose reference is
    reference's) are given. Returns the measures and the samples."""
    generator = torch.Generator(model.freqs_cos.device).manual_seed(seed)
    stop = (tok.bos_id, tok.eos_id)
    batch, _ = rollout(
        Policy(model), Policy(reference), task.eval_prompts, task.score, cfg, generator, stop, ctx, engines=engines
    )
    return metrics.of_rollouts(batch, task.eval_prompts, tok, task, vocabulary, ref_nll)


def evaluate(run, model):
    """The run's held-out evaluation of model, and the validation perplexity: the 'eval/' columns of the log."""
    m, _ = evaluate_model(
        model,
        run.reference.model,
        run.task,
        run.cfg,
        run.tok,
        run.cfg["seed"],
        run.vocabulary,
        run.ref_nll,
        run.ctx,
        run.engines,
    )
    m["val_ppl"] = metrics.val_perplexity(model, run.val_bin, 32, run.cfg["seed"], ctx=run.ctx)
    return {f"eval/{k}": v for k, v in m.items()}


def save(run):
    heads = {"value_head": run.policy.value_head.state_dict()} if run.policy.value_head is not None else {}
    rl_state = {
        "method": run.method.__name__,
        "reference": run.reference.model.state_dict(),
        "heads": heads,
        "kl_coef": run.kl_ctl.value if run.kl_ctl else None,
    }
    checkpoint.save(
        run.ckpt_path,
        "rl",
        run.policy.model.state_dict(),
        run.model_args,
        run.start["tokenizer"],
        run.start["data_dir"],
        config=run.cfg,
        iter_num=run.iter_num,
        best_val_loss=run.start["best_val_loss"],
        optimizer=run.optimizer.state_dict(),
        rl=rl_state,
    )


PLOT_SECONDS = 60  # the curves' figure is drawn at the end and at a save this long after the last (it takes seconds)


def check_finite(run, stats):
    """A reward or KL that is not finite stops the run before anything is saved."""
    for key in ("env/reward_mean", "objective/kl", "loss"):
        if key in stats and not math.isfinite(stats[key]):
            raise DataError(
                f"iteration {run.iter_num}: {key} is {stats[key]}; check the reward settings "
                f"(--reward, --target_len). Nothing was saved: {run.ckpt_path} is as it was"
            )


def train(cfg, given, method):
    """The loop every method shares. Every iteration: next_batch() (its random draws from rng, seeded by
    (seed, rank, iteration): a resumed run continues the same streams), method.iteration(run, batch),
    the statistics (the mean over ranks) to {method}_log.jsonl; every eval_interval iterations, rank 0
    evaluates on held-out prompts and writes the checkpoint."""
    with one_line_errors():
        run = setup(cfg, given, method)  # reads only: a run already writing in out_dir is refused just below
        lock = out_dir_lock(cfg["out_dir"])
        run.vocabulary = metrics.training_words(run.start["data_dir"]) if run.rank == 0 else None
        wandb_run = start_wandb(run.cfg, cfg["out_dir"]) if run.rank == 0 else None
    cfg, master = run.cfg, run.rank == 0
    log = MetricsLog(run.log_path, run.iter_num if run.resuming else None, master, wandb_run)
    if master:
        unit = "pairs" if method.UNIT == "pairs" else "rollouts"
        print(
            f"{method.__name__.upper()} from {run.start_path} at iteration {run.iter_num}: {run.episodes} {unit} per "
            f"iteration, reward {cfg['reward']}, {run.dtype}, attention {run.attention}, "
            f"rollouts by {'the C engine' if run.engines else 'PyTorch'}"
        )
        start = evaluate(run, run.reference.model)  # the starting model's own samples: the fluency baseline
        run.ref_nll = start["eval/nll"]
        if not run.resuming:
            log({"iter": 0, "episode": 0, **start, "eval/nll_ratio": 1.0})
    bar = tqdm(total=cfg["max_iters"], initial=run.iter_num, disable=not master, unit="it", dynamic_ncols=True)
    plotted = time.time()
    while run.iter_num < cfg["max_iters"]:
        t0, c0 = (
            time.perf_counter(),
            time.process_time(),
        )  # wall and CPU seconds: a shared machine inflates only the wall
        lr = get_lr(run.iter_num, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.rng = np.random.default_rng([cfg["seed"], run.rank, run.iter_num])
        run.shuffle = torch.Generator().manual_seed(int(run.rng.integers(2**62)))
        run.timing = {}
        batch = next_batch(run)
        with one_line_errors():
            stats = method.iteration(run, batch)
        if method.UNIT != "pairs":
            stats = {**rollout_stats(batch), **stats, **run.timing}
        stats = {
            **stats,
            "time/total": time.perf_counter() - t0,
            "time/cpu": time.process_time() - c0,
            "learning_rate": lr,
        }
        if run.kl_ctl:
            stats["objective/kl_coef"] = run.kl_ctl.value
        if run.ddp:  # the mean over ranks, so that the controller and the log see every rank's data
            data = (
                batch.tokens if method.UNIT != "pairs" else torch.tensor([len(p[0]) for p in batch], device=run.device)
            )
            stats = {**mean_over_ranks(stats, run.device), **rank_sums(run.policy, data)}
        with one_line_errors():
            check_finite(run, stats)
        if run.kl_ctl:
            run.kl_ctl.update(stats["objective/kl"], run.episodes)
        run.iter_num += 1
        bar.update(1)
        if not master:
            continue
        row = {"iter": run.iter_num, "episode": run.iter_num * run.episodes, **stats}
        if "fluency/nll" in row:
            row["fluency/nll_ratio"] = row["fluency/nll"] / run.ref_nll
        if run.iter_num % cfg["eval_interval"] == 0 or run.iter_num == cfg["max_iters"]:
            t0, c0 = time.perf_counter(), time.process_time()
            row.update(evaluate(run, run.policy.model))
            row.update({"time/eval": time.perf_counter() - t0, "time/eval_cpu": time.process_time() - c0})
        if "eval/kl" in row:
            with one_line_errors():  # e.g. a full disk: one line, and the earlier checkpoint (and log) stay
                save(run)
        log(row)
        if "eval/kl" in row:
            log.commit()  # after the save: the log never runs ahead of its checkpoint
        if "eval/kl" in row and (run.iter_num == cfg["max_iters"] or time.time() - plotted > PLOT_SECONDS):
            with one_line_errors():
                plots.rl_log(run.log_path, os.path.splitext(run.log_path)[0] + ".png", cfg.get("target_len"))
            plotted = time.time()
        shown = ("env/reward_mean", "loss", "objective/kl", "tokens/responses_len_mean")
        bar.set_postfix({k.split("/")[-1]: f"{row[k]:.3g}" for k in shown if k in row})
    bar.close()
    if run.ddp:
        dist.destroy_process_group()
    lock.close()


def main(name, argv, ignored=()):
    """An RL stage's command line: the method's config with argv's recipes and --key=value flags (train.py's
    other keys, `ignored`, accepted), then train()."""
    with one_line_errors():
        method = find_method(name)
    cfg, given = configurator.configure(method.config, argv, ignored=ignored)
    train(cfg, given, method)
