"""
Sample stories from a trained checkpoint (KV-cache generation in PyTorch).

    python sample.py                                    # out/ckpt.pt, 3 stories
    python sample.py --prompt="Once upon a time" --temperature=0.8 --top_k=50 --seed=7
    python sample.py --checkpoint=out/grpo_ckpt.pt --prompt="$(printf 'Words: dog, jump, happy\nStory:')"

A prompt is the story's beginning, or an instruction header for a model fine-tuned on them
(train.py --sft=True): the text up to and with the header's last line.
"""

import torch

import checkpoint
import configurator
from common import DataError, one_line_errors, resolve_device_dtype
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
config = dict(
    checkpoint="out/ckpt.pt",
    tokenizer="",  # sentencepiece .model; default: the one the checkpoint was trained with
    prompt="",  # the story's beginning (or an instruction header); empty = BOS only
    num_samples=(3, "> 0"),
    max_new_tokens=(256, "> 0"),  # at most; generation also stops at the end of a story (BOS or EOS)
    temperature=(1.0, ">= 0"),  # 0.0 = greedy
    top_k=(0, ">= 0"),  # 0 = no top-k filtering
    top_p=(0.9, "(0, 1]"),  # 1.0 = no nucleus filtering
    seed=1337,
    device="auto",  # 'auto' (cuda if present, else cpu), 'cpu', 'cuda', ...
)
# -----------------------------------------------------------------------------


def main(cfg):
    with one_line_errors():
        device = resolve_device_dtype(cfg["device"], "float32")[0]
        ckpt = checkpoint.load(cfg["checkpoint"])
        model = checkpoint.model_from(ckpt).to(device).eval()
        if cfg["tokenizer"]:
            tok = Tokenizer(cfg["tokenizer"])
            if tok.n_words != model.params.vocab_size:
                raise DataError(
                    f"tokenizer {tok.model_path} has {tok.n_words} tokens, the model {model.params.vocab_size}"
                )
        else:
            tok = checkpoint.tokenizer_of(ckpt, cfg["checkpoint"])
        ids = tok.encode(cfg["prompt"], bos=True) if cfg["prompt"] else [tok.bos_id]
        room = model.params.max_seq_len - len(ids)
        if room <= 0:
            raise DataError(
                f"the prompt is {len(ids)} tokens, longer than the model's context of {model.params.max_seq_len}"
            )
    generator = torch.Generator(device).manual_seed(cfg["seed"])
    outs = model.generate(
        [ids] * cfg["num_samples"],
        min(cfg["max_new_tokens"], room),
        temperature=cfg["temperature"],
        top_k=cfg["top_k"] or None,
        top_p=cfg["top_p"],
        generator=generator,
        stop_tokens=(tok.bos_id, tok.eos_id),
    )
    for out in outs:
        story = [t for t in out if t not in (tok.bos_id, tok.eos_id)]
        print(tok.decode(ids[1:] + story))
        print("-" * 40)


if __name__ == "__main__":
    main(configurator.configure(config)[0])
