"""
Export a checkpoint to the files other tools read: llama2.c's .bin (our C engine, llama2.c's
run.c/runq.c), a Hugging Face transformers directory, and GGUF (llama.cpp, ollama); and import
a transformers Llama back. The command lines are llama2.c's export.py's.

    python export.py out/model.bin --checkpoint=out/ckpt.pt              # version 1, fp32
    python export.py out/model_q80.bin --checkpoint=out/ckpt.pt --version=2   # int8 Q8_0
    python export.py out/model_v0.bin --checkpoint=out/ckpt.pt --version=0    # llama2.c legacy
    python export.py out/hf --checkpoint=out/ckpt.pt --version=-1 [--dtype=fp16]  # transformers
    python export.py out/model.gguf --checkpoint=out/ckpt.pt [--dtype=q8_0]       # llama.cpp
    python export.py out/model.bin --hf=out/hf     # a transformers Llama -> the C engine's .bin
    python export.py out/ckpt.pt --hf=out/hf       # -> a checkpoint for train.py, ppo.py, sample.py

The .bin layouts are llama2.c's export.py (legacy_export, version1_export, version2_export); the
byte-level writers live in csrc/formats.py beside the engine that reads them. docs/export.md has the
layout tables. The suffix picks the format: .gguf, .pt, else --version (-1: a transformers
directory).
"""

import json
import os
from dataclasses import asdict

import numpy as np
import torch

import checkpoint
import configurator
from common import atomic_open, atomic_path, one_line_errors
from csrc import formats
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
config = dict(
    checkpoint="out/ckpt.pt",  # a checkpoint of any stage: train.py's, SFT's, an RL method's
    hf="",  # read a transformers Llama directory instead of --checkpoint
    version=(1, "-1 | 0 | 1 | 2"),  # -1: a transformers directory; .bin: 0 legacy fp32, 1 fp32, 2 int8 Q8_0
    dtype=(
        "fp32",
        "fp32 | fp16 | q8_0",
    ),  # weights of a transformers directory (fp32, fp16) or a GGUF file (fp32, fp16, q8_0)
    tokenizer="",  # sentencepiece .model; default: the checkpoint's
)
# -----------------------------------------------------------------------------


def llama2c_config(model):
    """The llama2.c header of a model: its shape, as the .bin files and the C engine read it."""
    p = model.params
    return formats.Config(p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, p.vocab_size, p.max_seq_len)


def llama2c_weights(model):
    """The model's weights as csrc/formats.py's dict of llama2.c names, all layers stacked."""

    def stack(get):
        return np.stack([get(layer).detach().float().numpy() for layer in model.layers])

    w = {
        "token_embedding_table": model.tok_embeddings.weight.detach().float().numpy(),
        "rms_att_weight": stack(lambda layer: layer.attention_norm.weight),
        "rms_ffn_weight": stack(lambda layer: layer.ffn_norm.weight),
        "rms_final_weight": model.norm.weight.detach().float().numpy(),
    }
    for name in ("wq", "wk", "wv", "wo"):
        w[name] = stack(lambda layer: getattr(layer.attention, name).weight)
    for name in ("w1", "w2", "w3"):
        w[name] = stack(lambda layer: getattr(layer.feed_forward, name).weight)
    shared = model.output.weight is model.tok_embeddings.weight
    w["wcls"] = None if shared else model.output.weight.detach().float().numpy()
    return w


def model_from_llama2c(config, w):
    """The inverse of llama2c_weights: a Transformer holding the weights of a llama2.c file
    (e.g. `formats.read_v0("stories260K.bin")`), so its models can be run, sampled and
    fine-tuned here."""
    args = ModelArgs(
        dim=config.dim,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
        vocab_size=config.vocab_size,
        hidden_dim=config.hidden_dim,
        max_seq_len=config.seq_len,
    )
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
        for m in t if t.ndim == 3 else t[None]:
            q, s = formats.quantize_q80(m, group_size)
            errors.append(np.abs(formats.dequantize_q80(q, s, m.shape) - m).max())
    return float(max(errors))


def export(model, path, version=1):
    """Write `model` to `path` in llama2.c's format `version` (0, 1 or 2), atomically."""
    p = model.params
    if p.rope_theta != 10000.0 or p.norm_eps != 1e-5:
        raise ValueError(
            f"llama2.c's .bin has no room for rope_theta {p.rope_theta} or norm_eps {p.norm_eps} "
            "(the engine assumes 10000 and 1e-5)"
        )
    config = llama2c_config(model)
    w = llama2c_weights(model)
    group_size = q80_group_size(p.dim, p.hidden_dim) if version == 2 else 64
    with atomic_path(path) as tmp:
        formats.write_checkpoint(tmp, config, w, version, group_size)
    if version == 2:
        print(f"Q8_0 with group size {group_size}: max quantisation error {max_q80_error(w, group_size):.6f}")
    print(f"wrote {path} (version {version}, {os.path.getsize(path):,} bytes)")


# -----------------------------------------------------------------------------
# Hugging Face transformers (LlamaForCausalLM) and GGUF (llama.cpp's "llama" architecture)

# our parameter names -> (transformers', GGUF's): a layer's, then the top level's; the output head is
# the embedding in all three
LAYER_NAMES = {
    "attention_norm": ("input_layernorm", "attn_norm"),
    "attention.wq": ("self_attn.q_proj", "attn_q"),
    "attention.wk": ("self_attn.k_proj", "attn_k"),
    "attention.wv": ("self_attn.v_proj", "attn_v"),
    "attention.wo": ("self_attn.o_proj", "attn_output"),
    "ffn_norm": ("post_attention_layernorm", "ffn_norm"),
    "feed_forward.w1": ("mlp.gate_proj", "ffn_gate"),
    "feed_forward.w2": ("mlp.down_proj", "ffn_down"),
    "feed_forward.w3": ("mlp.up_proj", "ffn_up"),
}
TOP_NAMES = {"tok_embeddings": ("model.embed_tokens", "token_embd"), "norm": ("model.norm", "output_norm")}
HF, GGUF = 0, 1


def renamed(state, to):
    """Our state dict (tied head left out) under transformers' (to=HF) or GGUF's (to=GGUF) names."""
    out = {}
    for name, t in state.items():
        base = name.removesuffix(".weight")
        if base == "output":
            continue
        if base.startswith("layers."):
            _, i, rest = base.split(".", 2)
            base = f"model.layers.{i}.{LAYER_NAMES[rest][HF]}" if to == HF else f"blk.{i}.{LAYER_NAMES[rest][GGUF]}"
        else:
            base = TOP_NAMES[base][to]
        out[base + ".weight"] = t
    return out


def rope_to_halves(w, n_heads):
    """wq or wk rows from llama2.c's RoPE layout (each head rotates pairs (x0, x1), (x2, x3), ...) to
    transformers' (pairs (x_i, x_{i + head_dim/2})): within each head, even rows first, then odd."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_to_pairs(w, n_heads):
    """The inverse of rope_to_halves."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(p, tok, dtype):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": p.vocab_size,
        "hidden_size": p.dim,
        "intermediate_size": p.hidden_dim,
        "num_hidden_layers": p.n_layers,
        "num_attention_heads": p.n_heads,
        "num_key_value_heads": p.n_kv_heads,
        "head_dim": p.dim // p.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_seq_len,
        "rms_norm_eps": p.norm_eps,
        "rope_theta": p.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "torch_dtype": dtype,
        "initializer_range": 0.02,
        "use_cache": True,
    }


HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
)
EXPORTED_BY = "tinystories-rl export.py"  # config.json's mark of our own exports, which a new export may replace


def check_hf_target(out_dir):
    """A ValueError unless out_dir is missing, empty, or an earlier export of ours: a user's directory is never
    overwritten."""
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    config = os.path.join(out_dir, "config.json")
    try:
        ours = json.load(open(config)).get("exported_by") == EXPORTED_BY
    except (OSError, ValueError, AttributeError):
        ours = False
    others = sorted(set(os.listdir(out_dir)) - set(HF_FILES))
    if not ours or others:
        what = f"holds {', '.join(others[:3])}" if others else "is not an export of this project"
        raise ValueError(f"{out_dir} {what}: not overwriting it; export into a new or empty directory")


def export_hf(model, out_dir, tok, dtype="fp32"):
    """A directory that transformers' AutoModelForCausalLM and AutoTokenizer load: config.json,
    model.safetensors, generation_config.json and the tokenizer files. Each file is written atomically,
    into a new or empty directory or over an earlier export of ours (check_hf_target)."""
    from safetensors.torch import save

    check_hf_target(out_dir)
    p = model.params
    if tok.n_words != p.vocab_size:
        raise ValueError(f"tokenizer {tok.model_path} has {tok.n_words} tokens, the model {p.vocab_size}")
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    state = renamed(model.state_dict(), HF)
    for i in range(p.n_layers):
        for proj, n in (("q_proj", p.n_heads), ("k_proj", p.n_kv_heads)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            state[name] = rope_to_halves(state[name], n)
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    with atomic_open(os.path.join(out_dir, "model.safetensors")) as f:
        f.write(save(state, metadata={"format": "pt"}))
    # stories end where the next one's BOS begins (pretokenize writes no EOS), so generation stops at either
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": [tok.eos_id, tok.bos_id], "pad_token_id": tok.eos_id}
    for name, obj in (
        ("config.json", {**hf_config(p, tok, str(torch_dtype).removeprefix("torch.")), "exported_by": EXPORTED_BY}),
        ("generation_config.json", generation),
    ):
        with atomic_open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)
    tok.export_hf(out_dir, p.max_seq_len)
    print(f"wrote {out_dir}/ (transformers LlamaForCausalLM, {dtype})")


def read_hf_config(hf_dir):
    """model.py's ModelArgs for a transformers Llama directory, or a ValueError saying what does not fit."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    try:
        c = json.load(open(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    needed = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
    )
    if c.get("model_type") != "llama" or not all(k in c for k in needed):
        raise ValueError(f"{path}: not a transformers Llama config (model_type {c.get('model_type')!r})")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    unsupported = {
        "hidden_act": c.get("hidden_act", "silu") != "silu",
        "rope_scaling": rope.get("rope_type", rope.get("type", "default")) != "default",
        "attention_bias": c.get("attention_bias", False),
        "mlp_bias": c.get("mlp_bias", False),
        "head_dim": c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]) * c["num_attention_heads"]
        != c["hidden_size"],
        "tie_word_embeddings (model.py ties the output head to the embedding)": not c.get("tie_word_embeddings", False),
    }
    wrong = [k for k, bad in unsupported.items() if bad]
    if wrong:
        raise ValueError(f"{path}: not a Llama that model.py can hold ({', '.join(wrong)})")
    return ModelArgs(
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        vocab_size=c["vocab_size"],
        hidden_dim=c["intermediate_size"],
        norm_eps=c["rms_norm_eps"],
        max_seq_len=c["max_position_embeddings"],
        rope_theta=float(theta),
    )


def load_hf(hf_dir):
    """The inverse of export_hf: a Transformer holding a transformers Llama's weights (model.safetensors,
    or shards listed in model.safetensors.index.json), in fp32."""
    from safetensors.torch import load_file

    args = read_hf_config(hf_dir)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    files = (
        sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    )
    hf = {}
    for name in files:
        if not os.path.isfile(os.path.join(hf_dir, name)):
            raise FileNotFoundError(f"no {name} in {hf_dir} (only safetensors weights are read)")
        try:
            hf.update(load_file(os.path.join(hf_dir, name)))
        except Exception as e:  # safetensors raises its own SafetensorError on a truncated or foreign file
            raise ValueError(f"{os.path.join(hf_dir, name)} is truncated or not a safetensors file ({e})") from None
    model = Transformer(args)
    ours = renamed({k: k for k in model.state_dict()}, HF)  # transformers' name -> ours
    if "lm_head.weight" in hf and not torch.equal(hf.pop("lm_head.weight"), hf["model.embed_tokens.weight"]):
        raise ValueError(f"{hf_dir}: lm_head differs from embed_tokens; model.py ties the output head to the embedding")
    if hf.keys() != ours.keys():
        raise ValueError(f"{hf_dir}: unexpected tensors {sorted(hf.keys() ^ ours.keys())[:3]}")
    state = {ours[k]: v.float() for k, v in hf.items()}
    for i in range(args.n_layers):
        for w, n in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
            name = f"layers.{i}.attention.{w}.weight"
            state[name] = rope_to_pairs(state[name], n)
    state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state)
    return model


def save_as_checkpoint(model, path, tok):
    """A checkpoint of kind 'import' (no optimizer state: training starts afresh at iteration 0), for
    train.py --init_from=resume, the RL stages and sample.py. It names the tokenizer by its absolute path."""
    tokenizer = {
        "tokenizer": os.path.abspath(tok.model_path),
        "tokenizer_sha256": checkpoint.file_sha256(tok.model_path),
        "vocab_size": tok.n_words,
        "bos_id": tok.bos_id,
    }
    checkpoint.save(
        path,
        "import",
        model.state_dict(),
        asdict(model.params),
        tokenizer,
        None,
        iter_num=0,
        best_val_loss=float("inf"),
        config={},
    )
    print(f"wrote {path}")


def export_gguf(model, path, tok, dtype="fp32"):
    """A GGUF file for llama.cpp (architecture "llama", sentencepiece vocabulary inside), written with
    ggml's own gguf package. llama.cpp's RoPE is llama2.c's interleaved pairs, so q and k go as they are.
    fp16 and q8_0 store the matrices so; norms stay fp32, as llama.cpp's converter keeps them."""
    import gguf

    p = model.params
    if tok.n_words != p.vocab_size:
        raise ValueError(f"tokenizer {tok.model_path} has {tok.n_words} tokens, the model {p.vocab_size}")
    w = gguf.GGUFWriter(None, "llama")
    w.add_name(os.path.splitext(os.path.basename(path))[0])
    w.add_file_type(
        {
            "fp32": gguf.LlamaFileType.ALL_F32,
            "fp16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[dtype]
    )
    w.add_vocab_size(p.vocab_size)
    w.add_context_length(p.max_seq_len)
    w.add_embedding_length(p.dim)
    w.add_block_count(p.n_layers)
    w.add_feed_forward_length(p.hidden_dim)
    w.add_head_count(p.n_heads)
    w.add_head_count_kv(p.n_kv_heads)
    w.add_rope_dimension_count(p.dim // p.n_heads)
    w.add_rope_freq_base(p.rope_theta)
    w.add_layer_norm_rms_eps(p.norm_eps)

    sp, spec = tok.sp_model, tok.normalizer_spec()
    T = gguf.TokenType
    w.add_tokenizer_model("llama")  # sentencepiece BPE with byte fallback
    w.add_token_list([sp.id_to_piece(i) for i in range(tok.n_words)])
    w.add_token_scores([sp.get_score(i) for i in range(tok.n_words)])
    w.add_token_types(
        [
            T.CONTROL
            if sp.is_control(i)
            else T.UNKNOWN
            if sp.is_unknown(i)
            else T.BYTE
            if sp.is_byte(i)
            else T.UNUSED
            if sp.is_unused(i)
            else T.NORMAL
            for i in range(tok.n_words)
        ]
    )
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(spec.add_dummy_prefix)
    w.add_remove_extra_whitespaces(spec.remove_extra_whitespaces)

    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    fallback = set()
    for name, t in renamed(model.state_dict(), GGUF).items():
        a = t.detach().float().numpy()
        if a.ndim == 1 or dtype == "fp32":
            w.add_tensor(name, a)
        elif dtype == "q8_0" and a.shape[-1] % block == 0:
            w.add_tensor(
                name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:  # fp16, or rows that are not whole Q8_0 blocks of 32 (llama.cpp's converter falls back to fp16 too)
            w.add_tensor(name, a.astype(np.float16))
            if dtype == "q8_0":
                fallback.add(name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0])
    if fallback:
        print(
            f"note: {', '.join(sorted(fallback))} have rows of {p.dim} or {p.hidden_dim} values, not whole Q8_0 "
            f"blocks of {block}: stored as F16, as llama.cpp's converter stores them"
        )
    with atomic_path(path) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    print(f"wrote {path} (GGUF, {dtype}, {os.path.getsize(path):,} bytes)")


DTYPES = {"gguf": ("fp32", "fp16", "q8_0"), "hf": ("fp32", "fp16"), "bin": ("fp32",), "pt": ("fp32",)}


def main(cfg):
    path = cfg["filepath"]
    fmt = (
        "gguf" if path.endswith(".gguf") else "pt" if path.endswith(".pt") else "hf" if cfg["version"] == -1 else "bin"
    )
    if cfg["dtype"] not in DTYPES[fmt]:
        raise ValueError(
            f"--dtype={cfg['dtype']} does not apply to {fmt} output, which takes {', '.join(DTYPES[fmt])}"
            + (" (int8 is --version=2)" if fmt == "bin" else "")
        )
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"no directory {out_dir} to write {path} into")
    if cfg["hf"]:
        model = load_hf(cfg["hf"])
        tok_path = cfg["tokenizer"] or os.path.join(cfg["hf"], "tokenizer.model")
    else:
        ckpt = checkpoint.load(cfg["checkpoint"])
        model = checkpoint.model_from(ckpt)
        tok_path = cfg["tokenizer"] or (ckpt.get("tokenizer") or {}).get("tokenizer", "")
    tok = None
    if fmt != "bin":  # the tokenizer goes inside (GGUF) or beside the weights
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(f"no tokenizer at {tok_path!r}; pass --tokenizer=PATH (a sentencepiece .model)")
        tok = Tokenizer(tok_path)
    model.eval()
    with torch.no_grad():
        if fmt == "gguf":
            export_gguf(model, path, tok, cfg["dtype"])
        elif fmt == "hf":
            export_hf(model, path, tok, cfg["dtype"])
        elif fmt == "pt":
            save_as_checkpoint(model, path, tok)
        else:
            export(model, path, cfg["version"])


if __name__ == "__main__":
    cfg, _ = configurator.configure(config, positional=("filepath",))
    with one_line_errors():
        main(cfg)
