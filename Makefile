# The two commands README.md opens with: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

# ---------------------------------------------------------------------------
# Python set-up: a local venv with the pinned requirements (torch==2.13.0, CPU build).

$(SETUP_STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

setup: $(SETUP_STAMP)

# ---------------------------------------------------------------------------
# The main job end to end on the default data (../shared/tinystories).

demo: setup
	$(PY) tinystories.py download
	$(PY) tinystories.py train_vocab --vocab_size=512
	$(PY) tinystories.py pretokenize --vocab_size=512
	$(PY) tokenizer.py --tokenizer-model=data/tok512.model
	$(PY) train.py
	$(PY) sample.py --num_samples=3 --max_new_tokens=200
	$(PY) export.py out/model.bin --checkpoint=out/ckpt.pt
	$(PY) export.py out/model_q80.bin --checkpoint=out/ckpt.pt --version=2
	$(MAKE) -s runomp
	OMP_NUM_THREADS=1 ./run out/model.bin -z data/tok512.bin -t 0.8 -n 256 -i "Once upon a time"
	OMP_NUM_THREADS=1 ./run out/model_q80.bin -z data/tok512.bin -t 0.8 -n 256 -i "Once upon a time"
	rm -f out/ppo_ckpt.pt out/ppo_log.jsonl
	$(PY) train.py --rl=ppo $(DEMO_PPO)
	$(PY) report.py --checkpoint=out/ppo_ckpt.pt --report_path=out/ppo_length.md --report_prompts=100
	$(PY) export.py out/ppo_model.bin --checkpoint=out/ppo_ckpt.pt
	OMP_NUM_THREADS=1 ./run out/ppo_model.bin -z data/tok512.bin -t 1.0 -n 256 -i "Once upon a time"

# the demo's PPO stage: the length reward on the default model, a few minutes
DEMO_PPO := --batch_size=16 --num_mini_batches=4 --target_len=150 --init_kl_coef=0.0 --max_iters=20

test: setup ctest lib
	$(PY) -m pytest -q tests

# ---------------------------------------------------------------------------
# C engine (run.c + csrc/)
# run: portable; runfast: tuned for this CPU (AVX-512 kernels when it has them); runomp: plus
# OpenMP threads (OMP_NUM_THREADS); lib: the runomp engine as the shared library that
# csrc/engine.py loads, without -ffast-math so parity with PyTorch holds to 1e-4 (with it, 1.4e-4). -fopenmp-simd keeps the OpenMP pragmas quiet where threads are off.

ENGINE_SRC := csrc/checkpoint.c csrc/matmul.c csrc/transformer.c csrc/tokenizer.c csrc/sampler.c
LIB_SRC := $(ENGINE_SRC) csrc/attention.c
ENGINE_HDR := $(wildcard csrc/*.h)
WARN := -Wall -Wextra
LIB := csrc/libengine.so
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 120

.PHONY: run runfast runomp lib ctest fuzz

run:
	$(CC) -O3 $(WARN) -fopenmp-simd -o run run.c $(ENGINE_SRC) -lm

runfast:
	$(CC) -Ofast -march=native $(WARN) -fopenmp-simd -o run run.c $(ENGINE_SRC) -lm

runomp:
	$(CC) -Ofast -march=native $(WARN) -fopenmp -o run run.c $(ENGINE_SRC) -lm

lib: $(LIB)

$(LIB): $(LIB_SRC) $(ENGINE_HDR)
	$(CC) -O3 -march=native $(WARN) -fopenmp -fPIC -shared -Wl,-Bsymbolic -o $@ $(LIB_SRC) -lm

# run and runomp: the portable kernels, then the AVX-512 and OpenMP ones
ctest:
	$(MAKE) -s run && bash csrc/test_run.sh
	$(MAKE) -s runomp && bash csrc/test_run.sh

# libFuzzer with AddressSanitizer and UBSan on the checkpoint and tokenizer loaders (clang:
# apt-get install clang), seeded with small valid files. Not part of the tests: it runs for
# FUZZ_SECONDS each and keeps its corpus in out/fuzz/.
out/fuzz_%: csrc/fuzz_%.c $(ENGINE_SRC) $(ENGINE_HDR)
	@mkdir -p out
	$(FUZZ_CC) -g -O1 -march=native -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -o $@ $< $(ENGINE_SRC) -lm

fuzz: out/fuzz_checkpoint out/fuzz_tokenizer
	$(PY) -m csrc.formats fuzz-seeds out/fuzz
	./out/fuzz_checkpoint -max_total_time=$(FUZZ_SECONDS) -max_len=65536 out/fuzz/checkpoint
	./out/fuzz_tokenizer -max_total_time=$(FUZZ_SECONDS) -max_len=65536 out/fuzz/tokenizer

clean:
	rm -rf __pycache__ tests/__pycache__ csrc/__pycache__
	rm -f run $(LIB) out/fuzz_checkpoint out/fuzz_tokenizer
