/* Inference for Llama-2 Transformer models in pure C: the command line of llama2.c's run,
   on top of the engine in csrc/ (checkpoint, transformer, tokenizer, sampler). */

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "csrc/error.h"
#include "csrc/matmul.h"
#include "csrc/sampler.h"
#include "csrc/tokenizer.h"
#include "csrc/transformer.h"

// ----------------------------------------------------------------------------
// utilities

static void die(const char *msg) {
    fprintf(stderr, "error: %s\n", msg);
    exit(EXIT_FAILURE);
}

static double time_in_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// Prints the text of `token` after `prev`, but skips lone bytes that are neither printable
// nor whitespace (control codes from <0xNN> tokens).
static void print_piece(const Tokenizer *tokenizer, int prev, int token) {
    size_t len = 0;
    const char *piece = tokenizer_decode(tokenizer, prev, token, &len);
    if (piece == NULL || len == 0) return;
    if (len == 1 && !(isprint((unsigned char)piece[0]) || isspace((unsigned char)piece[0]))) {
        return;
    }
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
}

// One line on stderr: the kernels this build runs (make runomp ARCH=...), its threads, and the
// KV cache's type when it is not the default.
static void print_kernels(const Transformer *transformer) {
#ifdef _OPENMP
    int threads = omp_get_max_threads();
#else
    int threads = 1;
#endif
    fprintf(stderr, "kernels: %s, %d thread%s%s\n", matmul_kernels(), threads, threads > 1 ? "s" : "",
            transformer->state.kv_type == KV_F16 ? ", fp16 KV cache" : "");
}

static int *encode_or_die(const Tokenizer *tokenizer, const char *text, int *n_tokens) {
    size_t len = strlen(text);
    int *tokens = malloc((len + 3) * sizeof(int)); // +3 for the dummy prefix, BOS, EOS
    char err[ERR_LEN];
    if (!tokens) die("out of memory");
    *n_tokens = tokenizer_encode(tokenizer, text, len, 1, 0, tokens, err);
    if (*n_tokens < 0) die(err);
    return tokens;
}

// ----------------------------------------------------------------------------
// generation loop

typedef struct {
    const Tokenizer *tokenizer;
    int n_printed;
    double start; // the first token is slower (page faults): time from after it
} Printer;

static void print_token(void *ctx, int prev, int token) {
    Printer *p = ctx;
    print_piece(p->tokenizer, prev, token);
    if (p->n_printed++ == 0) p->start = time_in_s();
}

static void generate(Transformer *transformer, const Tokenizer *tokenizer, Sampler *sampler,
                     const char *prompt, int steps) {
    int n_prompt;
    int *prompt_tokens = encode_or_die(tokenizer, prompt ? prompt : "", &n_prompt);
    Printer printer = {tokenizer, 0, 0.0};
    char err[ERR_LEN];
    if (transformer_check_prompt(transformer, prompt_tokens, n_prompt, err) != 0) die(err);
    print_kernels(transformer);
    if (transformer_generate(transformer, sampler, prompt_tokens, n_prompt, steps, NULL,
                             print_token, &printer, err) < 0) {
        die(err);
    }
    printf("\n");
    if (printer.n_printed > 1) {
        double elapsed = time_in_s() - printer.start;
        fprintf(stderr, "achieved tok/s: %f\n", (printer.n_printed - 1) / elapsed);
    }
    free(prompt_tokens);
}

// ----------------------------------------------------------------------------
// chat loop: the Llama 2 Chat schema, as in llama2.c

static int read_stdin(const char *guide, char *buffer, size_t bufsize) {
    printf("%s", guide);
    fflush(stdout);
    if (fgets(buffer, bufsize, stdin) == NULL) return -1; // end of input
    size_t len = strlen(buffer);
    if (len > 0 && buffer[len - 1] == '\n') buffer[len - 1] = '\0';
    return 0;
}

static void chat(Transformer *transformer, const Tokenizer *tokenizer, Sampler *sampler,
                 const char *cli_user_prompt, const char *cli_system_prompt, int steps) {
    const int seq_len = transformer->ckpt.config.seq_len;
    if (steps <= 0 || steps > seq_len) steps = seq_len;
    char system_prompt[512] = "", user_prompt[512], rendered_prompt[1152];
    int *prompt_tokens = NULL;
    int n_prompt = 0, user_idx = 0, user_turn = 1, next = 0;
    print_kernels(transformer);
    for (int pos = 0; pos < steps; pos++) {
        if (user_turn) {
            if (pos == 0) {
                if (cli_system_prompt) {
                    snprintf(system_prompt, sizeof(system_prompt), "%s", cli_system_prompt);
                } else if (read_stdin("Enter system prompt (optional): ", system_prompt,
                                      sizeof(system_prompt)) != 0) {
                    break;
                }
            }
            if (pos == 0 && cli_user_prompt) {
                snprintf(user_prompt, sizeof(user_prompt), "%s", cli_user_prompt);
            } else if (read_stdin("User: ", user_prompt, sizeof(user_prompt)) != 0) {
                break;
            }
            if (pos == 0 && system_prompt[0] != '\0') {
                snprintf(rendered_prompt, sizeof(rendered_prompt),
                         "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", system_prompt,
                         user_prompt);
            } else {
                snprintf(rendered_prompt, sizeof(rendered_prompt), "[INST] %s [/INST]",
                         user_prompt);
            }
            free(prompt_tokens);
            prompt_tokens = encode_or_die(tokenizer, rendered_prompt, &n_prompt);
            if (pos + n_prompt > seq_len) die("prompt is longer than the rest of the context");
            user_idx = 0;
            user_turn = 0;
            printf("Assistant: ");
        }
        // force the prompt, then feed back what the model says
        int token = user_idx < n_prompt ? prompt_tokens[user_idx++] : next;
        if (token == 2) user_turn = 1; // EOS ends the assistant's turn
        next = sampler_sample(sampler, transformer_forward(transformer, token, pos));
        if (user_idx >= n_prompt && next != 2) print_piece(tokenizer, token, next);
        if (next == 2) printf("\n");
    }
    printf("\n");
    free(prompt_tokens);
}

// ----------------------------------------------------------------------------
// CLI

static void error_usage(void) {
    fprintf(stderr, "Usage:   run <checkpoint> [options]\n");
    fprintf(stderr, "Example: run model.bin -n 256 -i \"Once upon a time\"\n");
    fprintf(stderr, "Options:\n");
    fprintf(stderr, "  -t <float>  temperature in [0,inf], default 1.0\n");
    fprintf(stderr, "  -p <float>  p value in top-p (nucleus) sampling in [0,1] default 0.9\n");
    fprintf(stderr, "  -s <int>    random seed, default time(NULL)\n");
    fprintf(stderr, "  -n <int>    number of steps to run for, default 256. 0 = max_seq_len\n");
    fprintf(stderr, "  -i <string> input prompt\n");
    fprintf(stderr, "  -z <string> optional path to custom tokenizer\n");
    fprintf(stderr, "  -m <string> mode: generate|chat, default: generate\n");
    fprintf(stderr, "  -y <string> (optional) system prompt in chat mode\n");
    fprintf(stderr, "  -k <string> KV cache type: f32|f16, default f32 (f16: half the memory)\n");
    exit(EXIT_FAILURE);
}

static void bad_value(const char *flag, const char *what, const char *s) {
    char msg[ERR_LEN];
    snprintf(msg, sizeof(msg), "%s expects %s, got '%s'", flag, what, s);
    die(msg);
}

static float parse_float(const char *flag, const char *s) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    uint32_t bits; // strtof takes "nan" and "inf"; -Ofast assumes neither exists, so test the exponent bits
    memcpy(&bits, &v, sizeof(bits));
    if (end == s || *end != '\0' || errno != 0 || (bits & 0x7f800000u) == 0x7f800000u) {
        bad_value(flag, "a number", s);
    }
    return v;
}

static long long parse_int(const char *flag, const char *s) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end != '\0' || errno != 0) bad_value(flag, "an integer", s);
    return v;
}

int main(int argc, char *argv[]) {
    const char *checkpoint_path = NULL; // e.g. out/model.bin
    const char *tokenizer_path = "tokenizer.bin";
    float temperature = 1.0f;         // 0.0 = greedy deterministic, 1.0 = original
    float topp = 0.9f;                // top-p in nucleus sampling, 1.0 = off
    int steps = 256;                  // number of steps to run for
    const char *prompt = NULL;        // prompt string
    unsigned long long rng_seed = 0;  // seed rng with time by default
    const char *mode = "generate";    // generate|chat
    const char *system_prompt = NULL; // the (optional) system prompt in chat mode
    const char *kv_cache = "f32";     // f32|f16

    if (argc < 2) error_usage();
    checkpoint_path = argv[1];
    for (int i = 2; i < argc; i += 2) {
        // flags come as pairs: -x value
        if (i + 1 >= argc || argv[i][0] != '-' || strlen(argv[i]) != 2) error_usage();
        const char *value = argv[i + 1];
        switch (argv[i][1]) {
        case 't': temperature = parse_float(argv[i], value); break;
        case 'p': topp = parse_float(argv[i], value); break;
        case 's': rng_seed = (unsigned long long)parse_int(argv[i], value); break;
        case 'n': {
            long long n = parse_int(argv[i], value);
            if (n < 0) bad_value("-n", "a number of steps >= 0 (0 = the whole context)", value);
            steps = n > INT_MAX ? INT_MAX : (int)n; // 0 = seq_len
            break;
        }
        case 'i': prompt = value; break;
        case 'z': tokenizer_path = value; break;
        case 'm': mode = value; break;
        case 'y': system_prompt = value; break;
        case 'k': kv_cache = value; break;
        default: error_usage();
        }
    }
    // llama2.c's overrides
    if (rng_seed == 0) rng_seed = (unsigned long long)time(NULL);
    if (temperature < 0.0f) temperature = 0.0f;
    if (topp < 0.0f || topp > 1.0f) topp = 0.9f;
    if (strcmp(mode, "generate") != 0 && strcmp(mode, "chat") != 0) {
        fprintf(stderr, "unknown mode: %s\n", mode);
        error_usage();
    }

    if (strcmp(kv_cache, "f32") != 0 && strcmp(kv_cache, "f16") != 0) {
        bad_value("-k", "f32 or f16", kv_cache);
    }

    char err[ERR_LEN];
    Transformer transformer;
    KVType kv_type = strcmp(kv_cache, "f16") == 0 ? KV_F16 : KV_F32;
    if (transformer_open(&transformer, checkpoint_path, kv_type, err) != 0) die(err);
    const int vocab_size = transformer.ckpt.config.vocab_size;
    Tokenizer tokenizer;
    if (tokenizer_open(&tokenizer, tokenizer_path, vocab_size, err) != 0) die(err);
    Sampler sampler;
    if (sampler_init(&sampler, vocab_size, temperature, topp, rng_seed, err) != 0) die(err);

    if (strcmp(mode, "generate") == 0) {
        generate(&transformer, &tokenizer, &sampler, prompt, steps);
    } else {
        chat(&transformer, &tokenizer, &sampler, prompt, system_prompt, steps);
    }

    sampler_free(&sampler);
    tokenizer_free(&tokenizer);
    transformer_close(&transformer);
    return 0;
}
