"""
How close llama.cpp runs our GGUF exports to our C engine: stories260K (../shared) with llama2.c's
tok512.model, exported as GGUF fp32, fp16 and q8_0 and as a version-1 .bin. Our engine's greedy
continuation of a prompt is the reference; for each GGUF and llama.cpp cache setting this reports
the largest logit difference over those positions, the greedy agreement when both read the
reference tokens (teacher-forced), and how many tokens llama.cpp's own greedy generation keeps
identical. A JSON blob and a markdown table. Needs llama-cpp-python (`pip install llama-cpp-python`,
which compiles llama.cpp).

    python bench/gguf_parity.py
    python bench/gguf_parity.py --prompt="Lily" --tokens=200
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export  # noqa: E402
from csrc import engine, formats  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

LLAMA2C = os.path.join(ROOT, "..", "shared", "models", "llama2c")

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--prompt", default="One day")
parser.add_argument("--tokens", type=int, default=100, help="greedy tokens after the prompt")
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
try:
    import llama_cpp
except ImportError:
    sys.exit("error: needs llama-cpp-python: pip install llama-cpp-python (compiles llama.cpp from source)")

model = export.model_from_llama2c(*formats.read_v0(os.path.join(LLAMA2C, "stories260K.bin"))).eval()
tok = Tokenizer(os.path.join(LLAMA2C, "tok512.model"))
tmp = tempfile.mkdtemp()
export.export(model, os.path.join(tmp, "m.bin"))
ours = engine.Model(os.path.join(tmp, "m.bin"))
ids = tok.encode(args.prompt)
ref = engine.generate(ours, ids, steps=len(ids) + args.tokens - 1, temperature=0.0)  # stops early at BOS
c_logits = np.stack([ours.forward(t, pos) for pos, t in enumerate(ref)])

rows = []
for dtype in ("fp32", "fp16", "q8_0"):
    path = os.path.join(tmp, f"m_{dtype}.gguf")
    export.export_gguf(model, path, tok, dtype)
    for cache, settings in (
        (
            "fp32 keys/values, no flash attention",
            dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False),
        ),
        ("llama.cpp's defaults", {}),
    ):
        llm = llama_cpp.Llama(
            model_path=path, n_ctx=len(ref) + 1, n_threads=args.threads, logits_all=True, verbose=False, **settings
        )
        llm.eval(ref)
        logits = np.array(llm.scores[: len(ref)])
        agree = (logits.argmax(-1) == c_logits.argmax(-1))[len(ids) - 1 : -1].mean()
        llm.reset()
        theirs = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            theirs.append(t)
            if len(theirs) == len(ref) - len(ids):
                break
        llm.close()  # now: freed at interpreter exit, llama-cpp-python's destructor fails
        same = next((i for i, (a, b) in enumerate(zip(theirs, ref[len(ids) :])) if a != b), len(theirs))
        rows.append(
            {
                "gguf": dtype,
                "cache": cache,
                "max_logit_diff": float(np.abs(logits - c_logits).max()),
                "teacher_forced_agreement": float(agree),
                "identical_tokens": same,
                "of": len(ref) - len(ids),
            }
        )

print(json.dumps({"prompt": args.prompt, "llama_cpp_python": llama_cpp.__version__, "rows": rows}, indent=1))
print(
    "\n| GGUF | llama.cpp cache | max logit difference | greedy agreement, teacher-forced "
    "| identical free-running tokens |"
)
print("|---|---|---:|---:|---:|")
for r in rows:
    print(
        f"| {r['gguf']} | {r['cache']} | {r['max_logit_diff']:.5f} | {r['teacher_forced_agreement']:.0%} | "
        f"{r['identical_tokens']} of {r['of']} |"
    )
