"""
The checkpoint: one file layout for every stage, written and read here and nowhere else.

    format      FORMAT (2); a file without it is an older checkpoint, read as below
    kind        who wrote it: 'pretrain' and 'sft' (train.py), 'rl' (an RL method), 'reward_model'
                (reward_model.py), 'import' (export.py --hf)
    model       the weights (model.py's names), the state dict of the model's trunk or, for a reward
                model, of trunk + head
    model_args  model.py's ModelArgs
    tokenizer   what the model was trained with: the sentencepiece model's path, its sha256,
                vocab_size and bos_id (tinystories.py's token meta.json)
    data_dir    the data it was trained on (None where a format-1 checkpoint did not record it)
    config      the run's settings
    iter_num, best_val_loss, optimizer, rng_state   where a run resumes
    rl          an RL stage's own state: method, reference (the frozen starting model's weights),
                heads (e.g. PPO's value head), kl_coef

Format 1 (before this layout had a version): the same keys without format, kind and data_dir, and
an RL stage's method, reference, heads and kl_coef at the top level; load() turns it into format 2.
"""

import hashlib
import os
import pickle
import re

import torch

from common import DataError, save_atomic
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

FORMAT = 2
WRITERS = {
    "pretrain": "train.py",
    "sft": "train.py --sft=True",
    "rl": "an RL stage (train.py --rl=...)",
    "reward_model": "reward_model.py",
    "import": "export.py --hf",
}
KINDS = tuple(WRITERS)
RL_KEYS = ("method", "reference", "heads", "kl_coef")


def save(path, kind, model, model_args, tokenizer, data_dir, **fields):
    """Write a checkpoint atomically (a failed write leaves the earlier file as it was, common.save_atomic).
    model: a state dict; fields: config, iter_num, best_val_loss, optimizer, rng_state, rl."""
    assert kind in KINDS, kind
    for name, tensor in model.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DataError(f"not saving {path}: {name} holds NaN or inf weights")
    save_atomic(
        {
            "format": FORMAT,
            "kind": kind,
            "model": model,
            "model_args": dict(model_args),
            "tokenizer": tokenizer,
            "data_dir": data_dir,
            **fields,
        },
        path,
    )


def upgrade(ckpt):
    """A format-1 checkpoint as format 2."""
    ckpt = dict(ckpt)
    if "method" in ckpt:
        ckpt["kind"] = "rl"
        ckpt["rl"] = {k: ckpt.pop(k, None) for k in RL_KEYS}
    elif "head.weight" in ckpt["model"]:
        ckpt["kind"] = "reward_model"
    else:
        ckpt["kind"] = "pretrain"
    ckpt["data_dir"] = ckpt.get("config", {}).get("data_dir")  # None: not recorded
    ckpt["format"] = FORMAT
    return ckpt


def load(path, map_location="cpu", kinds=KINDS):
    """The checkpoint at path, in format 2; a DataError of one line if it is missing, truncated, not
    ours, or of a kind not in kinds."""
    if not os.path.exists(path):
        raise DataError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the first object it refused
        if "Weights only load failed" not in str(e) or not found:
            raise DataError(f"{path} is truncated or not a PyTorch checkpoint (UnpicklingError)") from None
        raise DataError(
            f"{path} contains pickled objects that weights-only loading refuses ({found[1]}); "
            "checkpoints written here hold none"
        ) from None
    except Exception as e:
        raise DataError(f"{path} is truncated or not a PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        raise DataError(f"{path} is not a checkpoint written by this project")
    if "format" not in ckpt:
        ckpt = upgrade(ckpt)
    elif ckpt["format"] > FORMAT:
        raise DataError(f"{path} has checkpoint format {ckpt['format']}; this code reads up to {FORMAT}")
    if ckpt["kind"] not in kinds:
        raise DataError(
            f"{path} was written by {WRITERS[ckpt['kind']]}; this needs one written by "
            + " or ".join(WRITERS[k] for k in kinds)
        )
    return ckpt


def model_from(ckpt, weights=None, **overrides):
    """The Transformer of a checkpoint (weights: another state dict of the same shape, such as an RL
    checkpoint's reference); overrides change ModelArgs fields that do not touch the weights (dropout)."""
    model = Transformer(ModelArgs(**{**ckpt["model_args"], **overrides}))
    state = weights if weights is not None else ckpt["model"]
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
    return model


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tokenizer_of(ckpt, path):
    """The tokenizer a checkpoint was trained with, if it still exists and fits the model."""
    info = ckpt.get("tokenizer")
    if not isinstance(info, dict) or "tokenizer" not in info:
        raise DataError(f"{path} does not name the tokenizer it was trained with")
    if not os.path.isfile(info["tokenizer"]):
        raise DataError(f"{path} was trained with the tokenizer {info['tokenizer']}, which is gone")
    if info.get("tokenizer_sha256") and file_sha256(info["tokenizer"]) != info["tokenizer_sha256"]:
        raise DataError(f"{info['tokenizer']} has changed since {path} was trained with it (its sha256 differs)")
    tok = Tokenizer(info["tokenizer"])
    if tok.n_words != ckpt["model_args"]["vocab_size"]:
        raise DataError(
            f"tokenizer {tok.model_path} has {tok.n_words} tokens, the model in {path} "
            f"{ckpt['model_args']['vocab_size']}"
        )
    return tok


# settings a checkpoint fixes: the model's shape, its tokenizer, its data
RECORDED = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "vocab_size")


def data_dir_of(ckpt, path, data_dir):
    """The data directory a checkpoint was trained on, or data_dir (a setting) where it records none."""
    if ckpt["data_dir"]:
        return ckpt["data_dir"]
    if not data_dir:
        raise DataError(f"{path} does not record its data directory; pass --data_dir")
    return data_dir


def check_given(ckpt, path, given):
    """A DataError for a setting given on the command line (given: {key: value}) that contradicts what
    the checkpoint records: its model shape, vocabulary and data directory come from it."""
    recorded = {k: ckpt["model_args"].get(k) for k in RECORDED} | {"data_dir": ckpt["data_dir"]}
    if ckpt["model_args"]["vocab_size"] == 32000:
        recorded["vocab_source"] = "llama2"
    for key, value in given.items():
        if key in recorded and value not in (recorded[key], "", 0) and recorded[key] not in (None, ""):
            if key == "data_dir" and os.path.abspath(value) == os.path.abspath(recorded[key]):
                continue
            raise DataError(
                f"--{key}={value} contradicts {path}, trained with {key} {recorded[key]}; "
                "leave it out: a stage that starts from a checkpoint takes it from there"
            )


def changed_settings(ckpt, cfg):
    """The settings that differ from those the checkpoint's run used: ['target_len 170 (was 200)', ...]."""
    before = ckpt.get("config", {})
    return [f"{k} {cfg[k]} (was {before[k]})" for k in sorted(cfg) if k in before and before[k] != cfg[k]]
