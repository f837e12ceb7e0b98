"""
The starting model and a trained one side by side on held-out prompts: the one before/after report of
every RL method (ppo, grpo, rloo, dpo), as markdown and a PNG.

    python report.py --checkpoint=out/grpo_ckpt.pt                     # -> reports/grpo.md and .png
    python report.py --checkpoint=out/ppo_ckpt.pt --rm_path=out/rm.pt --report_path=reports/ppo_rlhf.md
    python report.py --checkpoint=out/dpo_ckpt.pt --before=out/ckpt.pt
    python report.py --compare=a/ppo_log.jsonl,b/grpo_log.jsonl --labels=PPO,GRPO --report_path=reports/runs.png

"Before" is the starting model stored in the RL checkpoint (or --before). Both models answer the same
report_prompts validation prompts from the same seed, with the run's own sampling settings and
reward. The table: the score the run trained on (and, with --rm_path, a reward model's), length and
ending, the judge of prefs.py (held out: no method trains on it), KL to the starting model, the
fluency measures (the NLL ratio and the share of known words, rl.evaluate), distinct-n, and the
validation perplexity. Then the run's timing from its log, and three stories side by side.
--compare plots the held-out evaluations of several runs' logs against rollouts instead, one line a run.
"""
import os

import numpy as np
import torch

import configurator
import rl
from common import DataError, atomic_open, autocast, one_line_errors, pyplot, read_jsonl, resolve_device_dtype, save_figure
from model import load_checkpoint, model_from_checkpoint
from prefs import END, checked_tokenizer
from reward_model import load_reward_model
from tinystories import token_dir

# -----------------------------------------------------------------------------
# config: plain defaults, overridable as --key=value
checkpoint = "out/ppo_ckpt.pt"  # a checkpoint written by an RL stage ({method}_ckpt.pt)
before = ""  # the model to compare with; empty = the starting model stored in the checkpoint
rm_path = ""  # a reward model to score both with (e.g. out/rm.pt); empty = none beyond the run's own reward
report_path = ""  # empty = reports/{method}.md; the figure goes beside it, .png
report_prompts = 200  # validation prompts (the first stories of the split), one sample each per model
val_windows = 128  # windows of the context of val.bin for the perplexity
num_show = 3  # stories shown side by side
compare = ""  # comma-separated {method}_log.jsonl files: plot their held-out curves together to report_path (a .png)
labels = ""  # comma-separated names of the compared runs; empty = the log files' directories
seed = 1337
data_dir = ""  # empty = the run's
device = "auto"
dtype = "float32"
# -----------------------------------------------------------------------------
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# -----------------------------------------------------------------------------

LABELS = {  # metric -> its row in the table
    "score": "score (the reward the run trained on)", "rm": "reward model", "len_mean": "mean response length (tokens)",
    "len_std": "std of response length", "within_10pct": "within ±10% of the target length",
    "ended": "ended the story by itself", "judge": "judge (held out)", "kl": "KL to the starting model (nats/response)",
    "nll_ratio": "fluency: NLL ratio under the starting model (1 = as before)",
    "word_share": "fluency: share of words found in the training text", "distinct_1": "distinct-1", "distinct_2": "distinct-2",
    "val_ppl": "validation perplexity"}
BOUNDED = ("within_10pct", "ended", "judge", "word_share", "distinct_2")  # the bar chart's metrics, all in [0, 1]


@torch.no_grad()
def rm_scores(reward_model, prompts, responses, device):
    """A reward model's score of each prompt + response."""
    tokens, mask, _ = rl.collate(prompts, responses, ())
    lengths = prompts.size(1) + mask.sum(1).long()
    return torch.cat([reward_model.score(tokens[i:i + 32], lengths[i:i + 32]) for i in range(0, len(tokens), 32)]).cpu().numpy()


def main(cfg):
    with one_line_errors():
        device, device_type, dtype = resolve_device_dtype(cfg["device"], cfg["dtype"])
        ckpt = load_checkpoint(cfg["checkpoint"], device)
        if "method" not in ckpt:
            raise DataError(f"{cfg['checkpoint']} is not a checkpoint written by an RL stage (train.py --rl=...)")
        run, method = ckpt["config"], ckpt["method"]
        after = model_from_checkpoint(ckpt).to(device).eval()
        ref_ckpt = load_checkpoint(cfg["before"], device) if cfg["before"] else {"model": ckpt["reference"], "model_args": ckpt["model_args"]}
        start = model_from_checkpoint(ref_ckpt).to(device).eval()
        tok = checked_tokenizer(ckpt, cfg["checkpoint"])
        data_dir = cfg["data_dir"] or run["data_dir"]
        bin_dir = token_dir(data_dir, tok.n_words)
        val_data, val_starts = rl.story_starts(os.path.join(bin_dir, "val.bin"), tok.bos_id, run["start_len"])
        prompts = rl.prompts_at(val_data, val_starts[:cfg["report_prompts"]], run["start_len"], device)
        vocabulary = rl.training_words(data_dir)
        weights = rl.parse_reward(run["reward"])
        reward_model = load_reward_model(run["rm_path"], device) if "rm" in weights else None
        judge_rm = load_reward_model(cfg["rm_path"], device) if cfg["rm_path"] else None
        md_path = cfg["report_path"] or os.path.join("reports", f"{method}.md")
        log_path = os.path.join(os.path.dirname(cfg["checkpoint"]), f"{method}_log.jsonl")
    ctx = autocast(device_type, dtype)

    def score_fn(tokens, mask, ended):
        return rl.score_rollouts(tokens, mask, ended, run["start_len"], weights, run["target_len"], run["missing_eos_penalty"],
                                 reward_model, run["batch_size"], ctx)

    metrics, samples = {}, {}
    for name, model in (("before", start), ("after", after)):
        print(f"{name}: {len(prompts)} samples, their metrics, the validation perplexity")
        ref_nll = metrics["before"]["nll"] if name == "after" else None
        metrics[name], samples[name] = rl.evaluate(model, start, prompts, run, tok, cfg["seed"], vocabulary, score_fn, ref_nll, ctx)
        if judge_rm is not None:
            metrics[name]["rm"] = float(rm_scores(judge_rm, prompts, samples[name]["responses"], device).mean())
        metrics[name]["val_ppl"] = rl.val_perplexity(model, os.path.join(bin_dir, "val.bin"), cfg["val_windows"], cfg["seed"], ctx=ctx)
    metrics["before"]["nll_ratio"] = 1.0

    rows = read_jsonl(log_path) if os.path.exists(log_path) else []
    minutes, cpu_minutes = (sum(r.get(k, 0.0) for r in rows) / 60 for k in ("time/total", "time/cpu"))
    episodes = rows[-1]["episode"] if rows else "?"
    kl_note = (f"KL {run['init_kl_coef']} ({run['kl_estimator']}, in the {run['kl_in']}, {run['kl_reduction']} over a response"
               f"{', adaptive toward ' + str(run['target_kl']) if run['adap_kl_ctrl'] else ''})") if "init_kl_coef" in run else \
        f"beta {run['beta']}, rpo_alpha {run['rpo_alpha']}, pairs `{run['pairs']}`"
    md = [f"# {method.upper()}: the starting model and the trained one\n",
          f"- `{cfg['checkpoint']}`: {ckpt['iter_num']} iterations, {episodes} {'pairs' if method == 'dpo' else 'rollouts'}, "
          f"{minutes:.1f} minutes of training, {cpu_minutes:.1f} of CPU time (evaluations left out; from `{log_path}`); learning rate {run['learning_rate']}, {kl_note}"
          + (f", ptx_coef {run['ptx_coef']}" if run["ptx_coef"] else ""),
          f"- reward `{run['reward']}`" + (f", target {run['target_len']} response tokens" if "length" in weights else "")
          + f", missing-EOS penalty {run['missing_eos_penalty']}",
          f"- before: {'`' + cfg['before'] + '`' if cfg['before'] else 'the starting model stored in the checkpoint'}; "
          f"{len(prompts)} held-out prompts (the first {run['start_len']} tokens of the first validation stories), one sample "
          f"each, both models from seed {cfg['seed']}, temperature {run['temperature']}, at most {run['max_new_tokens']} new tokens",
          "- KL: the mean over the trained model's samples of the sum of log p_after - log p_before over the response. "
          "NLL ratio: the per-token negative log-likelihood, under the starting model, of the trained model's responses over "
          "that of the starting model's own. Word share: letters-only, lower-cased words found in the training text. "
          f"Perplexity: {cfg['val_windows']} windows of `{bin_dir}/val.bin`.\n",
          "| metric | before | after |", "|---|---|---|"]
    md += [f"| {label} | {metrics['before'][k]:.4g} | {metrics['after'][k]:.4g} |" for k, label in LABELS.items() if k in metrics["after"]]
    base = os.path.splitext(md_path)[0]
    md += [f"\n![before and after]({os.path.basename(base)}.png)\n", "## Stories side by side (same prompt, same seed)\n"]
    for i in range(min(cfg["num_show"], len(prompts))):
        md.append(f"**prompt:** {tok.decode(prompts[i, 1:].tolist())}\n")
        for name in ("before", "after"):
            text = samples[name]["texts"][i]
            ended = text.endswith(END)
            md.append(f"- *{name}* ({len(samples[name]['responses'][i]) - ended} tokens, {'ended' if ended else 'cut off'}): "
                      f"{printable(text.removesuffix(END).strip())}")
        md.append("")
    os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)
    with atomic_open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    plot(samples, metrics, run, tok, base + ".png")
    print("\n".join(line for line in md if line.startswith("|")))
    print(f"wrote {md_path} and {base}.png")


def printable(text):
    """Text for a markdown page: the byte soup of a degenerate policy shown as U+FFFD, not as control codes."""
    return "".join(c if c.isprintable() or c == "\n" else "\ufffd" for c in text)


def plot(samples, metrics, run, tok, png_path):
    """Response lengths before and after (a histogram), and the metrics in [0, 1] (bars)."""
    fig, (ax, bars) = pyplot().subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    for name in ("before", "after"):
        lengths = [len(r) - (bool(r) and r[-1] in (tok.bos_id, tok.eos_id)) for r in samples[name]["responses"]]
        ax.hist(lengths, bins=np.linspace(0, run["max_new_tokens"] + 1, 40), alpha=0.5, label=name)
    if "length" in run["reward"]:
        ax.axvline(run["target_len"], color="k", ls="--", lw=1, label="target")
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("samples")
    ax.legend()
    keys = [k for k in BOUNDED if k in metrics["after"]]
    x = np.arange(len(keys))
    for offset, name in ((-0.2, "before"), (0.2, "after")):
        bars.bar(x + offset, [metrics[name][k] for k in keys], 0.4, label=name)
    bars.set_xticks(x, [k.replace("_", " ") for k in keys], fontsize=8)
    bars.set_ylim(0, 1.05)
    bars.grid(alpha=0.3, axis="y")
    save_figure(fig, png_path)


CURVES = (("eval/score", "score (the reward trained on)"), ("eval/within_10pct", "within ±10% of the target"),
          ("eval/judge", "judge (held out)"), ("eval/kl", "KL to the start (nats/response)"),
          ("eval/nll_ratio", "NLL ratio (1 = as fluent as the start)"),
          ("eval/word_share", "share of words found in the training text"), ("eval/val_ppl", "validation perplexity"))


def compare_runs(cfg):
    """The held-out evaluations of several runs against episodes (rollouts; DPO: pairs), one panel a metric
    that any of the logs holds, one line a run."""
    with one_line_errors():
        paths = cfg["compare"].split(",")
        labels = cfg["labels"].split(",") if cfg["labels"] else [os.path.basename(os.path.dirname(p)) or p for p in paths]
        if len(labels) != len(paths):
            raise DataError(f"--labels names {len(labels)} runs, --compare {len(paths)}")
        if not cfg["report_path"].endswith(".png"):
            raise DataError(f"--compare writes a figure: --report_path must end in .png, not {cfg['report_path']!r}")
        for p in paths:
            if not os.path.isfile(p):
                raise DataError(f"no log file {p}")
        runs = [[r for r in read_jsonl(p) if "eval/kl" in r] for p in paths]
    panels = [(k, title) for k, title in CURVES if any(k in r for rows in runs for r in rows)]
    cols = min(4, len(panels))
    grid_rows = -(-len(panels) // cols)  # ceil
    fig, axes = pyplot().subplots(grid_rows, cols, figsize=(3.8 * cols, 3.4 * grid_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (key, title) in zip(axes.flat, panels):
        for rows, label in zip(runs, labels):
            points = [(r["episode"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), "o-", ms=2.5, lw=1.2, label=label)
        ax.set_xlabel("episodes (rollouts; DPO: pairs)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    os.makedirs(os.path.dirname(cfg["report_path"]) or ".", exist_ok=True)
    save_figure(fig, cfg["report_path"])
    print(f"wrote {cfg['report_path']}")


if __name__ == "__main__":
    cfg = configurator.configure(config)
    if cfg["compare"]:
        compare_runs(cfg)
    else:
        main(cfg)
