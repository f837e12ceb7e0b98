"""
Several models side by side on a task's held-out prompts: what SFT does and what each RL method adds.
For every model and held-out set, one sample a prompt from the same seed, measured as the RL runs
measure them (rl_train.evaluate_model: the task's own shares, KL to and NLL ratio under the
reference model, word share, distinct-n, the judge), with the perplexity on plain validation stories
and, for instructions, on the instruction validation set; best-of-n of the reference model under the
task's reward; stories side by side; and the held-out curves of the RL runs' logs against rollouts.

    python compare.py --models=pretrained:out/ckpt.pt,sft:out/sft_ckpt.pt,grpo:out/grpo_ckpt.pt \\
        --reference=sft --reward=instruct --report_path=reports/instruct.md
    python compare.py --curves=GRPO:out/grpo_log.jsonl,PPO:out/ppo_log.jsonl --report_path=reports/curves.png

For the instruct task the held-out sets are the validation stories' headers (val: in distribution)
and headers whose words no training story holds together (ood). Best-of-n draws n samples a prompt
from the reference model and keeps the one the reward scores highest, so that the table says which n
one sample of an RL model is worth.
"""

import os

import torch

import checkpoint
import configurator
import metrics
import plots
import rl
import tasks
from common import DataError, atomic_open, autocast, one_line_errors, read_jsonl, resolve_device_dtype
from report import printable
from rl_train import evaluate_model
from rollouts import Engines, choose_engine, rollout
from tinystories import SEPARATOR as END
from tinystories import iter_instruct_batches

# -----------------------------------------------------------------------------
config = dict(
    **rl.SAMPLING,
    **tasks.CONFIG,
    models="",  # name:checkpoint,... the models to compare (any stage's checkpoints)
    reference="sft",  # the model that is the KL's reference, the fluency baseline and best-of-n's sampler
    eval_sets="val,ood",  # the held-out sets: instruct's val and ood; other tasks have one ('val')
    prompts=(500, "> 0"),  # held-out prompts per set
    best_of="1,2,4,8,16",  # best-of-n of the reference model under the task's reward; empty = none
    num_show=(10, ">= 0"),  # stories shown side by side
    batch_size=(64, "> 0"),  # rows of a forward pass
    curves="",  # name:{method}_log.jsonl,... RL runs whose held-out curves to plot against rollouts
    report_path="reports/compare.md",  # the report (.md, a .png beside it); a .png for --curves alone
    val_windows=(128, "> 0"),  # windows of the context for each perplexity
    seed=1337,
    data_dir="",  # empty: the reference checkpoint's (where an older one records none, give it)
    device="auto",
    dtype=("float32", "auto | float32 | bfloat16 | float16"),
    rollout_engine=("auto", "auto | c | torch"),  # who samples and scores (rollouts.py); auto: the C engine on a CPU
)
# -----------------------------------------------------------------------------

ROWS = (  # measure, its row in the table
    ("all", "every constraint met"),
    ("noun", "the noun"),
    ("verb", "the verb"),
    ("adj", "the adjective"),
    ("dialogue", "dialogue, where asked"),
    ("name", "the name, where asked"),
    ("listed", "listed the words (a hack: counted as unmet)"),
    ("within_10pct", "within ±10% of the target length"),
    ("score", "reward"),
    ("ended", "ended the story by itself"),
    ("len_mean", "mean response length (tokens)"),
    ("kl", "KL to the reference (nats/response)"),
    ("nll_ratio", "fluency: NLL ratio under the reference"),
    ("word_share", "fluency: share of words found in the training text"),
    ("distinct_2", "distinct-2"),
    ("judge", "judge (held out)"),
)
CURVES = (
    ("eval/score", "reward (held out)"),
    ("eval/all", "every constraint met"),
    ("eval/noun", "the noun"),
    ("eval/verb", "the verb"),
    ("eval/adj", "the adjective"),
    ("eval/dialogue", "dialogue, where asked"),
    ("eval/name", "the name, where asked"),
    ("eval/within_10pct", "within ±10% of the target"),
    ("eval/judge", "judge (held out)"),
    ("eval/kl", "KL to the start (nats/response)"),
    ("eval/nll_ratio", "NLL ratio (1 = as fluent as the start)"),
    ("eval/word_share", "share of words found in the training text"),
    ("eval/val_ppl", "validation perplexity"),
)


def named(spec, what):
    """'a:x,b:y' -> {'a': 'x', 'b': 'y'}."""
    pairs = [part.split(":", 1) for part in spec.split(",") if part]
    if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
        raise DataError(f"--{what}={spec}: expected name:path,name:path,...")
    return dict(pairs)


@torch.no_grad()
def best_of(model, reference, task, cfg, tok, ns, ctx, engines):
    """{n: the task's measures of the best of n samples of model a prompt, by the task's reward}."""
    n_max = max(ns)
    prompts = [p for p in task.eval_prompts for _ in range(n_max)]
    generator = torch.Generator(model.freqs_cos.device).manual_seed(cfg["seed"] + 1)
    batch, _ = rollout(
        rl.Policy(model),
        rl.Policy(reference),
        prompts,
        task.score,
        cfg,
        generator,
        (tok.bos_id, tok.eos_id),
        ctx,
        engines=engines,
    )
    scores = batch.scores.view(-1, n_max)
    responses = [row[: int(k)] for row, k in zip(batch.responses().tolist(), batch.mask.sum(1))]
    out = {}
    for n in ns:
        rows = [i * n_max + int(scores[i, :n].argmax()) for i in range(len(task.eval_prompts))]  # ties: the first
        chosen = batch.rows(torch.tensor(rows, device=batch.tokens.device))
        texts = [metrics.response_text(tok, prompts[r], responses[r]).removesuffix(END) for r in rows]
        headers = [tok.decode(p[1:]) for p in task.eval_prompts]
        out[n] = {"score": chosen.scores.mean().item(), **task.measures(chosen, headers, texts)}
    return out


def perplexities(model, data_dir, tok, cfg, ctx):
    """exp of the mean token cross-entropy on plain validation stories, and on the instruction validation
    set's stories given their headers where it exists."""
    token_dir = os.path.join(data_dir, f"tok{tok.n_words}")
    out = {
        "val_ppl": metrics.val_perplexity(
            model, os.path.join(token_dir, "val.bin"), cfg["val_windows"], cfg["seed"], ctx=ctx
        )
    }
    if os.path.exists(os.path.join(token_dir, "instruct_val.idx")):
        stream = iter_instruct_batches(token_dir, "val", 16, model.params.max_seq_len, seed=cfg["seed"])
        with torch.no_grad(), ctx:
            losses = [model(*next(stream))[1].item() for _ in range(max(1, cfg["val_windows"] // 16))]
        out["instruct_val_ppl"] = float(torch.tensor(losses).mean().exp())
    return out


def main(cfg):
    with one_line_errors():
        device, device_type, dtype = resolve_device_dtype(cfg["device"], cfg["dtype"])
        paths = named(cfg["models"], "models")
        if cfg["reference"] not in paths:
            raise DataError(f"--reference={cfg['reference']} is not one of the --models ({', '.join(paths)})")
        ckpts = {name: checkpoint.load(path, device) for name, path in paths.items()}
        ref_ckpt, ref_path = ckpts[cfg["reference"]], paths[cfg["reference"]]
        tok = checkpoint.tokenizer_of(ref_ckpt, ref_path)
        data_dir = checkpoint.data_dir_of(ref_ckpt, ref_path, cfg["data_dir"])
        models = {name: checkpoint.model_from(c).to(device).eval() for name, c in ckpts.items()}
        ctx = autocast(device_type, dtype)
        sets = cfg["eval_sets"].split(",") if "instruct" in cfg["reward"] else ["val"]
        task_of = {
            s: tasks.make_task(
                {**cfg, "eval_set": s, "eval_prompts": cfg["prompts"]},
                tok,
                data_dir,
                ref_ckpt["model_args"]["max_seq_len"],
                device,
                ctx,
                trains=False,
            )
            for s in sets
        }
        vocabulary = metrics.training_words(data_dir)
        ns = [int(n) for n in cfg["best_of"].split(",") if n]
    reference = models[cfg["reference"]]
    engines = dict.fromkeys(models)  # None: PyTorch samples and scores
    if all(choose_engine(cfg["rollout_engine"], device_type, m) == "c" for m in models.values()):
        on_reference = Engines(reference, reference)
        engines = {n: on_reference if m is reference else on_reference.beside(m) for n, m in models.items()}
    ref_engines = engines[cfg["reference"]]
    results, samples, best = {}, {}, {}
    for s, task in task_of.items():
        ref_m, _ = evaluate_model(reference, reference, task, cfg, tok, cfg["seed"], vocabulary, None, ctx, ref_engines)
        for name, model in models.items():
            print(f"{s}: {name}, {len(task.eval_prompts)} samples")
            results[s, name], samples[s, name] = evaluate_model(
                model, reference, task, cfg, tok, cfg["seed"], vocabulary, ref_m["nll"], ctx, engines[name]
            )
        if ns:
            print(f"{s}: best-of-{max(ns)} of {cfg['reference']}")
            best[s] = best_of(reference, reference, task, cfg, tok, ns, ctx, ref_engines)
    ppl = {name: perplexities(model, data_dir, tok, cfg, ctx) for name, model in models.items()}
    write_report(cfg, paths, sets, task_of, results, samples, best, ppl, tok)


def write_report(cfg, paths, sets, task_of, results, samples, best, ppl, tok):
    names = list(paths)
    md = [
        f"# {', '.join(names)} on held-out prompts\n",
        f"- models: {', '.join(f'{n} `{p}`' for n, p in paths.items())}; reference: {cfg['reference']}",
        f"- reward `{cfg['reward']}`; {cfg['prompts']} held-out prompts a set, one sample each from seed "
        f"{cfg['seed']}, "
        f"temperature {cfg['temperature']}, at most {cfg['max_new_tokens']} new tokens (or the context's room)\n",
    ]
    for s in sets:
        md += [
            f"## {s}: {len(task_of[s].eval_prompts)} prompts\n",
            "| measure | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for key, label in ROWS:
            if any(key in results[s, n] for n in names):
                md.append(
                    f"| {label} | " + " | ".join(f"{results[s, n].get(key, float('nan')):.3f}" for n in names) + " |"
                )
        md.append("")
        if s in best:
            keys = [k for k in ("all", "score") if k in best[s][next(iter(best[s]))]]
            md += [
                f"Best-of-n of {cfg['reference']} under the reward:\n",
                "| n | " + " | ".join(map(str, best[s])) + " |",
                "|---|" + "---|" * len(best[s]),
            ]
            md += [f"| {dict(ROWS)[k]} | " + " | ".join(f"{m[k]:.3f}" for m in best[s].values()) + " |" for k in keys]
            md.append("")
    md += ["## Perplexity\n", "| model | validation stories | instruction validation set |", "|---|---|---|"]
    md += [f"| {n} | {ppl[n]['val_ppl']:.3f} | {ppl[n].get('instruct_val_ppl', float('nan')):.3f} |" for n in names]
    s = sets[0]
    md.append(f"\n## Stories side by side ({s}, same prompt, same seed)\n")
    for i in range(min(cfg["num_show"], len(task_of[s].eval_prompts))):
        md.append(f"**prompt:** {printable(tok.decode(task_of[s].eval_prompts[i][1:]))}\n")
        for n in names:
            md.append(f"- *{n}*: {printable(samples[s, n]['texts'][i].removesuffix(END).strip())}")
        md.append("")
    base = os.path.splitext(cfg["report_path"])[0]
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    with atomic_open(cfg["report_path"], "w") as f:
        f.write("\n".join(md) + "\n")
    key = "score"  # the reward: for instructions, the share of constraints met, which moves before 'all' does
    plots.compare(
        sets,
        names,
        {k: v[key] for k, v in results.items()},
        {s: {n: m[key] for n, m in best[s].items()} for s in best},
        key,
        base + ".png",
    )
    print("\n".join(line for line in md if line.startswith("|")))
    print(f"wrote {cfg['report_path']} and {base}.png")


def curves(cfg):
    """The held-out evaluations of several runs' logs against episodes (rollouts; DPO: pairs), one panel a
    measure that any of the logs holds, one line a run."""
    with one_line_errors():
        logs = named(cfg["curves"], "curves")
        for p in logs.values():
            if not os.path.isfile(p):
                raise DataError(f"no log file {p}")
        runs = [[r for r in read_jsonl(p) if "eval/kl" in r] for p in logs.values()]
    png = (
        cfg["report_path"]
        if cfg["report_path"].endswith(".png")
        else os.path.splitext(cfg["report_path"])[0] + "_curves.png"
    )
    plots.curves(runs, list(logs), CURVES, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    cfg, _ = configurator.configure(config)
    if cfg["curves"]:
        curves(cfg)
    if cfg["models"] or not cfg["curves"]:
        main(cfg)
