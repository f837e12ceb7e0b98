"""
A thin wrapper over a sentencepiece model, and its export to llama2.c's tokenizer .bin.

    python tokenizer.py --tokenizer-model=data/tok4096.model   # writes data/tok4096.bin

The .bin layout (what run.c reads): int32 max_token_length, then for every token id in
order: float32 score, int32 byte length, the bytes. Sentencepiece's '▁' becomes a space,
BOS/EOS become '\\n<s>\\n' and '\\n</s>\\n', byte tokens stay as the text '<0xNN>'.
"""
import argparse
import os
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-t", "--tokenizer-model", type=str, required=True, help="sentencepiece .model to export")
    parser.add_argument("-o", "--output", type=str, default=None, help="output .bin (default: beside the model)")
    args = parser.parse_args()
    with one_line_errors():
        path = Tokenizer(args.tokenizer_model).export(args.output)
    print(f"wrote {path}")
