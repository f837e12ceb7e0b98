"""
Reinforcement learning for the story model: what every method shares. A method is one file that
declares its config keys, its UNIT (what an iteration trains on: 'rollouts', 'groups' of rollouts of
one prompt, or preference 'pairs'), whether its policy has a VALUE_HEAD, and iteration(run, batch);
train.py finds it by its name:

    python train.py --rl=ppo                       # out/ckpt.pt -> out/ppo_ckpt.pt; later runs resume from it
    python train.py recipes/length_ppo.conf        # a recipe file: the method and its settings
    python train.py --rl=grpo --reward=instruct    # from out/sft_ckpt.pt: stories that follow instructions
    torchrun --standalone --nproc_per_node=2 train.py --rl=rloo

| method      | file            | unit     | advantage                              | KL to the reference       |
|-------------|-----------------|----------|----------------------------------------|---------------------------|
| PPO         | ppo.py          | rollouts | GAE on a value head                    | per token, in the reward  |
| GRPO        | grpo.py         | groups   | score against its group's mean and std | k3 per token, in the loss |
| RLOO        | rloo.py         | groups   | reward against the mean of the others  | k1 summed, in the reward  |
| REINFORCE++ | reinforce_pp.py | rollouts | return, whitened over the whole batch  | per token, in the reward  |
| DPO         | dpo.py          | pairs    | (offline: the log-ratio is the reward) | implicit, beta            |

Here, in the order the data flows: the configuration the methods share; the policy, its
log-probabilities and masked statistics; the KL estimators and controllers; the optimisation:
minibatches that keep groups whole, PPO-ptx mixed in. rollouts.py samples and scores the rollouts
(in PyTorch or the C engine); rl_train.py holds the loop around them all: set-up, resume, DDP, the
log, evaluation and checkpoints.
"""

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tasks
from common import DataError
from model import ATTENTION_KERNELS
from tinystories import iter_batches

# -----------------------------------------------------------------------------
# configuration: a method's keys are some of these groups plus its own, (default, rule) as configurator.py
# reads them. Keys train.py also has keep its names and meanings, so that its command lines (and the
# llama2.c PPO fork's) run unchanged; train.py's other keys are accepted and ignored.

RUN = dict(  # every method
    out_dir="out",  # from out_dir/ckpt.pt (sft_ckpt.pt for --reward=instruct) to, and resuming from, {method}_ckpt.pt
    init_from=("resume", "resume"),  # RL starts from a trained model: train.py's key, with its one meaning here
    overwrite=False,  # start afresh from the starting checkpoint even where {method}_ckpt.pt exists, replacing it
    eval_interval=(10, "> 0"),  # evaluate and write the checkpoint every this many iterations, and at the end
    eval_prompts=(64, "> 0"),  # held-out prompts of that evaluation, one sample each
    seed=1337,
    data_dir="",  # empty: the checkpoint's (a different one is refused)
    vocab_size=(0, ">= 0"),  # 0: the checkpoint's (a different one is refused)
    batch_size=(8, "> 0"),  # rollouts (DPO: pairs) per minibatch, one optimizer step each
    max_iters=(50, ">= 0"),  # iterations
    learning_rate=(1e-4, "> 0"),  # the fork's; pretraining's 1e-3 wrecks a trained policy
    weight_decay=(0.0, ">= 0"),  # decay would pull the weights toward 0, not toward the starting model
    beta1=(0.9, "[0, 1)"),
    beta2=(0.95, "[0, 1)"),
    grad_clip=(1.0, ">= 0"),  # 0.0 = off
    decay_lr=False,  # constant, as the fork and TRL; True: train.py's warmup and cosine decay
    warmup_iters=(0, ">= 0"),
    lr_decay_iters=(0, ">= 0"),  # 0 = max_iters
    min_lr=(0.0, ">= 0"),  # 0.0 = learning_rate / 10
    device="auto",  # 'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype=("auto", "auto | float32 | bfloat16 | float16"),  # autocast of the forward passes and updates
    attention=("auto", " | ".join(ATTENTION_KERNELS)),  # causal attention of the forward passes (model.set_attention)
    compile=False,  # torch.compile of the policy's passes in the update, for shapes that change from step to step
    rollout_engine=("auto", "auto | c | torch"),  # who samples and scores the rollouts (rollouts.py); auto: C on a CPU
    wandb_log=False,  # llama2.c's experiment-tracking keys: every row of {method}_log.jsonl also goes to W&B
    wandb_project="tinystories-rl",
    wandb_run_name="",  # empty: wandb names the run
    ptx_coef=(0.0, ">= 0"),  # PPO-ptx (InstructGPT): + ptx_coef x the pretraining loss at every optimizer step
    ptx_batch_size=(8, "> 0"),  # windows of the model's context from the training token file, per optimizer step
)
SAMPLING = dict(  # every method: the rollouts and the evaluation's samples
    start_len=(30, "> 0"),  # story prompts: the first start_len tokens of a real story, BOS included (1 = BOS only)
    max_new_tokens=(300, "> 0"),  # the response cap; lowered to what the model's context leaves after the prompt
    temperature=(1.0, "> 0"),  # sampling temperature; the log-probs are those of the tempered distribution
)
ONLINE = dict(  # the methods that sample: PPO, GRPO, RLOO, REINFORCE++
    prompt_split=("train", "train | val"),  # where the training prompts come from (the evaluation's: always held out)
    num_mini_batches=(8, "> 0"),  # rollouts per iteration and rank = num_mini_batches * batch_size (the fork: 8 x 50)
    ppo_epochs=(1, "> 0"),  # passes over an iteration's rollouts, in shuffled minibatches
    cliprange=(0.2, "> 0"),  # the policy ratio stays within 1 +- cliprange
    init_kl_coef=(0.2, ">= 0"),  # the KL's coefficient (Ziegler's beta, GRPO's beta)
    adap_kl_ctrl=True,  # adapt the coefficient toward target_kl (Ziegler et al.); False: fixed
    target_kl=(6.0, "> 0"),  # nats per response
    kl_horizon=(10000, "> 0"),  # rollouts over which the controller closes a relative error of 1
    kl_estimator=(
        "k1",
        "k1 | k3",
    ),  # per token: k1 = log p/p_ref, k3 = r - 1 - log r with r = p_ref/p (both unbiased, k3 >= 0)
    kl_in=(
        "reward",
        "reward | loss",
    ),  # a per-token penalty in the rewards (Ziegler, TRL's PPO, RLOO) or a loss term (GRPO)
    kl_reduction=("sum", "sum | mean"),  # a response's KL: the sum over its tokens, or the mean per token
)


def method_config(*groups, **own):
    """A method's declared config: rl.py's groups, tasks.py's, and its own keys (which win)."""
    config = {}
    for group in groups:
        config.update(group)
    return {**config, **tasks.CONFIG, **own}


# -----------------------------------------------------------------------------
# the policy, log-probabilities and masked statistics


class Policy(nn.Module):
    """A language model as a policy: forward(tokens, prompt_lens, R) -> the logits (B, R, vocab_size) at
    the R positions that predict each row's response tokens (row b's response starts after its
    prompt_lens[b] prompt tokens), in fp32 where the log-probability bookkeeping happens, and the
    values (B, R) of a value head (PPO), a Linear(dim, 1) on the same final hidden states, or None.
    The value head starts at zero, so the first values are 0 rather than noise. The trunk runs in
    the caller's autocast. Given each row's length (prompt and response, lengths (B,)) and the C
    attention, the trunk runs on the rows packed into one sequence, without their padding (an RL
    minibatch's responses differ by tens of tokens) and with each group's prompt once, where that
    is shorter: the same results, up to rounding, from fewer tokens. Given targets (B, R), the
    response tokens, it returns their log-probabilities at temperature and each position's entropy
    (B, R) in place of the logits, computed at the real positions only (a row's first lengths -
    prompt_lens, all R without lengths; 0 past them) and without the logits ever whole (TokenLogprobs)."""

    def __init__(self, model, value_head=False):
        super().__init__()
        self.model = model
        self.value_head = nn.Linear(model.params.dim, 1) if value_head else None
        if value_head:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, tokens, prompt_lens, R, lengths=None, targets=None, temperature=1.0):
        h = None
        if lengths is not None and self.model.attention_kernel == "c":
            h = self.packed_hidden(tokens, prompt_lens, R, lengths)
        if h is None:
            h = self.model.hidden(tokens[:, :-1])  # (B, T-1, dim): position t predicts token t+1
            if isinstance(prompt_lens, int):
                h = h[:, prompt_lens - 1 : prompt_lens - 1 + R]
            else:
                idx = (prompt_lens[:, None] - 1 + torch.arange(R, device=h.device)).clamp(max=h.size(1) - 1)
                h = h.gather(1, idx[..., None].expand(-1, -1, h.size(-1)))  # (B, R, dim)
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            values = self.value_head(h).squeeze(-1) if self.value_head is not None else None
            if targets is None:
                return self.model.output(h), values
            real = torch.ones_like(targets, dtype=torch.bool)
            if lengths is not None:
                real = torch.arange(R, device=h.device) < (lengths - prompt_lens)[:, None]
            logprobs, entropy = TokenLogprobs.apply(h[real], self.model.output.weight, targets[real], temperature)
            zeros = h.new_zeros(real.shape)
            return zeros.masked_scatter(real, logprobs), zeros.masked_scatter(real, entropy), values

    def packed_hidden(self, tokens, prompt_lens, R, lengths):
        """forward()'s hidden states (B, R, dim), from one pass over the rows packed into one sequence
        without their padding: each prompt once, continued by the responses of the rows that share it
        (a group's, which stand together), each up to its last token (which predicts nothing). None
        where the pack would be no shorter than the padded rows (the rows as long, the prompts apart)."""
        device, P, n = tokens.device, prompt_lens.tolist(), lengths.tolist()
        pieces, positions, bounds, parents = [], [], [0], []
        first, own, last = [], [], []  # where each row's response is predicted from in the pack: r = 0, 1, last
        for b in range(len(n)):
            if b == 0 or P[b] != P[b - 1] or not torch.equal(tokens[b, : P[b]], tokens[b - 1, : P[b]]):
                prompt = len(parents)  # a new prompt: a sequence of its own
                pieces.append(tokens[b, : P[b]])
                positions.append(torch.arange(P[b], device=device))
                parents.append(-1)
                bounds.append(bounds[-1] + P[b])
            first.append(bounds[prompt + 1] - 1)
            own.append(bounds[-1])
            m = max(n[b] - 1 - P[b], 0)  # the response's inputs: all its tokens but the last (none if empty)
            pieces.append(tokens[b, P[b] : P[b] + m])
            positions.append(torch.arange(P[b], P[b] + m, device=device))
            parents.append(prompt)
            bounds.append(bounds[-1] + m)
            last.append(max(bounds[-1] - 1, first[-1]))
        if bounds[-1] >= len(n) * (tokens.size(1) - 1):
            return None
        packed = tuple(torch.tensor(x, dtype=torch.int32, device=device) for x in (bounds, parents))
        h = self.model.hidden(torch.cat(pieces)[None], torch.cat(positions), packed=packed)[0]  # (tokens, dim)
        first, own, last = (torch.tensor(x, device=device)[:, None] for x in (first, own, last))
        r = torch.arange(R, device=device)
        return h[torch.where(r == 0, first, own + r - 1).minimum(last)]  # past a row's end: its last, masked


def make_optimizer(policy, cfg, device_type="cpu"):
    """AdamW over the policy: the model's groups (decay on matrices only, model.configure_optimizers) and
    its value head, undecayed."""
    optimizer = policy.model.configure_optimizers(
        cfg.get("weight_decay", 0.0), cfg["learning_rate"], (cfg.get("beta1", 0.9), cfg.get("beta2", 0.95)), device_type
    )
    if policy.value_head is not None:
        optimizer.add_param_group({"params": list(policy.value_head.parameters()), "weight_decay": 0.0})
    return optimizer


class TokenLogprobs(torch.autograd.Function):
    """For hidden states h (N, dim), output weights w (V, dim) and tokens (N,): log p of each token and
    the entropy of each row's distribution (N,), both under softmax(h @ w.T / temperature), in fp32. The
    logits are made a chunk of rows at a time and made again in the backward pass: an RL minibatch's
    (N, V) logits are tens of MB, and each of the half-dozen passes PyTorch's log_softmax, gather and
    entropy make over them would be bound by memory; a chunk's stay in the cache."""

    @staticmethod
    def forward(ctx, h, w, tokens, temperature):
        ctx.set_materialize_grads(False)  # no gradient where an output is unused (the entropy, mostly)
        logprobs, entropy, lse = (h.new_empty(len(h)) for _ in range(3))
        for rows in chunks(h, w):
            z = h[rows] @ w.t() / temperature
            top = z.amax(-1, keepdim=True)
            e = (z - top).exp_()
            total = e.sum(-1, keepdim=True)
            lse[rows] = (top + total.log()).squeeze(-1)
            logprobs[rows] = z.gather(1, tokens[rows, None]).squeeze(-1) - lse[rows]
            entropy[rows] = lse[rows] - (e.div_(total) * z).sum(-1)
        ctx.save_for_backward(h, w, tokens, lse, entropy)
        ctx.temperature = temperature
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_logprobs, g_entropy):
        h, w, tokens, lse, entropy = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for rows in chunks(h, w):
            log_p = h[rows] @ w.t() / ctx.temperature - lse[rows, None]
            p = log_p.exp()
            # d log p[token] / dz = onehot(token) - p;  d entropy / dz = -p (log p + entropy)
            if g_logprobs is None:
                g = torch.zeros_like(p)
            else:
                g = (p * -g_logprobs[rows, None]).scatter_add_(1, tokens[rows, None], g_logprobs[rows, None])
            if g_entropy is not None:
                g -= p * (log_p + entropy[rows, None]) * g_entropy[rows, None]
            g /= ctx.temperature
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[rows])
            if grad_w is not None:
                grad_w.addmm_(g.t(), h[rows])
        return grad_h, grad_w, None, None


def chunks(h, w):
    """TokenLogprobs' chunks of rows: slices of h of about 2^18 logits each (1 MB in fp32), 64 rows at least."""
    step = max(64, 2**18 // w.size(0))
    return [slice(start, start + step) for start in range(0, len(h), step)]


def forward_logprobs(policy, tokens, prompt_lens, responses, temperature, ctx=nullcontext(), lengths=None):
    """One forward pass of a policy: log p of the response tokens (B, R), the entropy at each of their
    positions (B, R) and the values (B, R) or None. lengths (B,): each row's tokens, prompt and response,
    for a packed pass (Policy), and the positions past a row's response, where both are 0."""
    with ctx:
        return policy(tokens, prompt_lens, responses.size(1), lengths, responses, temperature)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_var(x, mask):
    """Unbiased variance over the entries where mask is 1."""
    n = mask.sum()
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask) * n / (n - 1)


def masked_whiten(x, mask, shift_mean=True):
    """x scaled to std 1 (and mean 0 if shift_mean) over the masked entries; 0 elsewhere."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def at_tokens(scores, mask):
    """Scores as per-token rewards (B, R): scores (B,) on each row's last token, or scores already
    spread over the tokens (B, R, rollouts.Rollouts.token_scores) as they are."""
    if scores.dim() == 2:
        return scores * mask
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(scores)), mask.sum(1).long() - 1] = scores
    return rewards


def whiten(x):
    """Reward normalisation: the batch's values at mean 0 and std 1."""
    return (x - x.mean()) / (x.std() + 1e-8)


# -----------------------------------------------------------------------------
# KL to the reference: estimators, penalties, controllers


def kl_estimate(logprobs, ref_logprobs, estimator):
    """Per-token estimates (B, R) of KL(policy || reference) from tokens the policy sampled (Schulman 2020,
    "Approximating KL divergence"): k1 = log p - log p_ref, unbiased but often negative; k3 = (r - 1) - log r
    with r = p_ref / p, unbiased too and never negative, with less variance where the two are close."""
    log_ratio = logprobs - ref_logprobs
    return log_ratio if estimator == "k1" else torch.expm1(-log_ratio) + log_ratio


def kl_penalty(kl, mask, reduction):
    """Per-token KL (B, R) -> the share each token carries of its response's KL: all of its own ('sum':
    Ziegler et al.) or that divided by the response's length ('mean': a long story pays no more)."""
    kl = kl * mask
    return kl if reduction == "sum" else kl / mask.sum(1, keepdim=True)


def kl_loss(logprobs, ref_logprobs, mask, cfg):
    """The KL term of a loss (kl_in='loss'), averaged over responses, differentiable through logprobs.
    k1's expected gradient on the policy's own samples is zero: in a loss it needs k3 (GRPO's choice)."""
    return kl_penalty(kl_estimate(logprobs, ref_logprobs, cfg["kl_estimator"]), mask, cfg["kl_reduction"]).sum(1).mean()


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: a proportional controller on log(kl_coef), the error clipped to
    +-0.2, that steers the KL per response toward target over about horizon rollouts."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current, n_steps):
        proportional_error = min(max(current / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current, n_steps):
        pass


def kl_controller(cfg):
    if "init_kl_coef" not in cfg:
        return None
    if cfg["adap_kl_ctrl"]:
        return AdaptiveKLController(cfg["init_kl_coef"], cfg["target_kl"], cfg["kl_horizon"])
    return FixedKLController(cfg["init_kl_coef"])


# -----------------------------------------------------------------------------
# the optimisation: an iteration's minibatches, one optimizer step each, with PPO-ptx


def minibatches(batch, batch_size, epochs, generator):
    """epochs passes over the rows of batch in shuffled minibatches of batch_size rows; the groups of
    batch.group_size rows move together, never split (generator: a CPU torch.Generator). Yields
    (epoch, minibatch)."""
    g, device = batch.group_size, batch.tokens.device
    n_groups = len(batch.tokens) // g
    for epoch in range(epochs):
        order = torch.randperm(n_groups, generator=generator)
        rows = (order[:, None] * g + torch.arange(g)).flatten().to(device)
        for start in range(0, len(rows), batch_size):
            yield epoch, batch.rows(rows[start : start + batch_size])


def ptx_backward(run, ptx_batches):
    """PPO-ptx (Ouyang et al. 2022): backpropagate ptx_coef x the pretraining loss (the mean next-token
    cross-entropy) on the next (X, Y) windows of the training token file; returns the loss. Called before
    the step's RL loss, so that under DDP these gradients wait (no_sync) and are all-reduced once, with
    the RL loss's."""
    X, Y = next(ptx_batches)
    policy = run.train_policy
    with policy.no_sync() if isinstance(policy, DDP) else nullcontext():
        with run.ctx:
            logprobs, _, _ = policy(torch.cat([X, Y[:, -1:]], 1), 1, X.size(1), targets=Y)  # (B, T): of Y
        loss = -logprobs.mean()
        run.scaler.scale(run.cfg["ptx_coef"] * loss).backward()
    return loss.detach()


def optimizer_step(run, loss_fn, ptx_batches=None):
    """One optimizer step: the PPO-ptx gradients first (if ptx_batches), then loss_fn() -> (loss, stats)
    and its gradients, clipped at grad_clip. A loss or gradient norm that is not finite stops the run
    before the step. Returns the stats as floats, with ptx/loss and grad_norm."""
    run.optimizer.zero_grad(set_to_none=True)
    ptx = None if ptx_batches is None else ptx_backward(run, ptx_batches)
    loss, stats = loss_fn()
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    max_norm = run.cfg["grad_clip"] or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.train_policy.parameters(), max_norm)
    if not run.scaler.is_enabled() and not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        raise DataError(
            f"iteration {run.iter_num + 1}: the loss ({loss.item():.4g}) or gradient norm "
            f"({grad_norm.item():.4g}) is not finite; check the reward and the learning rate. "
            f"Nothing was saved: {run.ckpt_path} is as it was"
        )
    run.scaler.step(run.optimizer)
    run.scaler.update()
    stats = {**stats, "grad_norm": grad_norm, **({} if ptx is None else {"ptx/loss": ptx})}
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in stats.items()}


def optimize(run, batch, policy_loss, stop=None):
    """The optimisation of an online method: ppo_epochs passes over batch in shuffled minibatches of
    batch_size (groups whole), one optimizer_step() each. policy_loss(mb, logprobs, entropy, values)
    -> (loss, stats) gets a minibatch and one forward pass of the policy over it: log p of its response
    tokens (b, R), the entropy at their positions (b, R) and PPO's values. With kl_in='loss', kl_coef x the KL
    term joins the loss (logged as loss/kl). stop(stats) -> True ends the passes early. Returns the mean
    statistics, with the number of epochs run."""
    cfg, steps, epochs = run.cfg, [], 0
    ptx = ptx_batches(run) if cfg["ptx_coef"] else None
    for epoch, mb in minibatches(batch, cfg["batch_size"], cfg["ppo_epochs"], run.shuffle):

        def loss_fn():
            logprobs, entropy, values = forward_logprobs(
                run.train_policy,
                mb.tokens,
                mb.prompt_lens,
                mb.responses(),
                cfg["temperature"],
                run.ctx,
                mb.row_lengths(),
            )
            loss, stats = policy_loss(mb, logprobs, entropy, values)
            if cfg["kl_in"] == "loss":
                stats["loss/kl"] = kl_loss(logprobs, mb.ref_logprobs, mb.mask, cfg)
                loss = loss + run.kl_ctl.value * stats["loss/kl"]
            return loss, stats

        steps.append(optimizer_step(run, loss_fn, ptx))
        epochs = epoch + 1
        if stop is not None and stop(steps[-1]):
            break
    return {**mean_stats(steps), "epochs": epochs}


def mean_stats(steps):
    """The mean of each statistic over a list of {name: float}."""
    return {k: float(np.mean([s[k] for s in steps])) for k in steps[0]}


def ptx_batches(run):
    """This iteration's stream of pretraining windows for PPO-ptx (their draws follow from the iteration's rng)."""
    return iter_batches(
        run.train_bin,
        run.cfg["ptx_batch_size"],
        run.model_args["max_seq_len"],
        run.device,
        seed=int(run.rng.integers(2**31)),
        rank=run.rank,
    )
