// The BPE tokenizer. See tokenizer.h. Same output as llama2.c's encode, but pieces are
// found through a hash table and merges come from a heap: O(n log n) rather than O(n^2).
#include "tokenizer.h"
#include "error.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_TOKEN_LENGTH (1 << 16)
#define MAX_VOCAB_SIZE (1 << 20)
#define BOS 1
#define EOS 2

// ----------------------------------------------------------------------------
// loading

static int32_t read_i32(const unsigned char *p) {
    int32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static const char *piece(const Tokenizer *t, int id, size_t *len) {
    *len = t->offsets[id + 1] - t->offsets[id] - 1;
    return t->pieces + t->offsets[id];
}

// FNV-1a over the concatenation a + b
static uint32_t hash2(const char *a, size_t la, const char *b, size_t lb) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < la; i++) h = (h ^ (unsigned char)a[i]) * 16777619u;
    for (size_t i = 0; i < lb; i++) h = (h ^ (unsigned char)b[i]) * 16777619u;
    return h;
}

// The id of the piece a + b, or -1. The table is at most half full, so probing ends.
static int lookup2(const Tokenizer *t, const char *a, size_t la, const char *b, size_t lb) {
    const size_t mask = t->table_size - 1;
    for (size_t i = hash2(a, la, b, lb) & mask;; i = (i + 1) & mask) {
        int id = t->table[i] - 1;
        if (id < 0) return -1;
        size_t n;
        const char *p = piece(t, id, &n);
        if (n == la + lb && memcmp(p, a, la) == 0 && memcmp(p + la, b, lb) == 0) return id;
    }
}

int tokenizer_parse(Tokenizer *t, const void *data, size_t size, int vocab_size,
                    const char *name, char *err) {
    memset(t, 0, sizeof(*t));
    const unsigned char *d = data;
    if (vocab_size < 1 || vocab_size > MAX_VOCAB_SIZE) {
        return fail(err, "%s: vocab_size %d out of range [1, %d]", name, vocab_size,
                    MAX_VOCAB_SIZE);
    }
    if (size < 4) return fail(err, "%s: file size %zu is too small for a tokenizer", name, size);
    int max_len = read_i32(d);
    if (max_len < 1 || max_len > MAX_TOKEN_LENGTH) {
        return fail(err, "%s: max_token_length %d out of range [1, %d]", name, max_len,
                    MAX_TOKEN_LENGTH);
    }
    // first pass: validate every record and count the tokens and bytes
    size_t off = 4, total = 0;
    int n = 0;
    while (off < size) {
        if (size - off < 8) return fail(err, "%s: truncated in token %d", name, n);
        int len = read_i32(d + off + 4);
        if (len < 0 || len > max_len) {
            return fail(err, "%s: token %d has length %d (max_token_length %d)", name, n, len,
                        max_len);
        }
        if (size - off - 8 < (size_t)len) return fail(err, "%s: truncated in token %d", name, n);
        off += 8 + (size_t)len;
        total += (size_t)len + 1;
        n++;
    }
    if (n != vocab_size) {
        return fail(err, "%s: has %d tokens, but the model's vocab_size is %d", name, n,
                    vocab_size);
    }
    t->vocab_size = n;
    t->max_token_length = max_len;
    t->table_size = 2;
    while (t->table_size < 2 * (size_t)n) t->table_size *= 2;
    t->pieces = malloc(total);
    t->offsets = malloc((n + 1) * sizeof(size_t));
    t->scores = malloc(n * sizeof(float));
    t->table = calloc(t->table_size, sizeof(int));
    if (!t->pieces || !t->offsets || !t->scores || !t->table) {
        tokenizer_free(t);
        return fail(err, "%s: out of memory", name);
    }
    // second pass: copy the pieces, then index them
    off = 4;
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        int len = read_i32(d + off + 4);
        memcpy(&t->scores[i], d + off, sizeof(float));
        memcpy(t->pieces + at, d + off + 8, len);
        t->pieces[at + len] = '\0';
        t->offsets[i] = at;
        at += (size_t)len + 1;
        off += 8 + (size_t)len;
    }
    t->offsets[n] = at;
    const size_t mask = t->table_size - 1;
    for (int i = 0; i < n; i++) {
        size_t len;
        const char *p = piece(t, i, &len);
        if (lookup2(t, p, len, "", 0) >= 0) continue; // a repeated piece keeps its first id
        size_t slot = hash2(p, len, "", 0) & mask;
        while (t->table[slot] != 0) slot = (slot + 1) & mask;
        t->table[slot] = i + 1;
    }
    for (int i = 0; i < 256; i++) {
        t->byte_pieces[i * 2] = (unsigned char)i;
        t->byte_pieces[i * 2 + 1] = '\0';
    }
    return 0;
}

int tokenizer_open(Tokenizer *t, const char *path, int vocab_size, char *err) {
    memset(t, 0, sizeof(*t));
    size_t size = 0;
    int fd = open_regular_file(path, &size, err);
    if (fd < 0) return -1;
    unsigned char *data = malloc(size ? size : 1);
    size_t got = 0;
    while (data && got < size) {
        ssize_t r = read(fd, data + got, size - got);
        if (r <= 0) break;
        got += r;
    }
    close(fd);
    if (!data || got != size) {
        free(data);
        return fail(err, "%s: cannot read %zu bytes", path, size);
    }
    int rc = tokenizer_parse(t, data, size, vocab_size, path, err);
    free(data);
    return rc;
}

void tokenizer_free(Tokenizer *t) {
    free(t->pieces);
    free(t->offsets);
    free(t->scores);
    free(t->table);
    memset(t, 0, sizeof(*t));
}

// ----------------------------------------------------------------------------
// encode

// A candidate merge of the adjacent tokens at nodes left and right into id; stale once
// either node has changed token (the ids are kept to check that).
typedef struct {
    float score;
    int left, right;
    int left_token, right_token;
    int id;
} Merge;

static int better(const Merge *a, const Merge *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(Merge *heap, int *n, Merge m) {
    int i = (*n)++;
    while (i > 0 && better(&m, &heap[(i - 1) / 2])) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = m;
}

static Merge heap_pop(Merge *heap, int *n) {
    Merge top = heap[0], last = heap[--(*n)];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && better(&heap[c + 1], &heap[c])) c++;
        if (!better(&heap[c], &last)) break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = last;
    return top;
}

// Pushes the merge of node i with the node after it, if their concatenation is a token.
static void push_pair(const Tokenizer *t, const int *tok, const int *next, int i, Merge *heap,
                      int *n_heap) {
    int j = next[i];
    if (j < 0) return;
    size_t la, lb;
    const char *a = piece(t, tok[i], &la), *b = piece(t, tok[j], &lb);
    int id = lookup2(t, a, la, b, lb);
    // llama2.c starts its search for the best score at -1e10, so never merges below it
    if (id >= 0 && t->scores[id] > -1e10f) {
        heap_push(heap, n_heap, (Merge){t->scores[id], i, j, tok[i], tok[j], id});
    }
}

// Appends the token for the UTF-8 character (or stray bytes) s, or its bytes' tokens.
static int add_char(const Tokenizer *t, const char *s, size_t len, int *tok, int *n, char *err) {
    int id = lookup2(t, s, len, "", 0);
    if (id >= 0) {
        tok[(*n)++] = id;
        return 0;
    }
    for (size_t i = 0; i < len; i++) {
        int byte_id = (unsigned char)s[i] + 3; // <0x00> is token 3
        if (byte_id >= t->vocab_size) {
            return fail(err, "byte 0x%02x has no <0x%02X> token (vocab_size %d)",
                        (unsigned char)s[i], (unsigned char)s[i], t->vocab_size);
        }
        tok[(*n)++] = byte_id;
    }
    return 0;
}

int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int bos, int eos,
                     int *tokens, char *err) {
    if ((bos && BOS >= t->vocab_size) || (eos && EOS >= t->vocab_size)) {
        return fail(err, "vocab_size %d has no BOS (1) or EOS (2) token", t->vocab_size);
    }
    if (len > INT32_MAX / 4) return fail(err, "text of %zu bytes is too long to encode", len);
    int n_out = 0;
    if (bos) tokens[n_out++] = BOS;
    if (len > 0) {
        size_t cap = len + 1;
        int *tok = malloc(3 * cap * sizeof(int)); // tok, prev and next of each node
        Merge *heap = malloc(3 * cap * sizeof(Merge)); // n - 1 pairs + 2 per merge
        if (!tok || !heap) {
            free(tok);
            free(heap);
            return fail(err, "out of memory encoding %zu bytes", len);
        }
        int *prev = tok + cap, *next = tok + 2 * cap;
        int n = 0, rc = add_char(t, " ", 1, tok, &n, err); // the dummy prefix, as sentencepiece
        // one node per UTF-8 character: a byte that is not a continuation byte starts one, and
        // a character has at most 4 bytes
        for (size_t i = 0, start = 0; i < len && rc == 0; i++) {
            int continues = i + 1 < len && ((unsigned char)text[i + 1] & 0xC0) == 0x80;
            if (continues && i + 1 - start < 4) continue;
            rc = add_char(t, text + start, i + 1 - start, tok, &n, err);
            start = i + 1;
        }
        if (rc != 0) {
            free(tok);
            free(heap);
            return -1;
        }
        int n_heap = 0;
        for (int i = 0; i < n; i++) {
            prev[i] = i - 1;
            next[i] = i + 1 < n ? i + 1 : -1;
        }
        for (int i = 0; i < n; i++) push_pair(t, tok, next, i, heap, &n_heap);
        while (n_heap > 0) {
            Merge m = heap_pop(heap, &n_heap);
            if (tok[m.left] != m.left_token || tok[m.right] != m.right_token ||
                next[m.left] != m.right) {
                continue; // stale
            }
            tok[m.left] = m.id;
            tok[m.right] = -1;
            next[m.left] = next[m.right];
            if (next[m.left] >= 0) prev[next[m.left]] = m.left;
            if (prev[m.left] >= 0) push_pair(t, tok, next, prev[m.left], heap, &n_heap);
            push_pair(t, tok, next, m.left, heap, &n_heap);
        }
        for (int i = 0; i >= 0; i = next[i]) tokens[n_out++] = tok[i]; // node 0 never merges away
        free(tok);
        free(heap);
    }
    if (eos) tokens[n_out++] = EOS;
    return n_out;
}

// ----------------------------------------------------------------------------
// decode

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

const char *tokenizer_decode(const Tokenizer *t, int prev, int token, size_t *len) {
    if (token < 0 || token >= t->vocab_size) return NULL;
    *len = 0;
    if (token == BOS || token == EOS) return "";
    const char *p = piece(t, token, len);
    // sentencepiece's decoder strips the dummy-prefix space of the first piece
    if (prev == BOS && *len > 0 && p[0] == ' ') {
        p++;
        (*len)--;
    }
    // byte tokens <0xNN> stand for the raw byte
    if (*len == 6 && memcmp(p, "<0x", 3) == 0 && p[5] == '>') {
        int hi = hex_digit(p[3]), lo = hex_digit(p[4]);
        if (hi >= 0 && lo >= 0) {
            *len = 1;
            return (const char *)t->byte_pieces + (hi * 16 + lo) * 2;
        }
    }
    return p;
}
