// libFuzzer target (make fuzz): the input is a uint16 vocab_size then a tokenizer file; a file
// that parses must encode and decode within bounds. The input is also encoded as text with
// tok512.bin, where decode(encode(text)) must give the text back byte for byte.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "tokenizer.h"

static Tokenizer tok512;
static int have_tok512;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    char err[ERR_LEN];
    have_tok512 = tokenizer_open(&tok512, "../shared/models/llama2c/tok512.bin", 512, err) == 0;
    return 0;
}

// Encodes text, checks every id, and returns the decoded bytes (caller frees), or NULL.
static char *round_trip(const Tokenizer *t, const char *text, size_t len, size_t *out_len) {
    int *tokens = malloc((len + 3) * sizeof(int));
    char err[ERR_LEN];
    int n = tokenizer_encode(t, text, len, 1, 1, tokens, err);
    char *out = NULL;
    if (n >= 0) {
        size_t cap = 0;
        for (int i = 0; i < n; i++) {
            if (tokens[i] < 0 || tokens[i] >= t->vocab_size) abort();
            cap += (size_t)t->max_token_length;
        }
        out = malloc(cap + 1);
        *out_len = 0;
        for (int i = 1; i < n; i++) {
            size_t k;
            const char *piece = tokenizer_decode(t, tokens[i - 1], tokens[i], &k);
            if (!piece || k > (size_t)t->max_token_length) abort();
            memcpy(out + *out_len, piece, k);
            *out_len += k;
        }
    }
    free(tokens);
    return out;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    size_t n;
    char *out;
    if (have_tok512) {
        out = round_trip(&tok512, (const char *)data, size, &n);
        if (!out || n != size || memcmp(out, data, size) != 0) abort();
        free(out);
    }
    if (size < 2) return 0;
    Tokenizer t;
    char err[ERR_LEN];
    if (tokenizer_parse(&t, data + 2, size - 2, data[0] | data[1] << 8, "fuzz", err) != 0) return 0;
    const char text[] = "Once upon a time,  \xe6\x97\xa5 \xf0\x9f\x98\x80 \x80\xff\n<s>\n x";
    free(round_trip(&t, text, sizeof(text) - 1, &n));
    free(round_trip(&t, (const char *)data, size, &n));
    tokenizer_free(&t);
    return 0;
}
