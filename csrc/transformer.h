// The Llama 2 transformer forward pass, one token at a time with a KV cache, and llama2.c's
// generation loop on top of it.
#ifndef TRANSFORMER_H
#define TRANSFORMER_H

#include "checkpoint.h"
#include "matmul.h"
#include "sampler.h"

// The activations of a forward's rows between matmuls. The small steps there (residual, RMSNorm,
// SwiGLU, quantising) run either on every thread at once, each into its own copy, so that a thread
// goes on to the next matmul without waiting for another to do them (few rows: the threads share
// out each matmul's rows of W); or each on the thread that owns the row (many rows: the threads
// share out the rows). (The copies agree because every thread runs the same code on the same inputs
// under the same floating-point settings.)
typedef struct {
    float *x;   // (rows, dim) the residual stream
    float *xb;  // (rows, dim) x normalised: the next matmul's input
    float *xh;  // (rows, hidden_dim) the gated ffn: w2's input
    QVector xq; // (rows, dim) xb or the attention heads' output quantised, for Q8_0 weights
    QVector xqh; // (rows, hidden_dim) xh quantised
} RowState;

typedef struct {
    int n_slots;          // sequences with a KV cache of their own
    int max_rows;         // rows a forward takes at once
    RowState *threads;    // (n_threads,) each thread's copy, for forwards of few rows a thread (SHARE_ROWS)
    int n_threads;        // OpenMP's thread count when the state was made: the most a forward uses
    RowState shared;      // (max_rows,) the copy of forwards whose threads share out the rows
    float *att;           // (n_threads, seq_len) each thread's scores of the attention head it is on
    float *xb;            // (max_rows, dim) the attention heads' output
    float *xb2;           // (max_rows, dim) the output of wo and of w2
    float *hb;            // (max_rows, hidden_dim) ffn hidden activation
    float *hb2;           // (max_rows, hidden_dim)
    float *q;             // (max_rows, dim) query
    float *k;             // (n_layers, max_rows, kv_dim) keys of this forward's rows, on their way to the cache
    float *v;             // (n_layers, max_rows, kv_dim) values, the same
    float *logits;        // (max_rows, vocab_size) output
    const float *hidden;  // (rows, dim) where the last forward left its rows' final normalised states
    int *first;           // (max_rows,) the first row of a row's sequence in the forward
    float *rope;          // (seq_len, head_size) cos, sin of each rotated pair at each position
    KVType kv_type;       // the caches' element type: float, or fp16 as uint16_t (matmul.h)
    void *key_cache;      // (n_slots, n_layers, n_kv_heads, seq_len, head_size): a head's keys in one run
    void *value_cache;    // (n_slots, n_layers, n_kv_heads, seq_len, head_size)
} RunState;

typedef struct {
    Checkpoint ckpt; // config and weights
    RunState state;  // every buffer the forward pass needs: nothing is allocated per token
    void *panels;    // the matrices packed for batched products (transformer_pack), or NULL
} Transformer;

// Opens a checkpoint and allocates the run state for one sequence, with a KV cache of kv_type; -1
// with a message in err[ERR_LEN] on failure.
int transformer_open(Transformer *t, const char *path, KVType kv_type, char *err);
// Allocates the run state for one sequence for t->ckpt, already opened or parsed (checkpoint.h).
int transformer_init(Transformer *t, const char *name, KVType kv_type, char *err);
// Makes the run state hold at least n_slots sequences' KV caches and take max_rows rows a forward
// (at least n_slots); keeps it if it does already. With more than one row, packs the weights
// (transformer_pack) if they are not yet. -1 with a message, and the state unchanged, if out of
// memory.
int transformer_reserve(Transformer *t, int n_slots, int max_rows, char *err);
// Packs the matrices into panels (matmul.h) for batched forwards, which then compute every row, a
// single token's too, on them: about twice the speed of the rows kernels' products at 64 rows (fp32;
// Q8_0 on AVX-512 VNNI, where it packs), for a copy of the matrices in memory. (For a large Q8_0
// model read from DRAM, batches of under about 8 rows run slower on them than on the rows kernels,
// which ./run keeps: it never packs.) Call again after changing the weights in place. -1 with a
// message if out of memory.
int transformer_pack(Transformer *t, char *err);
void transformer_close(Transformer *t);
// Copies positions 0..n_pos-1 of the KV caches of slot `from` to slot `to` (a prompt shared by
// several sequences runs once).
void transformer_copy_cache(Transformer *t, int from, int to, int n_pos);
// Zeroes the KV caches. Not needed between sequences that restart at pos 0 (each position
// overwrites its cache row before reading it); for callers that want a clean slate.
void transformer_reset(Transformer *t);
// Runs `token` at position `pos` of the sequence in slot 0 (the cache must hold positions
// 0..pos-1) and returns the logits (vocab_size,), valid until the next call; NULL if token or pos
// is out of range.
float *transformer_forward(Transformer *t, int token, int pos);
// Runs n rows at once: row i is token tokens[i] at position pos[i] of the sequence in KV cache slot
// slots[i]. A sequence's rows follow each other at consecutive positions, and its cache holds the
// positions before its first row. Returns the logits (n, vocab_size) if `logits`, else computes
// none (the rows only fill the caches) and returns state.logits; the rows' final normalised states
// are at state.hidden (n, dim); both valid until the next call. NULL if an argument is out of range
// (n above max_rows, a token, a position or a slot) or a sequence's rows do not follow each other.
float *transformer_forward_rows(Transformer *t, const int *tokens, const int *pos, const int *slots,
                                int n, int logits);

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
