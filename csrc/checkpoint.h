// Checkpoint: a model file mapped read-only, its header validated, and pointers to every
// weight. Reads llama2.c's three layouts (export.py's legacy_export, version1_export,
// version2_export):
//   v0: 7 int32 header, fp32 weights, freq_cis tables; vocab_size < 0 = own classifier
//   v1: 256-byte header (magic "ak42", version 1, 7 int32, shared flag), fp32 weights
//   v2: as v1 plus int32 group_size; fp32 norms, then Q8_0 tensors (int8 values, fp32 scales)
#ifndef CHECKPOINT_H
#define CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#define CHECKPOINT_MAGIC 0x616b3432 // "ak42"

typedef struct {
    int dim;        // transformer dimension
    int hidden_dim; // for ffn layers
    int n_layers;   // number of layers
    int n_heads;    // number of query heads
    int n_kv_heads; // number of key/value heads (fewer than n_heads with GQA)
    int vocab_size; // vocabulary size
    int seq_len;    // max sequence length
} Config;

// A (rows, cols) row-major weight matrix: fp32 values, or Q8_0 values with one scale per
// group_size consecutive values of a row (rows never share a group: cols % group_size == 0).
typedef struct {
    const float *f;  // (rows, cols) fp32, or NULL when quantised
    const int8_t *q; // (rows, cols) Q8_0 values
    const float *s;  // (rows, cols / group_size) Q8_0 scales
    const void *panels; // repacked for batched products (transformer_pack, matmul.h), or NULL
} Matrix;

typedef struct {
    const float *rms_att; // (dim,)
    const float *rms_ffn; // (dim,)
    Matrix wq;            // (dim, dim)
    Matrix wk;            // (kv_dim, dim)
    Matrix wv;            // (kv_dim, dim)
    Matrix wo;            // (dim, dim)
    Matrix w1;            // (hidden_dim, dim)
    Matrix w2;            // (dim, hidden_dim)
    Matrix w3;            // (hidden_dim, dim)
} Layer;

typedef struct {
    Config config;
    int version;              // 0, 1 or 2
    int group_size;           // Q8_0 group size, 0 for fp32 files
    int shared_classifier;    // wcls is tok_embeddings
    Matrix tok_embeddings;    // (vocab_size, dim)
    Layer *layers;            // (n_layers,)
    const float *rms_final;   // (dim,)
    Matrix wcls;              // (vocab_size, dim)
    void *map;                // the file's mapping, NULL when parsed from a caller's buffer
    size_t map_size;
} Checkpoint;

// Maps `path` and parses it; on failure returns -1 with a one-line message in err[ERR_LEN].
int checkpoint_open(Checkpoint *c, const char *path, char *err);
// Validates the `size` bytes at `data` and points the weights into them (no copy); `name`
// prefixes error messages. Succeeds only if size is exactly what the header implies.
int checkpoint_parse(Checkpoint *c, const void *data, size_t size, const char *name, char *err);
void checkpoint_close(Checkpoint *c);

#endif
