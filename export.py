"""
Export a checkpoint to the flat .bin files the C engine (and llama2.c's run.c/runq.c) reads.

    python export.py out/model.bin --checkpoint=out/ckpt.pt              # version 1, fp32
    python export.py out/model_q80.bin --checkpoint=out/ckpt.pt --version=2   # int8 Q8_0
    python export.py out/model_v0.bin --checkpoint=out/ckpt.pt --version=0    # llama2.c legacy

The layouts are llama2.c's export.py (legacy_export, version1_export, version2_export); the
byte-level writers live in csrc/formats.py beside the engine that reads them. README.md has
the layout tables.
"""
import argparse
import os

import numpy as np
import torch

from common import atomic_path, one_line_errors
from csrc import formats
from model import ModelArgs, Transformer, load_checkpoint, model_from_checkpoint


def llama2c_weights(model):
    """The model's weights as csrc/formats.py's dict of llama2.c names, all layers stacked."""
    def stack(get):
        return np.stack([get(layer).detach().float().numpy() for layer in model.layers])
    w = {
        "token_embedding_table": model.tok_embeddings.weight.detach().float().numpy(),
        "rms_att_weight": stack(lambda l: l.attention_norm.weight),
        "rms_ffn_weight": stack(lambda l: l.ffn_norm.weight),
        "rms_final_weight": model.norm.weight.detach().float().numpy(),
    }
    for name in ("wq", "wk", "wv", "wo"):
        w[name] = stack(lambda l: getattr(l.attention, name).weight)
    for name in ("w1", "w2", "w3"):
        w[name] = stack(lambda l: getattr(l.feed_forward, name).weight)
    shared = model.output.weight is model.tok_embeddings.weight
    w["wcls"] = None if shared else model.output.weight.detach().float().numpy()
    return w


def model_from_llama2c(config, w):
    """The inverse of llama2c_weights: a Transformer holding the weights of a llama2.c file
    (e.g. `formats.read_v0("stories260K.bin")`), so its models can be run, sampled and
    fine-tuned here."""
    args = ModelArgs(dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
                     vocab_size=config.vocab_size, hidden_dim=config.hidden_dim, max_seq_len=config.seq_len)
    model = Transformer(args)
    state = {"tok_embeddings.weight": w["token_embedding_table"], "norm.weight": w["rms_final_weight"]}
    for i in range(config.n_layers):
        state[f"layers.{i}.attention_norm.weight"] = w["rms_att_weight"][i]
        state[f"layers.{i}.ffn_norm.weight"] = w["rms_ffn_weight"][i]
        for name in ("wq", "wk", "wv", "wo"):
            state[f"layers.{i}.attention.{name}.weight"] = w[name][i]
        for name in ("w1", "w2", "w3"):
            state[f"layers.{i}.feed_forward.{name}.weight"] = w[name][i]
    if w["wcls"] is not None:
        raise ValueError("this model has an unshared classifier; model.py ties the output head to the embedding")
    state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()})
    return model


def q80_group_size(dim, hidden_dim):
    """The largest power of two up to 64 that divides both dim and hidden_dim, since the
    engine quantises activations of both lengths in whole groups."""
    group_size = 64
    while dim % group_size or hidden_dim % group_size:
        group_size //= 2
    return group_size


def max_q80_error(w, group_size):
    errors = []
    for name, t in w.items():
        if t is None or name.startswith("rms"):
            continue  # norms stay fp32
        for m in (t if t.ndim == 3 else t[None]):
            q, s = formats.quantize_q80(m, group_size)
            errors.append(np.abs(formats.dequantize_q80(q, s, m.shape) - m).max())
    return float(max(errors))


def export(model, path, version=1):
    """Write `model` to `path` in llama2.c's format `version` (0, 1 or 2), atomically."""
    p = model.params
    config = formats.Config(p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, p.vocab_size, p.max_seq_len)
    w = llama2c_weights(model)
    group_size = q80_group_size(p.dim, p.hidden_dim) if version == 2 else 64
    with atomic_path(path) as tmp:
        formats.write_checkpoint(tmp, config, w, version, group_size)
    if version == 2:
        print(f"Q8_0 with group size {group_size}: max quantisation error {max_q80_error(w, group_size):.6f}")
    print(f"wrote {path} (version {version}, {os.path.getsize(path):,} bytes)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("filepath", type=str, help="the output .bin")
    parser.add_argument("--checkpoint", type=str, default="out/ckpt.pt", help="a train.py or ppo.py checkpoint")
    parser.add_argument("--version", type=int, default=1, choices=(0, 1, 2), help="0 legacy fp32, 1 fp32, 2 int8 Q8_0")
    args = parser.parse_args()
    with one_line_errors():
        model = model_from_checkpoint(load_checkpoint(args.checkpoint))
    with torch.no_grad():
        export(model.eval(), args.filepath, args.version)
