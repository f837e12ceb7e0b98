"""
The starting model and a trained one side by side on held-out prompts: the one before/after report of
every RL method (ppo, grpo, rloo, reinforce_pp, dpo), as markdown and a PNG.

    python report.py --checkpoint=out/grpo_ckpt.pt                     # -> reports/grpo.md and .png
    python report.py --checkpoint=out/ppo_ckpt.pt --rm_path=out/rm.pt --report_path=reports/ppo_rlhf.md
    python report.py --checkpoint=out/dpo_ckpt.pt --before=out/ckpt.pt

"Before" is the starting model stored in the RL checkpoint (or --before). Both models answer the same
report_prompts validation prompts from the same seed, with the run's own sampling settings and
reward. The table: the score the run trained on (and, with --rm_path, a reward model's), length and
ending, the task's own measures (tasks.py), the judge (metrics.py; held out: no method trains on
it), KL to the starting model, the fluency measures (the NLL ratio and the share of known words),
distinct-n, and the validation perplexity. Then the run's timing from its log, and three stories side by side.
compare.py puts several models side by side, and the curves of several runs.
"""

import os

import checkpoint
import configurator
import metrics
import plots
import tasks
from common import atomic_open, autocast, one_line_errors, read_jsonl, resolve_device_dtype
from reward_model import load_reward_model
from rl_train import evaluate_model
from rollouts import Engines, choose_engine
from tinystories import SEPARATOR as END

# -----------------------------------------------------------------------------
config = dict(
    checkpoint="out/ppo_ckpt.pt",  # a checkpoint written by an RL stage ({method}_ckpt.pt)
    before="",  # the model to compare with; empty = the starting model stored in the checkpoint
    rm_path="",  # a reward model to score both with (e.g. out/rm.pt); empty = none beyond the run's own reward
    report_path="",  # empty = reports/{method}.md; the figure goes beside it, .png
    report_prompts=(200, "> 0"),  # held-out prompts, one sample each per model
    val_windows=(128, "> 0"),  # windows of the context of val.bin for the perplexity
    num_show=(3, ">= 0"),  # stories shown side by side
    seed=1337,
    data_dir="",  # empty: the checkpoint's (where an older one records none, give it)
    device="auto",
    dtype=("float32", "auto | float32 | bfloat16 | float16"),
    rollout_engine=("auto", "auto | c | torch"),  # who samples and scores (rollouts.py); auto: the C engine on a CPU
)
# -----------------------------------------------------------------------------

LABELS = {  # measure -> its row in the table
    "score": "score (the reward the run trained on)",
    "rm": "reward model",
    "len_mean": "mean response length (tokens)",
    "len_std": "std of response length",
    "within_10pct": "within ±10% of the target length",
    "ended": "ended the story by itself",
    "judge": "judge (held out)",
    "kl": "KL to the starting model (nats/response)",
    "nll_ratio": "fluency: NLL ratio under the starting model (1 = as before)",
    "word_share": "fluency: share of words found in the training text",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "val_ppl": "validation perplexity",
}
BOUNDED = ("within_10pct", "ended", "judge", "word_share", "distinct_2")  # the bar chart's measures, all in [0, 1]


def load_models(cfg, device):
    """The trained model, the one to compare it with, the RL checkpoint and its path's tokenizer."""
    ckpt = checkpoint.load(cfg["checkpoint"], device, kinds=("rl",))
    after = checkpoint.model_from(ckpt).to(device).eval()
    if cfg["before"]:
        start = checkpoint.model_from(checkpoint.load(cfg["before"], device))
    else:
        start = checkpoint.model_from(ckpt, ckpt["rl"]["reference"])
    return ckpt, start.to(device).eval(), after, checkpoint.tokenizer_of(ckpt, cfg["checkpoint"])


def main(cfg):
    with one_line_errors():
        device, device_type, dtype = resolve_device_dtype(cfg["device"], cfg["dtype"])
        ckpt, start, after, tok = load_models(cfg, device)
        run, method = ckpt["config"], ckpt["rl"]["method"]
        data_dir = checkpoint.data_dir_of(ckpt, cfg["checkpoint"], cfg["data_dir"])
        ctx = autocast(device_type, dtype)
        task = tasks.make_task(
            {**run, "eval_prompts": cfg["report_prompts"]},
            tok,
            data_dir,
            ckpt["model_args"]["max_seq_len"],
            device,
            ctx,
        )
        vocabulary = metrics.training_words(data_dir)
        judge_rm = load_reward_model(cfg["rm_path"], device) if cfg["rm_path"] else None
        md_path = cfg["report_path"] or os.path.join("reports", f"{method}.md")
        log_path = os.path.join(os.path.dirname(cfg["checkpoint"]), f"{method}_log.jsonl")
        val_bin = os.path.join(data_dir, f"tok{tok.n_words}", "val.bin")

    engines = Engines(start, start) if choose_engine(cfg["rollout_engine"], device_type, start) == "c" else None
    measures, samples = {}, {}
    for name, model in (("before", start), ("after", after)):
        print(f"{name}: {len(task.eval_prompts)} samples, their measures, the validation perplexity")
        ref_nll = measures["before"]["nll"] if name == "after" else None
        measures[name], samples[name] = evaluate_model(
            model, start, task, run, tok, cfg["seed"], vocabulary, ref_nll, ctx, engines
        )
        if judge_rm is not None:
            measures[name]["rm"] = sum(
                judge_rm.score_texts(
                    [(tok.decode(p[1:]), t) for p, t in zip(task.eval_prompts, samples[name]["texts"])]
                )
            ) / len(task.eval_prompts)
        measures[name]["val_ppl"] = metrics.val_perplexity(model, val_bin, cfg["val_windows"], cfg["seed"], ctx=ctx)
    measures["before"]["nll_ratio"] = 1.0

    rows = read_jsonl(log_path) if os.path.exists(log_path) else []
    minutes, cpu_minutes = (sum(r.get(k, 0.0) for r in rows) / 60 for k in ("time/total", "time/cpu"))
    episodes = rows[-1]["episode"] if rows else "?"
    kl_note = (
        (
            f"KL {run['init_kl_coef']} ({run['kl_estimator']}, in the {run['kl_in']}, "
            f"{run['kl_reduction']} over a response"
            f"{', adaptive toward ' + str(run['target_kl']) if run['adap_kl_ctrl'] else ''})"
        )
        if "init_kl_coef" in run
        else f"beta {run['beta']}, rpo_alpha {run['rpo_alpha']}, pairs `{run['pairs']}`"
    )
    md = [
        f"# {method.upper()}: the starting model and the trained one\n",
        f"- `{cfg['checkpoint']}`: {ckpt['iter_num']} iterations, {episodes} "
        f"{'pairs' if method == 'dpo' else 'rollouts'}, "
        f"{minutes:.1f} minutes of training, {cpu_minutes:.1f} of CPU time (evaluations left out; from `{log_path}`); "
        f"learning rate {run['learning_rate']}, {kl_note}"
        + (f", ptx_coef {run['ptx_coef']}" if run["ptx_coef"] else ""),
        f"- reward `{run['reward']}`"
        + (f", target {run['target_len']} response tokens" if "length" in run["reward"] else "")
        + f", missing-EOS penalty {run['missing_eos_penalty']}",
        f"- before: {'`' + cfg['before'] + '`' if cfg['before'] else 'the starting model stored in the checkpoint'}; "
        f"{len(task.eval_prompts)} held-out prompts, one sample each, both models from seed {cfg['seed']}, "
        f"temperature {run['temperature']}, at most {run['max_new_tokens']} new tokens",
        "- KL: the mean over the trained model's samples of the sum of log p_after - log p_before over the response. "
        "NLL ratio: the per-token negative log-likelihood, under the starting model, of the trained model's "
        "responses over "
        "that of the starting model's own. Word share: letters-only, lower-cased words found in the training text. "
        f"Perplexity: {cfg['val_windows']} windows of `{val_bin}`.\n",
        "| measure | before | after |",
        "|---|---|---|",
    ]
    labels = {**LABELS, **{k: k.replace("_", " ") for k in measures["after"] if k not in LABELS and k != "nll"}}
    md += [
        f"| {label} | {measures['before'][k]:.4g} | {measures['after'][k]:.4g} |"
        for k, label in labels.items()
        if k in measures["after"]
    ]
    base = os.path.splitext(md_path)[0]
    md += [
        f"\n![before and after]({os.path.basename(base)}.png)\n",
        "## Stories side by side (same prompt, same seed)\n",
    ]
    for i in range(min(cfg["num_show"], len(task.eval_prompts))):
        md.append(f"**prompt:** {printable(tok.decode(task.eval_prompts[i][1:]))}\n")
        for name in ("before", "after"):
            text = samples[name]["texts"][i]
            ended = text.endswith(END)
            md.append(
                f"- *{name}* ({len(samples[name]['responses'][i]) - ended} tokens, {'ended' if ended else 'cut off'}): "
                f"{printable(text.removesuffix(END).strip())}"
            )
        md.append("")
    os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)
    with atomic_open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    stop = (tok.bos_id, tok.eos_id)
    lengths = {name: [len(r) - (bool(r) and r[-1] in stop) for r in samples[name]["responses"]] for name in samples}
    keys = [k for k in BOUNDED if k in measures["after"]]
    plots.before_after(
        lengths,
        measures,
        keys,
        run["max_new_tokens"],
        run["target_len"] if "length" in run["reward"] else None,
        base + ".png",
    )
    print("\n".join(line for line in md if line.startswith("|")))
    print(f"wrote {md_path} and {base}.png")


def printable(text):
    """Text for a markdown page: the byte soup of a degenerate policy shown as U+FFFD, not as control codes."""
    return "".join(c if c.isprintable() or c == "\n" else "\ufffd" for c in text)


if __name__ == "__main__":
    main(configurator.configure(config)[0])
