// llama2.c's BPE tokenizer. File format (tokenizer.py's export): int32 max_token_length, then
// for every token id in order: float32 score, int32 byte length, the bytes.
#ifndef TOKENIZER_H
#define TOKENIZER_H

#include <stddef.h>

typedef struct {
    int vocab_size;
    int max_token_length;
    char *pieces;          // every token's bytes, each followed by a NUL
    size_t *offsets;       // (vocab_size + 1,) token i is pieces[offsets[i]:offsets[i+1]-1]
    float *scores;         // (vocab_size,) merge priority: higher merges first
    int *table;            // (table_size,) open-addressing hash of piece -> id + 1, 0 = empty
    size_t table_size;     // a power of two
    unsigned char byte_pieces[512]; // each byte as a one-char string, for <0xNN> tokens
} Tokenizer;

// Reads a tokenizer file with exactly vocab_size tokens; -1 with a one-line message in
// err[ERR_LEN] on failure.
int tokenizer_open(Tokenizer *t, const char *path, int vocab_size, char *err);
// Parses the `size` bytes at `data` (copied); `name` prefixes error messages.
int tokenizer_parse(Tokenizer *t, const void *data, size_t size, int vocab_size,
                    const char *name, char *err);
void tokenizer_free(Tokenizer *t);

// Encodes `len` bytes of text as llama2.c does: optional BOS (1), a dummy-prefix space, one
// token per UTF-8 character (its bytes as <0xNN> tokens, id = byte + 3, when the character is
// not in the vocabulary), then merges of adjacent pairs, best score first (leftmost on ties).
// tokens needs room for len + 3 ids. Returns the number of ids, or -1 with a message in err.
int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int bos, int eos,
                     int *tokens, char *err);
// The bytes of `token` following `prev`, *len of them: no leading space after BOS, the raw
// byte for <0xNN> tokens, nothing for BOS and EOS. NULL if token is out of range.
const char *tokenizer_decode(const Tokenizer *t, int prev, int token, size_t *len);

#endif
