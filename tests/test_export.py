"""export.py -> the C engine: logits, greedy generation and int8 agreement against PyTorch."""
import numpy as np
import pytest
import torch

import export
from conftest import SHARED
from csrc import engine, formats
import model as model_module
from model import ModelArgs, Transformer

STORIES260K = SHARED / "models" / "llama2c" / "stories260K.bin"


@pytest.fixture(scope="module")
def stories260k():
    """Karpathy's trained stories260K (GQA: 8 heads, 4 KV heads) loaded into model.py."""
    return export.model_from_llama2c(*formats.read_v0(STORIES260K)).eval()


@pytest.fixture(scope="module")
def story_tokens():
    """A real token sequence: stories260K's own greedy continuation of BOS (its tokenizer is lost)."""
    return [1] + engine.generate(engine.Model(str(STORIES260K)), [1], steps=199, temperature=0.0)


def torch_logits(model, tokens):
    """PyTorch's logits through its own SDPA attention: the reference the C engine must match. (At head
    size 8 model.py trains through csrc/attention.c, 4.5e-5 from SDPA on stories260K; the engine is
    6.9e-5 from SDPA, so the two rounding errors could add up past the issue's 1e-4.)"""
    limit, model_module.C_ATTENTION_MAX_HEAD_DIM = model_module.C_ATTENTION_MAX_HEAD_DIM, 0
    try:
        with torch.no_grad():
            return model(torch.tensor([tokens]))[0][0].numpy()  # (T, vocab)
    finally:
        model_module.C_ATTENTION_MAX_HEAD_DIM = limit


def c_logits(path, tokens):
    m = engine.Model(str(path))
    return np.stack([m.forward(t, pos) for pos, t in enumerate(tokens)])


def test_llama2c_file_round_trips_through_model_py(stories260k, tmp_path):
    export.export(stories260k, tmp_path / "v0.bin", version=0)
    _, original = formats.read_v0(STORIES260K)
    _, again = formats.read_v0(tmp_path / "v0.bin")
    for name, w in original.items():
        assert (w is None and again[name] is None) or np.array_equal(w, again[name]), name


@pytest.mark.parametrize("n_kv_heads", [4, 8])
def test_c_logits_equal_pytorch_logits_for_fp32_exports(stories260k, story_tokens, tmp_path, n_kv_heads):
    if n_kv_heads == 4:
        model = stories260k  # trained, GQA
    else:  # plain multi-head attention, weights drawn wide enough to give varied logits
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=64, n_layers=3, n_heads=8, n_kv_heads=8, vocab_size=512, max_seq_len=256)).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.08)
    export.export(model, tmp_path / "m.bin", version=1)
    tokens = story_tokens[:128]
    diff = np.abs(c_logits(tmp_path / "m.bin", tokens) - torch_logits(model, tokens)).max()
    assert diff <= 1e-4, diff


def test_greedy_generation_of_200_tokens_is_identical_in_c_and_pytorch(stories260k, tmp_path):
    export.export(stories260k, tmp_path / "m.bin", version=1)
    prompt = [1, 403, 407, 261]  # "Once upon a time" in stories260K's lost tokenizer, as run.c prints it
    ours = stories260k.generate([prompt], 200, temperature=0.0)[0]
    c = engine.generate(engine.Model(str(tmp_path / "m.bin")), prompt, steps=len(prompt) + 200, temperature=0.0)
    assert len(ours) == 200 and 1 not in ours  # no end of story, so C runs all 200 steps too
    assert c[:len(prompt) + 200] == prompt + ours


def test_int8_export_stays_close_and_agrees_on_greedy_tokens(stories260k, story_tokens, tmp_path):
    export.export(stories260k, tmp_path / "q.bin", version=2)
    assert engine.Model(str(tmp_path / "q.bin")).group_size == export.q80_group_size(64, 172) == 4
    ref = torch_logits(stories260k, story_tokens)
    q = c_logits(tmp_path / "q.bin", story_tokens)
    agree = (q.argmax(-1) == ref.argmax(-1)).mean()
    print(f"int8 vs fp32: max logit error {np.abs(q - ref).max():.3f}, greedy agreement {agree:.1%}")
    # stories260K (dim 64, logit margins of ~0.9) is where int8 noise weighs most: 94.0% here, the same as
    # quantising its weights alone in PyTorch (94.5%); the default model trained here agrees on 99.4% (README)
    assert agree >= 0.93
    assert np.abs(q - ref).mean() < 0.5


def test_export_refuses_a_missing_or_foreign_checkpoint(tmp_path):
    import subprocess, sys
    from conftest import ROOT
    (tmp_path / "x.pt").write_bytes(b"junk")
    for ckpt in (tmp_path / "none.pt", tmp_path / "x.pt"):
        p = subprocess.run([sys.executable, str(ROOT / "export.py"), str(tmp_path / "m.bin"), f"--checkpoint={ckpt}"],
                           capture_output=True, text=True)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and str(ckpt) in p.stderr
    assert not (tmp_path / "m.bin").exists()
