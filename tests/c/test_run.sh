#!/usr/bin/env bash
# C-side checks of ./run (make ctest): greedy generations of stories260K against recorded
# expectations (fp32 and fp16 KV cache), and one clean line on stderr with exit status 1 for malformed inputs.
# (tests/test_engine.py ties the recorded text to a numpy reference forward.) RUN names the
# binary (default ./run), with a runner in front if it needs one (qemu-aarch64 in make armtest).
set -u
cd "$(dirname "$0")/../.."
M=../shared/models/llama2c
RUN=${RUN:-./run}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

ok() { passed=$((passed + 1)); }
ko() { failed=$((failed + 1)); echo "FAIL: $*"; }

# stories260K with tok512.bin: gibberish text (a different tok512 trained it), real token ids
expected=$(cat <<'EOF'
RR lo lo loR timeDQqvingitt kayndayYim
fffffffffffffisbiverynir Theydw doIchaneding friend”vedaninitt namZllZmamoolestig
EOF
)
out=$($RUN $M/stories260K.bin -z $M/tok512.bin -t 0 -n 64 2>"$tmp/stderr")
if [ "$out" = "$expected" ] && grep -q "^achieved tok/s: " "$tmp/stderr" && grep -q "^kernels: " "$tmp/stderr"; then
    ok
else
    ko "greedy stories260K: got '$out'"
fi

# the fp16 cache: the same text until a near-tie at token 38 goes the other way (every path)
expected=$(cat <<'EOF'
RR lo lo loR timeDQqvingitt kayndayYim
fffffffffffffisbiveryi$igigigigigigigigigigigigigigigigstSyilylayout nam up
EOF
)
out=$($RUN $M/stories260K.bin -z $M/tok512.bin -t 0 -n 64 -k f16 2>"$tmp/stderr")
if [ "$out" = "$expected" ] && grep -q "^kernels: .*, fp16 KV cache$" "$tmp/stderr"; then
    ok
else
    ko "greedy stories260K, fp16 cache: got '$out'"
fi

# expect_error NAME FRAGMENT ARGS...: exit status 1, exactly one stderr line "error: ...FRAGMENT..."
expect_error() {
    local name=$1 fragment=$2
    shift 2
    $RUN "$@" >"$tmp/out" 2>"$tmp/err"
    local status=$?
    if [ $status -eq 1 ] && [ "$(wc -l <"$tmp/err")" -eq 1 ] && grep -q "^error: .*$fragment" "$tmp/err" \
        && [ ! -s "$tmp/out" ]; then
        ok
    else
        ko "$name: status $status, stderr: $(head -c 300 "$tmp/err")"
    fi
}

model() { # model NAME: the args to run a malformed model file
    echo "$tmp/$1.bin -z $M/tok512.bin"
}

size=$(stat -c %s $M/stories260K.bin)
head -c $((size - 4)) $M/stories260K.bin >"$tmp/truncated.bin"
expect_error truncated "does not match header" $(model truncated)
{ cat $M/stories260K.bin; printf 'x'; } >"$tmp/extra.bin"
expect_error extra_byte "does not match header" $(model extra)
: >"$tmp/empty.bin"
expect_error empty "too small" $(model empty)
head -c 20 $M/stories260K.bin >"$tmp/short.bin"
expect_error short_header "too small" $(model short)
{ printf '\x00\x00\x00\x00'; tail -c +5 $M/stories260K.bin; } >"$tmp/dim0.bin"
expect_error dim_zero "dim 0 out of range" $(model dim0)
{ head -c 16 $M/stories260K.bin; printf '\x03\x00\x00\x00'; tail -c +21 $M/stories260K.bin; } >"$tmp/kv3.bin"
expect_error kv_heads "not a multiple of n_kv_heads 3" $(model kv3)
{ printf '24kb'; head -c 300 /dev/zero; } >"$tmp/magic.bin"
expect_error wrong_magic "magic" $(model magic)
{ printf '24ka\x07\x00\x00\x00'; head -c 300 /dev/zero; } >"$tmp/version.bin"
expect_error wrong_version "unsupported version 7" $(model version)
head -c 100000 /dev/urandom >"$tmp/random.bin"
expect_error random_bytes "" $(model random)
expect_error missing_model "cannot open" "$tmp/missing.bin"
expect_error directory "not a regular file" "$tmp"

tsize=$(stat -c %s $M/tok512.bin)
head -c $((tsize - 3)) $M/tok512.bin >"$tmp/tok_truncated.bin"
expect_error tokenizer_truncated "truncated in token 511" $M/stories260K.bin -z "$tmp/tok_truncated.bin"
expect_error vocab_mismatch "has 32000 tokens" $M/stories260K.bin -z $M/tokenizer.bin
expect_error missing_tokenizer "cannot open" $M/stories260K.bin -z "$tmp/missing.bin"

long=$(printf 'Once upon a time there was a dog. %.0s' $(seq 60))
expect_error long_prompt "longer than the context" $M/stories260K.bin -z $M/tok512.bin -i "$long"
expect_error bad_temperature "-t expects a number" $M/stories260K.bin -z $M/tok512.bin -t hot
expect_error bad_kv_cache "-k expects f32 or f16" $M/stories260K.bin -z $M/tok512.bin -k q8

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
