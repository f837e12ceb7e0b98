// Checkpoint loading: mmap, header validation, weight pointers. See checkpoint.h.
#include "checkpoint.h"
#include "error.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HEADER_V0 28  // 7 int32
#define HEADER_V1 256 // magic, version, 7 int32, flags, zero padding

// ----------------------------------------------------------------------------
// header

static int32_t read_i32(const unsigned char *p) {
    int32_t v;
    memcpy(&v, p, sizeof(v)); // the header fields after the flag byte are unaligned
    return v;
}

// Ranges well beyond any llama2.c model (Llama 2 70B: dim 8192, hidden_dim 28672), small
// enough that every size below fits in 64 bits and every index in the forward in size_t.
static int check_config(const Config *p, const char *name, const char *what, char *err) {
    const char *names[7] = {"dim", "hidden_dim", "n_layers", "n_heads",
                            "n_kv_heads", "vocab_size", "seq_len"};
    const int values[7] = {p->dim, p->hidden_dim, p->n_layers, p->n_heads,
                           p->n_kv_heads, p->vocab_size, p->seq_len};
    const int max[7] = {1 << 16, 1 << 18, 1 << 10, 1 << 10, 1 << 10, 1 << 20, 1 << 20};
    for (int i = 0; i < 7; i++) {
        if (values[i] < 1 || values[i] > max[i]) {
            return fail(err, "%s: %s: %s %d out of range [1, %d]", name, what, names[i],
                        values[i], max[i]);
        }
    }
    if (p->dim % p->n_heads != 0) {
        return fail(err, "%s: dim %d is not divisible by n_heads %d", name, p->dim, p->n_heads);
    }
    if ((p->dim / p->n_heads) % 2 != 0) {
        return fail(err, "%s: head size %d is odd (RoPE rotates pairs)", name,
                    p->dim / p->n_heads);
    }
    if (p->n_kv_heads > p->n_heads || p->n_heads % p->n_kv_heads != 0) {
        return fail(err, "%s: n_heads %d is not a multiple of n_kv_heads %d", name, p->n_heads,
                    p->n_kv_heads);
    }
    return 0;
}

static int parse_header(Checkpoint *c, const unsigned char *data, size_t size, const char *name,
                        char *err) {
    Config *p = &c->config;
    uint32_t magic = 0;
    if (size >= 4) memcpy(&magic, data, 4);
    // other formats a user may hand us: say what the file is and what to do instead
    if (size >= 4 && memcmp(data, "GGUF", 4) == 0) {
        return fail(err, "%s is a GGUF file (llama.cpp's format): run it with llama.cpp, or give this "
                         "engine a .bin from `python export.py model.bin --checkpoint=CKPT`", name);
    }
    if (size >= 9 && data[8] == '{' && read_i32(data + 4) == 0 && read_i32(data) > 0) {
        return fail(err, "%s is a safetensors file (Hugging Face): convert its transformers directory "
                         "with `python export.py model.bin --hf=DIR`, or run it with transformers", name);
    }
    if (magic != CHECKPOINT_MAGIC) {
        // legacy files have no magic: the header is the 7 config ints
        if (size < HEADER_V0) {
            return fail(err, "%s: file size %zu is too small for a checkpoint header", name, size);
        }
        int32_t v[7];
        for (int i = 0; i < 7; i++) v[i] = read_i32(data + 4 * i);
        *p = (Config){v[0], v[1], v[2], v[3], v[4], v[5], v[6]};
        c->version = 0;
        c->group_size = 0;
        c->shared_classifier = p->vocab_size > 0; // negative vocab_size: own classifier
        if (p->vocab_size < 0 && p->vocab_size != INT32_MIN) p->vocab_size = -p->vocab_size;
        return check_config(p, name, "no \"ak42\" magic, and as a legacy (version 0) header", err);
    }
    if (size < HEADER_V1) {
        return fail(err, "%s: file size %zu is too small for a checkpoint header", name, size);
    }
    c->version = read_i32(data + 4);
    if (c->version != 1 && c->version != 2) {
        return fail(err, "%s: unsupported version %d (this engine reads 0, 1 and 2)", name,
                    c->version);
    }
    int32_t v[7];
    for (int i = 0; i < 7; i++) v[i] = read_i32(data + 8 + 4 * i);
    *p = (Config){v[0], v[1], v[2], v[3], v[4], v[5], v[6]};
    if (check_config(p, name, "header", err) != 0) return -1;
    unsigned char shared = data[36];
    if (shared > 1) return fail(err, "%s: shared_classifier flag is %d, not 0 or 1", name, shared);
    c->shared_classifier = shared;
    size_t end = 37;
    c->group_size = 0;
    if (c->version == 2) {
        int gs = read_i32(data + 37);
        end += 4;
        if (gs < 1 || gs > p->dim || p->dim % gs != 0 || p->hidden_dim % gs != 0) {
            return fail(err, "%s: group_size %d does not divide dim %d and hidden_dim %d", name,
                        gs, p->dim, p->hidden_dim);
        }
        if (p->dim % 4 != 0) {
            // every int8 tensor is a multiple of dim bytes: this keeps the scales aligned
            return fail(err, "%s: Q8_0 needs dim to be a multiple of 4 (dim %d)", name, p->dim);
        }
        c->group_size = gs;
    }
    for (size_t i = end; i < HEADER_V1; i++) {
        if (data[i] != 0) return fail(err, "%s: header padding byte %zu is not zero", name, i);
    }
    return 0;
}

// ----------------------------------------------------------------------------
// weights

// Hands out consecutive pieces of the file. With base == NULL it only counts bytes: the same
// walk then gives both the expected file size and the pointers, so the two cannot disagree.
typedef struct {
    const unsigned char *base;
    uint64_t offset;
} Cursor;

static const void *take(Cursor *cur, uint64_t bytes) {
    const void *p = cur->base ? cur->base + cur->offset : NULL;
    cur->offset += bytes;
    return p;
}

static const float *take_f32(Cursor *cur, uint64_t n) {
    return take(cur, n * sizeof(float));
}

static void take_matrix(Cursor *cur, Matrix *m, uint64_t rows, uint64_t cols, int group_size) {
    if (group_size == 0) {
        *m = (Matrix){.f = take_f32(cur, rows * cols)};
    } else {
        m->f = NULL;
        m->q = take(cur, rows * cols);
        m->s = take_f32(cur, rows * cols / group_size);
    }
}

static void map_weights(Checkpoint *c, Cursor *cur) {
    const Config *p = &c->config;
    const uint64_t dim = p->dim, hidden_dim = p->hidden_dim, vocab_size = p->vocab_size;
    const uint64_t kv_dim = dim * p->n_kv_heads / p->n_heads;
    const uint64_t head_size = dim / p->n_heads;
    const int gs = c->group_size, n_layers = p->n_layers;
    Layer *L = c->layers;
    if (c->version == 0) {
        take_matrix(cur, &c->tok_embeddings, vocab_size, dim, 0);
        for (int l = 0; l < n_layers; l++) L[l].rms_att = take_f32(cur, dim);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].wq, dim, dim, 0);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].wk, kv_dim, dim, 0);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].wv, kv_dim, dim, 0);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].wo, dim, dim, 0);
        for (int l = 0; l < n_layers; l++) L[l].rms_ffn = take_f32(cur, dim);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].w1, hidden_dim, dim, 0);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].w2, dim, hidden_dim, 0);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].w3, hidden_dim, dim, 0);
        c->rms_final = take_f32(cur, dim);
        take_f32(cur, p->seq_len * head_size); // freq_cis_real and _imag: unused, RoPE is computed
    } else {
        // v1 and v2: the fp32 norms first, then the matrices (Q8_0 in v2)
        for (int l = 0; l < n_layers; l++) L[l].rms_att = take_f32(cur, dim);
        for (int l = 0; l < n_layers; l++) L[l].rms_ffn = take_f32(cur, dim);
        c->rms_final = take_f32(cur, dim);
        take_matrix(cur, &c->tok_embeddings, vocab_size, dim, gs);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].wq, dim, dim, gs);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].wk, kv_dim, dim, gs);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].wv, kv_dim, dim, gs);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].wo, dim, dim, gs);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].w1, hidden_dim, dim, gs);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].w2, dim, hidden_dim, gs);
        for (int l = 0; l < n_layers; l++) take_matrix(cur, &L[l].w3, hidden_dim, dim, gs);
    }
    if (c->shared_classifier) {
        c->wcls = c->tok_embeddings;
    } else {
        take_matrix(cur, &c->wcls, vocab_size, dim, gs);
    }
}

// ----------------------------------------------------------------------------
// API

int checkpoint_parse(Checkpoint *c, const void *data, size_t size, const char *name, char *err) {
    memset(c, 0, sizeof(*c));
    if (parse_header(c, data, size, name, err) != 0) return -1;
    c->layers = calloc(c->config.n_layers, sizeof(Layer));
    if (!c->layers) return fail(err, "%s: out of memory", name);
    uint64_t header = c->version == 0 ? HEADER_V0 : HEADER_V1;
    Cursor cur = {NULL, header};
    map_weights(c, &cur);
    if (cur.offset != size) {
        fail(err, "%s: file size %zu does not match header (expected %llu)", name, size,
             (unsigned long long)cur.offset);
        checkpoint_close(c);
        return -1;
    }
    cur = (Cursor){data, header};
    map_weights(c, &cur);
    return 0;
}

int checkpoint_open(Checkpoint *c, const char *path, char *err) {
    memset(c, 0, sizeof(*c));
    size_t size = 0;
    int fd = open_regular_file(path, &size, err);
    if (fd < 0) return -1;
    void *map = NULL;
    if (size > 0) { // mmap refuses empty files; parse then reports the size
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(fd);
            return fail(err, "%s: mmap failed (%s)", path, strerror(e));
        }
    }
    close(fd); // the mapping stays valid
    if (checkpoint_parse(c, map, size, path, err) != 0) {
        if (map) munmap(map, size);
        return -1;
    }
    c->map = map;
    c->map_size = size;
    return 0;
}

void checkpoint_close(Checkpoint *c) {
    free(c->layers);
    if (c->map) munmap(c->map, c->map_size);
    memset(c, 0, sizeof(*c));
}
