"""
A thin wrapper over a sentencepiece model, and its export to llama2.c's tokenizer .bin and to
the Hugging Face `tokenizers` files that transformers' AutoTokenizer loads.

    python tokenizer.py --tokenizer-model=data/tok4096.model   # writes data/tok4096.bin

The .bin layout (what run.c reads): int32 max_token_length, then for every token id in
order: float32 score, int32 byte length, the bytes. Sentencepiece's '▁' becomes a space,
BOS/EOS become '\\n<s>\\n' and '\\n</s>\\n', byte tokens stay as the text '<0xNN>'.
"""

import argparse
import json
import os
import shutil
import struct

from sentencepiece import SentencePieceProcessor

from common import atomic_open, one_line_errors


class Tokenizer:
    def __init__(self, model_path):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"no tokenizer model at {model_path}")
        try:
            self.sp_model = SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError):
            raise ValueError(f"{model_path} is not a sentencepiece model") from None
        self.model_path = model_path
        self.n_words = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()

    def encode(self, s, bos=True, eos=False):
        t = self.sp_model.encode(s)
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t):
        return self.sp_model.decode(t)

    def export(self, bin_path=None):
        """Write the tokenizer in llama2.c's .bin format (byte-identical to llama2.c's own
        export); returns the path written."""
        tokens, scores = [], []
        for i in range(self.n_words):
            t = self.sp_model.id_to_piece(i)
            if i == self.bos_id:
                t = "\n<s>\n"
            elif i == self.eos_id:
                t = "\n</s>\n"
            tokens.append(t.replace("▁", " ").encode("utf-8"))
            scores.append(self.sp_model.get_score(i))
        bin_path = bin_path or os.path.splitext(self.model_path)[0] + ".bin"
        with atomic_open(bin_path) as f:
            f.write(struct.pack("I", max(len(t) for t in tokens)))
            for b, score in zip(tokens, scores):
                f.write(struct.pack("fI", score, len(b)))
                f.write(b)
        return bin_path

    def normalizer_spec(self):
        """The model's own normalisation settings (add_dummy_prefix, remove_extra_whitespaces, ...)."""
        from sentencepiece import sentencepiece_model_pb2  # needs protobuf

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp_model.serialized_model_proto())
        if proto.trainer_spec.model_type != proto.trainer_spec.BPE or proto.normalizer_spec.name != "identity":
            raise ValueError(
                f"{self.model_path}: only BPE models with identity normalisation convert (as train_vocab makes them)"
            )
        return proto.normalizer_spec

    def hf_tokenizer(self):
        """A `tokenizers.Tokenizer` that gives sentencepiece's ids exactly: the same vocabulary, merges in
        sentencepiece's order (by the score of the piece a merge makes: Llama 2's whitespace pieces score
        -1e9 despite low ids), byte fallback, the dummy prefix as a normaliser (Metaspace would not add
        it before a leading space), BOS in front."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
        from tokenizers.models import BPE

        spec = self.normalizer_spec()
        sp = self.sp_model
        vocab = {sp.id_to_piece(i): i for i in range(self.n_words)}
        merges = []
        for i in sorted(range(self.n_words), key=lambda i: -sp.get_score(i)):  # stable: ties in id order
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or len(piece) < 2:
                continue
            # every split of the piece into two pieces, all at the piece's rank
            merges += [
                (piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
            ]
        tok = Tokenizer(BPE(vocab, merges, unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True, byte_fallback=True))
        steps = []
        if spec.remove_extra_whitespaces:  # sentencepiece drops leading and trailing spaces and collapses runs
            steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
        if spec.add_dummy_prefix:
            steps.append(normalizers.Prepend("▁"))
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else [])
        )
        specials = [sp.id_to_piece(i) for i in range(self.n_words) if sp.is_control(i) or sp.is_unknown(i)]
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
        bos = sp.id_to_piece(self.bos_id)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, self.bos_id)]
        )
        return tok

    def export_hf(self, out_dir, model_max_length):
        """Write tokenizer.json, tokenizer_config.json and a copy of the sentencepiece model to out_dir,
        for transformers' AutoTokenizer. Text that spells a special token ("<s>") stays text, as here."""
        with atomic_open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
            f.write(self.hf_tokenizer().to_str(pretty=True))
        sp = self.sp_model
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": sp.id_to_piece(self.bos_id),
            "eos_token": sp.id_to_piece(self.eos_id),
            "unk_token": sp.id_to_piece(sp.unk_id()),
            "add_bos_token": True,
            "add_eos_token": False,
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
        }
        with atomic_open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with atomic_open(os.path.join(out_dir, "tokenizer.model")) as f, open(self.model_path, "rb") as src:
            shutil.copyfileobj(src, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-t", "--tokenizer-model", type=str, required=True, help="sentencepiece .model to export")
    parser.add_argument("-o", "--output", type=str, default=None, help="output .bin (default: beside the model)")
    args = parser.parse_args()
    with one_line_errors():
        path = Tokenizer(args.tokenizer_model).export(args.output)
    print(f"wrote {path}")
