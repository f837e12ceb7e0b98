// The Llama 2 transformer forward pass, one token at a time with a KV cache, and llama2.c's
// generation loop on top of it.
#ifndef TRANSFORMER_H
#define TRANSFORMER_H

#include "checkpoint.h"
#include "matmul.h"
#include "sampler.h"

// Each thread's own copy of the activation between matmuls: the small steps there (residual,
// RMSNorm, SwiGLU, quantising) run on every thread at once, so a thread goes on to the next matmul
// without waiting for another to do them. (The copies agree because every thread runs the same
// code on the same inputs under the same floating-point settings.)
typedef struct {
    float *x;   // (dim,) activation at the current position: the residual stream
    float *xb;  // (max(dim, hidden_dim),) the next matmul's input: x normalised, or the gated ffn
    QVector xq; // (max(dim, hidden_dim),) a matmul's input quantised, for Q8_0 weights
} ThreadState;

typedef struct {
    ThreadState *threads; // (n_threads,)
    int n_threads;        // OpenMP's thread count when the state was made: the most a forward uses
    float *xb;            // (dim,) the attention heads' output
    float *xb2;           // (dim,) the output of wo and of w2
    float *hb;            // (hidden_dim,) ffn hidden activation
    float *hb2;           // (hidden_dim,)
    float *q;             // (dim,) query
    float *k;             // (kv_dim,) key at the current position, on its way to the cache
    float *v;             // (kv_dim,) value, the same
    float *att;           // (n_heads, seq_len) attention scores
    float *logits;        // (vocab_size,) output
    float *rope;          // (head_size,) cos, sin of each rotated pair at the current position
    KVType kv_type;       // the caches' element type: float, or fp16 as uint16_t (matmul.h)
    void *key_cache;      // (n_layers, n_kv_heads, seq_len, head_size): a head's keys in one run
    void *value_cache;    // (n_layers, n_kv_heads, seq_len, head_size)
} RunState;

typedef struct {
    Checkpoint ckpt; // config and weights
    RunState state;  // every buffer the forward pass needs: nothing is allocated per token
} Transformer;

// Opens a checkpoint and allocates the run state, with a KV cache of kv_type; -1 with a message
// in err[ERR_LEN] on failure.
int transformer_open(Transformer *t, const char *path, KVType kv_type, char *err);
// Allocates the run state for t->ckpt, already opened or parsed (checkpoint.h).
int transformer_init(Transformer *t, const char *name, KVType kv_type, char *err);
void transformer_close(Transformer *t);
// Zeroes the KV cache. Not needed between sequences that restart at pos 0 (each position
// overwrites its cache row before reading it); for callers that want a clean slate.
void transformer_reset(Transformer *t);
// Runs `token` at position `pos` (the cache must hold positions 0..pos-1) and returns the
// logits (vocab_size,), valid until the next call; NULL if token or pos is out of range.
float *transformer_forward(Transformer *t, int token, int pos);

// 0 if prompt (n_prompt ids) can start a generation: at least one id, all in range, no longer
// than the context; else -1 with a message in err.
int transformer_check_prompt(const Transformer *t, const int *prompt, int n_prompt, char *err);

// Called with each generated token and the one before it (to decode the pair).
typedef void (*TokenCallback)(void *ctx, int prev, int token);

// llama2.c's generation loop: feeds the prompt, then samples, for `steps` positions (0, or
// more than seq_len, means seq_len) or until the model emits BOS (1). Writes the sequence,
// prompt first and without the final BOS, to out (room for seq_len + 1 ids, or NULL) and
// calls on_token (may be NULL) for every id after the first. Returns the sequence length, or
// -1 with a message in err if transformer_check_prompt refuses the prompt.
int transformer_generate(Transformer *t, Sampler *sampler, const int *prompt, int n_prompt,
                         int steps, int *out, TokenCallback on_token, void *ctx, char *err);

#endif
