"""
The anchor our RL and SFT benchmarks compare against: Hugging Face TRL's GRPOTrainer and SFTTrainer on
our model (exported as a transformers directory) and our instruction data, every setting mirrored from
ours, timed by phase. It runs in its own venv and imports our instruct.py for the reward:

    python3 -m venv trl-venv && trl-venv/bin/pip install torch==2.13.0
    trl-venv/bin/pip install trl==1.16.0 lemminflect==0.2.3 sentencepiece protobuf

    python export.py out/hf_sft --checkpoint=out/sft_ckpt.pt --version=-1
    trl-venv/bin/python bench/trl_anchor.py --mode=grpo --model=out/hf_sft --iterations=10 --save=out/hf_trl_grpo
    python export.py out/hf --checkpoint=out/ckpt.pt --version=-1
    trl-venv/bin/python bench/trl_anchor.py --mode=sft --model=out/hf --iterations=600 --save=out/hf_trl_sft
    python export.py out/trl_sft.pt --hf=out/hf_trl_sft      # back to our checkpoint: sample.py, compare.py

It prints one JSON line. grpo: the median wall seconds of an iteration (one generation of batch_size x
num_mini_batches rollouts and its optimizer steps) after --warmup iterations, split into phases, and
each iteration's mean reward; sft: seconds per 1,000 examples and each step's loss. "trl_config" holds
the GRPOConfig / SFTConfig fields set here; every other field is TRL's default.

Mirrored: the prompts (BOS + a training header's tokens: checked against our tokenizer), the stop
tokens (BOS or EOS: checked), the reward (instruct.reward minus missing_eos_penalty where no stop token
came), groups, minibatches and epochs, AdamW (betas 0.9/0.95, no weight decay, clip 1.0, constant rate),
the 'grpo' loss with the k3 KL per token, the clip range, the advantages over the group's std, the
temperature, each response's cap (see below), fp32, no dropout. On one minibatch TRL's loss and
reference log-probs equal ours to 1e-6 (checked by hand). SFT: BOS + header + story + BOS token for
token, the loss on the story and its end only (both checked), batch 16, warmup then cosine to lr/10.

Not mirrored, and not without rewriting TRL:
  - the sampler: transformers' generate(), not model.py's; the same seed gives other stories;
  - prompts: TRL walks shuffled passes over the headers; ours draws them with replacement;
  - minibatches: TRL shuffles an iteration's rollouts once, so a group may span two optimizer steps,
    and keeps that order for every epoch (num_iterations); ours keeps groups whole and reshuffles;
  - the cap: TRL has one max_completion_length; ours gives each prompt min(max_new_tokens, the
    context's room). Here generate() runs to the shortest prompt's room and each completion is cut at
    its own (cap_to_context): our cap, for a few wasted tokens on long prompts;
  - the old policy's log-probs: TRL skips them where an iteration is one optimizer step (the ratio is
    1 then anyway); ours always computes them, so forward_pass is not like for like there;
  - SFT's warmup: transformers gives step s of warmup_iters lr * s/warmup_iters (0 at the first), ours
    lr * (s+1)/(warmup_iters+1); the cosine after it is the same. TRL walks shuffled epochs; ours
    draws every batch at random;
  - ours only: PPO-ptx (--ptx_coef), the adaptive KL coefficient, the held-out evaluation.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
GRPO_ONLY = ("group_size", "num_mini_batches", "ppo_epochs", "beta", "cliprange", "temperature", "max_new_tokens")
GRPO_ONLY += ("missing_eos_penalty",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("grpo", "sft"), required=True)
    p.add_argument("--model", required=True, help="a transformers directory: export.py DIR --version=-1")
    p.add_argument("--data_dir", default="data", help="holds tok{vocab_size}/instruct_train.jsonl")
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--iterations", type=int, default=10, help="grpo: iterations; sft: optimizer steps (max_iters)")
    p.add_argument("--batch_size", type=int, default=None, help="grpo: rollouts a minibatch (8); sft: examples (16)")
    p.add_argument("--learning_rate", type=float, default=None, help="grpo 1e-4, sft 1e-3")
    p.add_argument("--group_size", type=int, default=8, help="grpo: samples a prompt (num_generations)")
    p.add_argument("--num_mini_batches", type=int, default=8, help="grpo: optimizer steps an epoch")
    p.add_argument("--ppo_epochs", type=int, default=1, help="grpo: passes over an iteration (num_iterations)")
    p.add_argument("--beta", type=float, default=0.04, help="grpo: the KL's coefficient (our init_kl_coef)")
    p.add_argument("--cliprange", type=float, default=0.2, help="grpo: epsilon")
    p.add_argument("--temperature", type=float, default=1.0, help="grpo")
    p.add_argument("--max_new_tokens", type=int, default=300, help="grpo: lowered to the context's room")
    p.add_argument("--missing_eos_penalty", type=float, default=1.0, help="grpo: for a story cut off at the cap")
    p.add_argument("--warmup_iters", type=int, default=20, help="sft: the learning rate's warmup")
    p.add_argument("--warmup", type=int, default=1, help="iterations (sft: steps) left out of the timing")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    p.add_argument("--save", default="", help="write the trained model here, a transformers directory")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.mode == "grpo" else 16)
    args.learning_rate = args.learning_rate or (1e-4 if args.mode == "grpo" else 1e-3)
    return args


# -----------------------------------------------------------------------------
# what both modes share


def trl_config(args, ctx, shortest_prompt):
    """The GRPOConfig or SFTConfig fields that mirror our settings."""
    optimizer = dict(optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0)
    batch = dict(per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1)  # a step a minibatch
    # TRL's defaults are bf16 and activation (gradient) checkpointing; ours runs fp32 and never recomputes
    system = dict(use_cpu=True, bf16=False, activation_checkpointing=False, seed=args.seed)
    quiet = dict(logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    loader = dict(dataloader_num_workers=0, dataloader_pin_memory=False)
    common = dict(learning_rate=args.learning_rate, **optimizer, **batch, **system, **quiet, **loader)
    if args.mode == "sft":  # our get_lr: warmup, then cosine to lr/10 at max_iters
        schedule = dict(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1})
        # a story ends with BOS, as in our token files; max_length: our examples fit the context
        data = dict(completion_only_loss=True, packing=False, max_length=ctx, eos_token="<s>", pad_token="</s>")
        return dict(common, max_steps=args.iterations, warmup_steps=args.warmup_iters, **schedule, **data)
    # an iteration: one generation of batch_size x num_mini_batches rollouts, ppo_epochs passes over it in
    # num_mini_batches optimizer steps each
    steps = dict(num_generations=args.group_size, steps_per_generation=args.num_mini_batches)
    steps.update(num_iterations=args.ppo_epochs, max_steps=args.iterations * args.num_mini_batches * args.ppo_epochs)
    loss = dict(loss_type="grpo", beta=args.beta, epsilon=args.cliprange, scale_rewards="group", disable_dropout=True)
    cap = min(args.max_new_tokens, ctx - shortest_prompt)  # the longest room; each prompt's: cap_to_context
    sampling = dict(temperature=args.temperature, top_p=1.0, top_k=0, max_completion_length=cap, use_vllm=False)
    return dict(common, lr_scheduler_type="constant", warmup_steps=0, **steps, **loss, **sampling)


class Clock:
    """Wall seconds of each iteration (it ends at the optimizer step that completes it) and, inside it,
    the seconds spent in the trainer's methods wrapped by time()."""

    def __init__(self, steps_per_iteration):
        self.steps, self.walls, self.rows, self.start = steps_per_iteration, [], [defaultdict(float)], None

    def time(self, trainer, method, name):
        inner = getattr(trainer, method)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.rows[-1][name] += time.perf_counter() - t0

        setattr(trainer, method, timed)

    def step(self, global_step):
        """True where the step ended an iteration."""
        if global_step % self.steps:
            return False
        now = time.perf_counter()
        self.walls.append(now - self.start)
        self.start = now
        self.rows.append(defaultdict(float))
        return True

    def median(self, warmup, phases=None):
        """The median wall seconds of the iterations after warmup, or of each phase, phases(row, wall) -> {name: s}."""
        timed = slice(warmup, None) if len(self.walls) > warmup else slice(None)
        if phases is None:
            return round(statistics.median(self.walls[timed]), 4)
        rows = [phases(dict(r), w) for r, w in zip(self.rows[timed], self.walls[timed])]
        return {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}


def train(trainer, clock, on_iteration=None, losses=None):
    """trainer.train() with the clock running, stdout kept for the JSON line (TRL's log printer goes)."""
    from transformers import PrinterCallback, TrainerCallback

    class Hooks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if clock.step(state.global_step) and on_iteration:
                on_iteration(len(clock.walls))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if losses is not None and "loss" in (logs or {}):
                losses.append(round(logs["loss"], 4))

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Hooks())
    trainer.train()


def save(trainer, args):
    """The trained model as a transformers directory, beside the source's tokenizer files (TRL saves its
    tokenizer without tokenizer.model, which export.py --hf reads)."""
    import trl

    config = trainer.model.config
    config.use_cache = True  # TRL turns the KV cache off for training
    if hasattr(config, "exported_by"):
        del config.exported_by  # no longer our export.py's (export.py would overwrite what it takes for its own)
    config.trained_by = f"TRL {trl.__version__} {args.mode} (bench/trl_anchor.py)"
    trainer.save_model(args.save)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(args.model, name), os.path.join(args.save, name))
    print(f"wrote {args.save}/", file=sys.stderr)


# -----------------------------------------------------------------------------
# GRPO


def check_grpo_inputs(trainer, tok, headers, n=2000):
    """The prompt ids TRL feeds generate() are ours (BOS + the header's sentencepiece ids), and generation
    stops at BOS and EOS."""
    trl_ids = trainer._tokenize_prompts(headers[:n])[0]
    bad = [h for h, ids in zip(headers, trl_ids) if list(ids) != tok.encode(h)]
    if bad:
        sys.exit(f"error: TRL tokenizes {len(bad)} of {len(trl_ids)} headers otherwise than ours, e.g. {bad[0]!r}")
    stops = set(trainer.generation_config.eos_token_id)
    if not {tok.bos_id, tok.eos_id} <= stops:
        sys.exit(f"error: TRL's generation stops at {sorted(stops)}, not at BOS {tok.bos_id} and EOS {tok.eos_id}")


def cap_to_context(trainer, max_new_tokens, ctx):
    """Cut each completion at ours's cap, min(max_new_tokens, ctx - its prompt's length): generate() ran
    to the longest (transformers warns that a row ran past the context), and the tokens kept were
    sampled as they would have been under their own cap."""
    generate = trainer._generate_single_turn

    def within_context(prompt_ids, *a, **k):
        completion_ids, logprobs = generate(prompt_ids, *a, **k)
        caps = [min(max_new_tokens, ctx - len(p)) for p in prompt_ids]
        return [c[:cap] for c, cap in zip(completion_ids, caps)], logprobs

    trainer._generate_single_turn = within_context


def grpo(args, examples, ctx, work_dir):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import instruct
    from metrics import END, response_text
    from tokenizer import Tokenizer

    tok = Tokenizer(os.path.join(args.model, "tokenizer.model"))
    headers = [e["header"] for e in examples]
    rewards, ended = [], []  # per iteration: the reward function is called once a generation

    def instruct_reward(prompts, completions, completion_ids, **_):
        """Our score (tasks.score_rollouts of instruct.score): the text the response adds to its prompt,
        decoded as ours decodes it, checked, minus the penalty where it was cut off at the cap."""
        out, stops = [], []
        for header, ids in zip(prompts, completion_ids):
            stop = bool(ids) and ids[-1] in (tok.bos_id, tok.eos_id)  # TRL's completions end at the first stop
            text = response_text(tok, tok.encode(header), ids).removesuffix(END)
            out.append(instruct.reward(text, header) - args.missing_eos_penalty * (not stop))
            stops.append(stop)
        rewards.append(round(sum(out) / len(out), 4))
        ended.append(round(sum(stops) / len(stops), 4))
        return out

    config = trl_config(args, ctx, min(len(tok.encode(h)) for h in headers))
    trainer = GRPOTrainer(
        model=args.model,
        reward_funcs=instruct_reward,
        args=GRPOConfig(output_dir=work_dir, **config),
        train_dataset=Dataset.from_list([{"prompt": h} for h in headers]),
    )
    check_grpo_inputs(trainer, tok, headers)
    cap_to_context(trainer, args.max_new_tokens, ctx)

    # The seams, GRPOTrainer's own methods. An iteration's first training_step calls _prepare_inputs,
    # which calls _generate_and_score_completions once for the iteration's rollouts (the other steps
    # take their slice of them):
    #   rollout       _generate: tokenize the prompts, transformers' generate() (KV cache), decode
    #   score         _calculate_rewards: our reward function on every completion
    #   forward_pass  the rest of _generate_and_score_completions: the no-grad forward passes of the
    #                 old policy (where an iteration has several optimizer steps) and of the reference
    #                 (beta > 0), the padding, the group advantages
    #   optimize      the rest of the iteration: each minibatch's forward and backward pass (compute_loss),
    #                 the clipping, AdamW, the trainer's logging
    clock = Clock(args.num_mini_batches * args.ppo_epochs)
    clock.time(trainer, "_generate", "rollout")
    clock.time(trainer, "_calculate_rewards", "score")
    clock.time(trainer, "_generate_and_score_completions", "generate_and_score")

    def progress(i):
        print(f"iteration {i}: reward {rewards[-1]:.4f}, {clock.walls[-1]:.2f}s", file=sys.stderr)

    def phases(row, wall):
        inside = row.pop("generate_and_score", 0.0)
        return {**row, "forward_pass": inside - row["rollout"] - row["score"], "optimize": wall - inside}

    train(trainer, clock, progress)
    if args.save:
        save(trainer, args)
    return {
        "seconds_per_iteration": clock.median(args.warmup),
        "phases": clock.median(args.warmup, phases),
        "rollouts_per_iteration": args.batch_size * args.num_mini_batches,
        "reward_mean": rewards,
        "ended_frac": ended,
    }, config


# -----------------------------------------------------------------------------
# SFT


def check_sft_inputs(trainer, args, ctx, n_labels=4):
    """Every example's input ids are our token file's (BOS + header + story + BOS), and in a collated batch
    of the first few the loss counts exactly the story's tokens and its end."""
    import instruct_data

    token_dir = os.path.join(args.data_dir, f"tok{args.vocab_size}")
    data, starts, prompt_lens, lengths = instruct_data.read_examples(token_dir, "train", ctx)
    ds = trainer.train_dataset
    bad = sum(row["input_ids"] != data[s : s + n].tolist() for row, s, n in zip(ds, starts, lengths))
    if bad or len(ds) != len(starts):
        sys.exit(f"error: TRL's input ids differ from our token file's in {bad} of {len(starts)} examples")
    labels = trainer.data_collator([ds[i] for i in range(n_labels)])["labels"]
    for i in range(n_labels):
        counted = (labels[i] != -100).nonzero().flatten().tolist()
        if counted != list(range(int(prompt_lens[i]), int(lengths[i]))):
            sys.exit(f"error: example {i}: TRL's loss counts positions {counted[:3]}..., not the story and its end")


def sft(args, examples, ctx, work_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    # TRL tokenizes prompt + completion as one text: the space is the story's first piece's leading space
    # (ours encodes the two apart), and the "<s>" TRL appends must be read as BOS, not as its letters
    tokenizer = AutoTokenizer.from_pretrained(args.model, split_special_tokens=False)
    data = Dataset.from_list([{"prompt": e["header"], "completion": " " + e["story"]} for e in examples])
    config = trl_config(args, ctx, 0)
    trainer = SFTTrainer(
        model=args.model, args=SFTConfig(output_dir=work_dir, **config), train_dataset=data, processing_class=tokenizer
    )
    check_sft_inputs(trainer, args, ctx)
    clock, losses = Clock(1), []  # an optimizer step is the unit here: the phases are one forward and backward
    train(trainer, clock, losses=losses)
    if args.save:
        save(trainer, args)
    seconds = round(clock.median(args.warmup) * 1000 / args.batch_size, 3)
    return {"seconds_per_1000_examples": seconds, "loss": losses}, config


# -----------------------------------------------------------------------------


def main():
    args = parse_args()
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(key, "1")  # everything is local: the hub is never asked
    import torch
    import transformers
    import trl

    if args.threads:
        torch.set_num_threads(args.threads)
    missing = [f for f in ("config.json", *TOKENIZER_FILES) if not os.path.isfile(os.path.join(args.model, f))]
    if missing:
        sys.exit(f"error: {args.model} has no {', '.join(missing)}: export one with export.py DIR --version=-1")
    if args.save and os.path.isdir(args.save) and os.listdir(args.save):
        sys.exit(f"error: {args.save} is not empty: save into a new or empty directory")
    path = os.path.join(args.data_dir, f"tok{args.vocab_size}", "instruct_train.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: no {path}; run `python tinystories.py instruct --vocab_size={args.vocab_size}` first")
    with open(path, encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(args.model, "config.json")) as f:
        ctx = json.load(f)["max_position_embeddings"]  # our max_seq_len

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:  # TRL's output_dir; nothing is kept there
        out, config = (grpo if args.mode == "grpo" else sft)(args, examples, ctx, work_dir)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    other = GRPO_ONLY if args.mode == "sft" else ("warmup_iters",)
    settings = {k: v for k, v in vars(args).items() if k not in other}
    result = dict(mode=args.mode, settings=settings, iterations=args.iterations, **out)
    result.update(seconds_total=round(time.perf_counter() - t0, 2), trl_config=config, threads=torch.get_num_threads())
    result.update(torch=torch.__version__, trl=trl.__version__, transformers=transformers.__version__, cpu=cpu)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
