# The two commands README.md opens with: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

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
	$(PY) train.py
	$(PY) sample.py --num_samples=3 --max_new_tokens=200
	$(PY) export.py out/model.bin --checkpoint=out/ckpt.pt
	$(PY) export.py out/model_q80.bin --checkpoint=out/ckpt.pt --version=2
	$(MAKE) -s runomp
	OMP_NUM_THREADS=1 ./run out/model.bin -z data/tok512.bin -t 0.8 -n 256 -i "Once upon a time"
	OMP_NUM_THREADS=1 ./run out/model_q80.bin -z data/tok512.bin -t 0.8 -n 256 -i "Once upon a time"
	$(MAKE) -s lib
	$(PY) tinystories.py instruct --vocab_size=512
	$(PY) train.py --sft=True --max_iters=300
	$(PY) train.py recipes/instruct_grpo.conf --max_iters=30
	$(PY) compare.py --models=pretrained:out/ckpt.pt,sft:out/sft_ckpt.pt,grpo:out/grpo_ckpt.pt --reference=sft \
		--reward=instruct --prompts=200 --best_of=1,2,4 --num_show=3 --report_path=out/instruct.md
	$(PY) export.py out/grpo_model.bin --checkpoint=out/grpo_ckpt.pt
	OMP_NUM_THREADS=1 ./run out/grpo_model.bin -z data/tok512.bin -t 0.8 -n 256 \
		-i "$$(printf 'Words: dog, run, happy\nFeatures: Dialogue\nName: Lily\nStory:')"

# pytest-xdist: a worker on each core, stealing tests from the others' queues as it finishes its own
test: setup lint ctest lib
	$(PY) -m pytest -q -n auto --dist worksteal tests

# ruff (pyproject.toml): the lint rules and the formatting every Python file keeps
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# ---------------------------------------------------------------------------
# C engine (run.c + csrc/)
# run: the portable C kernels (the reference), -O3. runfast: the kernels for ARCH (-march=ARCH,
# native by default: AVX-512, AVX2 or NEON by what this CPU has), -Ofast. runomp: plus OpenMP
# threads (OMP_NUM_THREADS). An explicit ARCH builds another path, e.g. on an AVX-512 machine
# `make runomp ARCH=x86-64-v3` (AVX2+FMA), ARCH="x86-64-v3 -mavxvnni" (AVX2 with AVX-VNNI),
# ARCH=x86-64-v4 (AVX-512 without VNNI), ARCH=portable; ./run names its kernels on stderr.
# lib: the engine as the shared library csrc/engine.py loads, and csrc/train/attention.c (model.py's
# CPU training kernel) as one of its own; both without -ffast-math, so that parity with PyTorch
# holds to 1e-4 (with it, 1.4e-4). Where threads are off, -fopenmp-simd keeps the `omp simd` pragmas and
# NO_THREADS quiets the warnings about the threading ones, which then do nothing.

ARCH ?= native
ifeq ($(ARCH),portable)
TARGET := -DPORTABLE_KERNELS
else
TARGET := -march=$(ARCH)
endif
# the engine is every C file in csrc/ (csrc/engine.py reads the same list); csrc/train/ holds
# model.py's training kernel, tests/c/ the C tests and fuzzers
ENGINE_SRC := $(sort $(wildcard csrc/*.c))
ENGINE_HDR := $(wildcard csrc/*.h)
WARN := -Wall -Wextra
NO_THREADS := -fopenmp-simd -Wno-unknown-pragmas
LIB := csrc/libengine.so
ATTENTION_LIB := csrc/libattention.so
SHARED_LIB := -O3 $(WARN) -fopenmp -fPIC -shared -Wl,-Bsymbolic
BIN ?= run
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 120

.PHONY: run runfast runomp lib ctest armtest fuzz

run:
	$(CC) -O3 -DPORTABLE_KERNELS $(WARN) $(NO_THREADS) -o $(BIN) run.c $(ENGINE_SRC) -lm

runfast:
	$(CC) -Ofast $(TARGET) $(WARN) $(NO_THREADS) -o $(BIN) run.c $(ENGINE_SRC) -lm

runomp:
	$(CC) -Ofast $(TARGET) $(WARN) -fopenmp -o $(BIN) run.c $(ENGINE_SRC) -lm

lib: $(LIB) $(ATTENTION_LIB)

$(LIB): $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(TARGET) $(SHARED_LIB) -o $@ $(ENGINE_SRC) -lm

$(ATTENTION_LIB): csrc/train/attention.c csrc/train/attention.h
	$(CC) $(TARGET) $(SHARED_LIB) -o $@ csrc/train/attention.c -lm

# the kernels of ARCH against the portable ones on random data (tests/test_kernels.py runs it for
# every path this CPU can execute)
KTEST ?= out/test_kernels
$(KTEST): tests/c/test_kernels.c $(ENGINE_SRC) $(ENGINE_HDR) csrc/train/attention.c csrc/train/attention.h
	@mkdir -p $(dir $@)
	$(CC) -O3 $(TARGET) $(WARN) -fopenmp -Icsrc -o $@ tests/c/test_kernels.c $(ENGINE_SRC) csrc/train/attention.c -lm

# run and runomp for this CPU; tests/test_kernels.py does the same for every other path
ctest:
	$(MAKE) -s run && bash tests/c/test_run.sh
	$(MAKE) -s runomp && bash tests/c/test_run.sh

# The NEON kernels, cross-compiled, under qemu-aarch64 (Debian: gcc-aarch64-linux-gnu,
# libc6-dev-arm64-cross, qemu-user): with and without the dot-product extension.
AARCH64_CC ?= aarch64-linux-gnu-gcc
ARM_OUT ?= out
armtest:
	@mkdir -p $(ARM_OUT)
	@for arch in armv8.2-a+dotprod armv8-a; do \
		echo "aarch64 -march=$$arch:"; \
		$(AARCH64_CC) -Ofast -march=$$arch $(WARN) -fopenmp -o $(ARM_OUT)/run-aarch64 run.c $(ENGINE_SRC) -lm && \
		$(AARCH64_CC) -O3 -march=$$arch $(WARN) -fopenmp -Icsrc -o $(ARM_OUT)/test_kernels-aarch64 tests/c/test_kernels.c $(ENGINE_SRC) csrc/train/attention.c -lm && \
		qemu-aarch64 -L /usr/aarch64-linux-gnu $(ARM_OUT)/test_kernels-aarch64 && \
		RUN="qemu-aarch64 -L /usr/aarch64-linux-gnu $(ARM_OUT)/run-aarch64" bash tests/c/test_run.sh || exit 1; \
	done

# libFuzzer with AddressSanitizer and UBSan on the checkpoint and tokenizer loaders (clang:
# apt-get install clang), seeded with small valid files. Not part of the tests: it runs for
# FUZZ_SECONDS each and keeps its corpus in out/fuzz/.
out/fuzz_%: tests/c/fuzz_%.c $(ENGINE_SRC) $(ENGINE_HDR)
	@mkdir -p out
	$(FUZZ_CC) -g -O1 -march=native -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Icsrc -o $@ $< $(ENGINE_SRC) -lm

fuzz: out/fuzz_checkpoint out/fuzz_tokenizer
	$(PY) -m csrc.formats fuzz-seeds out/fuzz
	./out/fuzz_checkpoint -max_total_time=$(FUZZ_SECONDS) -max_len=65536 out/fuzz/checkpoint
	./out/fuzz_tokenizer -max_total_time=$(FUZZ_SECONDS) -max_len=65536 out/fuzz/tokenizer

clean:
	rm -rf __pycache__ tests/__pycache__ csrc/__pycache__
	rm -f run $(LIB) $(ATTENTION_LIB) out/fuzz_checkpoint out/fuzz_tokenizer out/test_kernels*
