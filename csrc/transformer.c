// The transformer forward pass and the generation loop. See transformer.h.
#include "transformer.h"
#include "error.h"
#include "ops.h"

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#else // make run and runfast: one thread
static int omp_get_max_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------
// run state

// Rows a thread from which the threads of a forward share out its rows rather than each matmul's
// rows of W (see the forward below): from there W-sharing's small steps, which every thread runs for
// every row (SwiGLU's exponentials too), cost more than reading all of W on each thread, and rows
// need no barriers. Measured on a shared, busy 2-core Zen 4: at B = 8, row-sharing took a third of
// W-sharing's time; at B = 64 the two were within the machine's noise. `make lib CC="cc
// -DSHARE_ROWS=1000"` keeps W-sharing, to measure again.
#ifndef SHARE_ROWS
#define SHARE_ROWS 2
#endif

static void free_rows(RowState *r) {
    void *buffers[] = {r->x, r->xb, r->xh, r->xq.q, r->xq.s, r->xqh.q, r->xqh.s};
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]);
}

static void free_run_state(RunState *s) {
    void *buffers[] = {s->att, s->xb, s->xb2, s->hb, s->hb2, s->q, s->k, s->v, s->logits, s->first,
                       s->rope, s->key_cache, s->value_cache};
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]);
    for (int i = 0; s->threads && i < s->n_threads; i++) free_rows(&s->threads[i]);
    free(s->threads);
    free_rows(&s->shared);
    memset(s, 0, sizeof(*s));
}

// the element where the cache of (slot, layer l, kv head h) starts: seq_len rows of head_size each
static size_t cache_at(const Config *p, int slot, int l, int h) {
    return (((size_t)slot * p->n_layers + l) * p->n_kv_heads + h) * p->seq_len * (p->dim / p->n_heads);
}

static size_t cache_size(const Config *p, int n_slots) {
    return (size_t)n_slots * p->n_layers * p->seq_len * (p->dim / p->n_heads * p->n_kv_heads);
}

// (each width has a buffer of its own: with the threads sharing out the rows, one thread may write
// its rows of xh while another still reads its rows of xb)
static int malloc_rows(RowState *r, size_t rows, const Config *p, int group_size) {
    r->x = calloc(rows * p->dim, sizeof(float));
    r->xb = calloc(rows * p->dim, sizeof(float));
    r->xh = calloc(rows * p->hidden_dim, sizeof(float));
    if (group_size > 0) {
        r->xq = (QVector){calloc(rows * p->dim, 1), calloc(rows * p->dim / group_size, sizeof(float))};
        r->xqh = (QVector){calloc(rows * p->hidden_dim, 1), calloc(rows * p->hidden_dim / group_size, sizeof(float))};
        if (!r->xq.q || !r->xq.s || !r->xqh.q || !r->xqh.s) return -1;
    }
    return r->x && r->xb && r->xh ? 0 : -1;
}

static int malloc_run_state(RunState *s, const Config *p, int group_size, KVType kv_type,
                            int n_slots, int max_rows) {
    const size_t kv_dim = (size_t)p->dim * p->n_kv_heads / p->n_heads, head_size = p->dim / p->n_heads;
    const size_t rows = max_rows;
    memset(s, 0, sizeof(*s));
    s->n_slots = n_slots;
    s->max_rows = max_rows;
    s->n_threads = omp_get_max_threads();
    s->att = calloc((size_t)s->n_threads * p->seq_len, sizeof(float));
    s->xb = calloc(rows * p->dim, sizeof(float));
    s->xb2 = calloc(rows * p->dim, sizeof(float));
    s->hb = calloc(rows * p->hidden_dim, sizeof(float));
    s->hb2 = calloc(rows * p->hidden_dim, sizeof(float));
    s->q = calloc(rows * p->dim, sizeof(float));
    s->k = calloc(p->n_layers * rows * kv_dim, sizeof(float));
    s->v = calloc(p->n_layers * rows * kv_dim, sizeof(float));
    s->logits = calloc(rows * p->vocab_size, sizeof(float));
    s->first = calloc(rows, sizeof(int));
    s->rope = calloc((size_t)p->seq_len * head_size, sizeof(float));
    s->kv_type = kv_type;
    s->key_cache = calloc(cache_size(p, n_slots), kv_size(kv_type));
    s->value_cache = calloc(cache_size(p, n_slots), kv_size(kv_type));
    s->threads = calloc(s->n_threads, sizeof(RowState));
    int ok = s->att && s->xb && s->xb2 && s->hb && s->hb2 && s->q && s->k && s->v && s->logits &&
             s->first && s->rope && s->key_cache && s->value_cache && s->threads &&
             malloc_rows(&s->shared, rows, p, group_size) == 0;
    // a thread's own copy serves forwards of fewer than SHARE_ROWS rows a thread
    const size_t few = (size_t)SHARE_ROWS * s->n_threads - 1, own = rows < few ? rows : few;
    for (int i = 0; ok && i < s->n_threads; i++) ok = malloc_rows(&s->threads[i], own, p, group_size) == 0;
    if (!ok) {
        free_run_state(s);
        return -1;
    }
    for (int pos = 0; pos < p->seq_len; pos++) rope_table(s->rope + pos * head_size, pos, head_size);
    return 0;
}

// every fp32 matrix of the forward (the classifier too, shared or not) with its shape (d, n)
static void matrices(Checkpoint *c, Matrix **m, int *n, int *d) {
    const Config *p = &c->config;
    const int kv_dim = p->dim * p->n_kv_heads / p->n_heads;
    int k = 0;
    for (int l = 0; l < p->n_layers; l++) {
        Layer *L = &c->layers[l];
        Matrix *list[7] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w1, &L->w2, &L->w3};
        const int rows[7] = {p->dim, kv_dim, kv_dim, p->dim, p->hidden_dim, p->dim, p->hidden_dim};
        for (int i = 0; i < 7; i++, k++) {
            m[k] = list[i], d[k] = rows[i], n[k] = i == 5 ? p->hidden_dim : p->dim;
        }
    }
    m[k] = &c->wcls, d[k] = p->vocab_size, n[k] = p->dim;
}

int transformer_pack(Transformer *t, char *err) {
    const int gs = t->ckpt.group_size, count = 7 * t->ckpt.config.n_layers + 1;
    Matrix **m = malloc(count * sizeof(Matrix *));
    int *n = malloc(count * sizeof(int)), *d = malloc(count * sizeof(int));
    if (!m || !n || !d) {
        free(m), free(n), free(d);
        return fail(err, "out of memory");
    }
    matrices(&t->ckpt, m, n, d);
    size_t size = 0;
    for (int i = 0; i < count; i++) size += panels_size(n[i], d[i], gs);
    if (size > 0 && !t->panels) t->panels = malloc(size);
    if (size > 0 && !t->panels) {
        free(m), free(n), free(d);
        return fail(err, "out of memory for the packed weights (%.0f MB)", size / 1e6);
    }
    char *at = t->panels;
    for (int i = 0; size > 0 && i < count; i++) { // (size 0: this build packs no such weights)
        pack_panels(at, m[i], n[i], d[i], gs);
        m[i]->panels = at;
        at += panels_size(n[i], d[i], gs);
    }
    free(m), free(n), free(d);
    return 0;
}

int transformer_reserve(Transformer *t, int n_slots, int max_rows, char *err) {
    const Config *p = &t->ckpt.config;
    RunState *s = &t->state;
    if (n_slots < 1 || max_rows < n_slots) {
        return fail(err, "need at least one slot and as many rows (got %d slots, %d rows)", n_slots, max_rows);
    }
    if (s->n_slots >= n_slots && s->max_rows >= max_rows) return 0;
    if (s->n_slots > n_slots) n_slots = s->n_slots; // never shrink what a caller had
    if (s->max_rows > max_rows) max_rows = s->max_rows;
    RunState bigger;
    if (malloc_run_state(&bigger, p, t->ckpt.group_size, s->kv_type, n_slots, max_rows) != 0) {
        double mb = 2.0 * cache_size(p, n_slots) * kv_size(s->kv_type) / 1e6;
        return fail(err, "out of memory for %d sequences' run state (KV caches %.0f MB)", n_slots, mb);
    }
    free_run_state(s);
    *s = bigger;
    return max_rows > 1 && !t->panels ? transformer_pack(t, err) : 0;
}

int transformer_init(Transformer *t, const char *name, KVType kv_type, char *err) {
    const Config *p = &t->ckpt.config;
    if (kv_type != KV_F32 && kv_type != KV_F16) return fail(err, "unknown KV cache type %d", (int)kv_type);
    if (malloc_run_state(&t->state, p, t->ckpt.group_size, kv_type, 1, 1) != 0) {
        double mb = 2.0 * cache_size(p, 1) * kv_size(kv_type) / 1e6;
        return fail(err, "%s: out of memory for the run state (KV cache %.0f MB)", name, mb);
    }
    return 0;
}

int transformer_open(Transformer *t, const char *path, KVType kv_type, char *err) {
    memset(t, 0, sizeof(*t));
    if (checkpoint_open(&t->ckpt, path, err) != 0) return -1;
    if (transformer_init(t, path, kv_type, err) != 0) {
        checkpoint_close(&t->ckpt);
        return -1;
    }
    return 0;
}

void transformer_close(Transformer *t) {
    free_run_state(&t->state);
    checkpoint_close(&t->ckpt);
    free(t->panels);
    t->panels = NULL;
}

void transformer_copy_cache(Transformer *t, int from, int to, int n_pos) {
    const Config *p = &t->ckpt.config;
    const size_t unit = kv_size(t->state.kv_type), bytes = (size_t)n_pos * (p->dim / p->n_heads) * unit;
    for (int l = 0; l < p->n_layers; l++) {
        for (int h = 0; h < p->n_kv_heads; h++) {
            const size_t src = cache_at(p, from, l, h) * unit, dst = cache_at(p, to, l, h) * unit;
            memcpy((char *)t->state.key_cache + dst, (char *)t->state.key_cache + src, bytes);
            memcpy((char *)t->state.value_cache + dst, (char *)t->state.value_cache + src, bytes);
        }
    }
}

void transformer_reset(Transformer *t) {
    const size_t cache = cache_size(&t->ckpt.config, t->state.n_slots) * kv_size(t->state.kv_type);
    memset(t->state.key_cache, 0, cache);
    memset(t->state.value_cache, 0, cache);
}

// ----------------------------------------------------------------------------
// the blocks of the forward pass

static void embed(float *x, const Matrix *table, int token, int dim, int group_size) {
    if (table->f) {
        memcpy(x, table->f + (size_t)token * dim, dim * sizeof(float));
        return;
    }
    const int8_t *q = table->q + (size_t)token * dim;
    const float *s = table->s + (size_t)token * (dim / group_size);
    for (int i = 0; i < dim; i++) x[i] = q[i] * s[i / group_size];
}

// rows i.. of a batch of quantised rows of n values (none for fp32 weights)
static QVector q8_rows(const QVector *xq, int i, int n, int group_size) {
    if (!group_size) return (QVector){NULL, NULL};
    return (QVector){xq->q + (size_t)i * n, xq->s + (size_t)i * (n / group_size)};
}

// rows [r0, r1) of x (rows, n) quantised into xq, for Q8_0 weights
static void quantize_rows(QVector *xq, const float *x, int r0, int r1, int n, int group_size) {
    for (int i = r0; group_size && i < r1; i++) {
        QVector row = q8_rows(xq, i, n, group_size);
        quantize_q8(&row, x + (size_t)i * n, n, group_size);
    }
}

// x (n,) into a row of a cache of `type`
static void cache_store(char *row, const float *x, int n, KVType type) {
    if (type == KV_F16) {
        f32_to_f16((uint16_t *)row, x, n);
    } else {
        memcpy(row, x, n * sizeof(float));
    }
}

// Attention of query head h of row i (position pos of the sequence in `slot`) over positions
// 0..pos of layer l; writes the head's output to its part of row i of s->xb. The positions before
// this forward's first row of the sequence (p0) come from the cache, those from p0 on from the
// forward's own keys and values (fp32 whatever the cache's type), which the first query head of each
// kv head then stores in the cache: no head reads a position of the cache that this forward writes,
// so no thread waits for that write.
static void attention_head(RunState *s, const Config *p, int l, int i, int pos, int slot, int h,
                           float *att) {
    const int head_size = p->dim / p->n_heads;
    const int kv_dim = p->dim * p->n_kv_heads / p->n_heads;
    const int kv_mul = p->n_heads / p->n_kv_heads; // query heads per kv head (GQA)
    const int kv_head = h / kv_mul;
    const float scale = 1.0f / sqrtf(head_size);
    const KVType type = s->kv_type;
    const size_t cache_offset = cache_at(p, slot, l, kv_head);
    char *k = (char *)s->key_cache + cache_offset * kv_size(type);
    char *v = (char *)s->value_cache + cache_offset * kv_size(type);
    const int first = s->first[i], p0 = pos - (i - first);
    const size_t own = ((size_t)l * s->max_rows + first) * kv_dim + kv_head * head_size;
    const float *k_own = s->k + own, *v_own = s->v + own; // rows first..i: positions p0..pos
    const float *q = s->q + (size_t)i * p->dim + h * head_size;
    dot_rows(att, q, k, p0, head_size, head_size, type);
    dot_rows(att + p0, q, k_own, pos - p0 + 1, head_size, kv_dim, KV_F32);
    for (int t = 0; t <= pos; t++) att[t] *= scale;
    softmax(att, pos + 1);
    float *xb = s->xb + (size_t)i * p->dim + h * head_size;
    memset(xb, 0, head_size * sizeof(float));
    add_weighted_rows(xb, att, (Rows){v, p0, head_size, type}, (Rows){v_own, pos - p0 + 1, kv_dim, KV_F32}, head_size);
    if (h % kv_mul == 0) {
        const size_t row = (size_t)pos * head_size * kv_size(type), at = (size_t)(i - first) * kv_dim;
        cache_store(k + row, k_own + at, head_size, type);
        cache_store(v + row, v_own + at, head_size, type);
    }
}

// The residual connection, then the next matmul's input, for rows [r0, r1): x += delta;
// xb = rmsnorm(x), and xq its quantised form for Q8_0 weights
static void residual_norm(RowState *rs, int r0, int r1, const float *delta, const float *weight,
                          int dim, int group_size) {
    for (int i = r0; i < r1; i++) {
        float *x = rs->x + (size_t)i * dim;
        for (int j = 0; j < dim; j++) x[j] += delta[(size_t)i * dim + j];
        rmsnorm(rs->xb + (size_t)i * dim, x, weight, dim);
    }
    quantize_rows(&rs->xq, rs->xb, r0, r1, dim, group_size);
}

// 0 if the rows are in range and each sequence's rows follow each other at consecutive positions
static int check_rows(const RunState *s, const Config *p, const int *tokens, const int *pos,
                      const int *slots, int n) {
    if (n < 1 || n > s->max_rows) return -1;
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= p->vocab_size || pos[i] < 0 || pos[i] >= p->seq_len ||
            slots[i] < 0 || slots[i] >= s->n_slots) {
            return -1;
        }
        if (i > 0 && slots[i] == slots[i - 1]) {
            if (pos[i] != pos[i - 1] + 1) return -1;
            continue;
        }
        for (int j = 0; j < i; j++) {
            if (slots[j] == slots[i]) return -1; // a second run of the same sequence
        }
    }
    return 0;
}

// ----------------------------------------------------------------------------
// forward
//
// One OpenMP parallel region for the whole forward. With fewer than SHARE_ROWS rows a thread (a
// single token: ./run), the threads share out the rows of each matmul and the attention heads, and meet at
// a barrier before whatever reads the results: five barriers a layer. The small steps between
// matmuls (residual, RMSNorm, SwiGLU, quantising) run on every thread, each into its own RowState,
// rather than on one thread while the others wait at two more barriers; RoPE runs inside the q and k
// matmuls. A region per matmul, as before, cost a fork and a join each, about 30 a token, and kept
// the threads off models below 15M. With more rows (a batch), the threads share out the rows
// instead and each runs the whole forward on its own, reading all of W: no barrier at all, but for
// one a layer when a sequence has several rows (its later rows' attention reads the keys and values
// of its earlier ones, which may be another thread's). Either way each product is computed the
// same way (matmul.h), so a row's results do not depend on the rows beside it.

float *transformer_forward_rows(Transformer *t, const int *tokens, const int *pos, const int *slots,
                                int n, int logits) {
    const Config *p = &t->ckpt.config;
    RunState *s = &t->state;
    if (check_rows(s, p, tokens, pos, slots, n) != 0) return NULL;
    const Checkpoint *w = &t->ckpt;
    const int dim = p->dim, hidden_dim = p->hidden_dim, gs = w->group_size;
    const int head_size = dim / p->n_heads;
    const int kv_dim = dim * p->n_kv_heads / p->n_heads;
    int several = 0; // whether a sequence has several rows
    for (int i = 0; i < n; i++) {
        s->first[i] = i > 0 && slots[i] == slots[i - 1] ? s->first[i - 1] : i;
        several |= s->first[i] != i;
    }
    // (no more threads than the state has room for; fewer if the caller has asked for fewer since)
    const int n_threads = omp_get_max_threads() < s->n_threads ? omp_get_max_threads() : s->n_threads;
    const int share_rows = n >= SHARE_ROWS * n_threads;
    s->hidden = share_rows ? s->shared.xb : s->threads[0].xb;

#pragma omp parallel num_threads(n_threads)
    {
        const int id = omp_get_thread_num(), nt = omp_get_num_threads();
        // this thread's rows [r0, r1), its activations, and the team that shares out its matmuls
        int r0 = 0, r1 = n;
        RowState *rs = &s->threads[id];
        Team team = {id, nt};
        if (share_rows) {
            r0 = (int)((long long)n * id / nt), r1 = (int)((long long)n * (id + 1) / nt);
            rs = &s->shared;
            team = (Team){0, 1};
        }
        const int nr = r1 - r0;
        float *att = s->att + (size_t)id * p->seq_len;
        for (int i = r0; i < r1; i++) {
            float *x = rs->x + (size_t)i * dim;
            embed(x, &w->tok_embeddings, tokens[i], dim, gs);
            rmsnorm(rs->xb + (size_t)i * dim, x, w->layers[0].rms_att, dim);
        }
        quantize_rows(&rs->xq, rs->xb, r0, r1, dim, gs);
        const float *xb = rs->xb + (size_t)r0 * dim, *xh = rs->xh + (size_t)r0 * hidden_dim;
        const QVector xq = q8_rows(&rs->xq, r0, dim, gs), xqh = q8_rows(&rs->xqh, r0, hidden_dim, gs);
        for (int l = 0; l < p->n_layers; l++) {
            const Layer *L = &w->layers[l];
            float *k = s->k + ((size_t)l * s->max_rows + r0) * kv_dim;
            float *v = s->v + ((size_t)l * s->max_rows + r0) * kv_dim;

            // attention
            matmul_rope(team, s->q + (size_t)r0 * dim, &L->wq, xb, &xq, dim, dim, nr, gs, s->rope,
                        pos + r0, head_size);
            matmul_rope(team, k, &L->wk, xb, &xq, dim, kv_dim, nr, gs, s->rope, pos + r0, head_size);
            matmul(team, v, &L->wv, xb, &xq, dim, kv_dim, nr, gs);
            if (!share_rows || several) {
#pragma omp barrier
            }
            int h0, h1; // this thread's share of the (row, head) pairs
            h0 = (int)((long long)nr * p->n_heads * team.id / team.n);
            h1 = (int)((long long)nr * p->n_heads * (team.id + 1) / team.n);
            for (int ih = h0; ih < h1; ih++) {
                const int i = r0 + ih / p->n_heads;
                attention_head(s, p, l, i, pos[i], slots[i], ih % p->n_heads, att);
            }
            if (!share_rows) {
#pragma omp barrier
            }
            quantize_rows(&rs->xq, s->xb, r0, r1, dim, gs);
            matmul(team, s->xb2 + (size_t)r0 * dim, &L->wo, s->xb + (size_t)r0 * dim, &xq, dim, dim, nr, gs);
            if (!share_rows) {
#pragma omp barrier
            }
            residual_norm(rs, r0, r1, s->xb2, L->rms_ffn, dim, gs);

            // ffn: w2(silu(w1(x)) * w3(x))
            matmul(team, s->hb + (size_t)r0 * hidden_dim, &L->w1, xb, &xq, dim, hidden_dim, nr, gs);
            matmul(team, s->hb2 + (size_t)r0 * hidden_dim, &L->w3, xb, &xq, dim, hidden_dim, nr, gs);
            if (!share_rows) {
#pragma omp barrier
            }
            for (int i = r0; i < r1; i++) {
                const size_t at = (size_t)i * hidden_dim;
                swiglu(rs->xh + at, s->hb + at, s->hb2 + at, hidden_dim);
            }
            quantize_rows(&rs->xqh, rs->xh, r0, r1, hidden_dim, gs);
            matmul(team, s->xb2 + (size_t)r0 * dim, &L->w2, xh, &xqh, hidden_dim, dim, nr, gs);
            if (!share_rows) {
#pragma omp barrier
            }
            // the next layer's input, or the classifier's
            residual_norm(rs, r0, r1, s->xb2, l + 1 < p->n_layers ? w->layers[l + 1].rms_att : w->rms_final,
                          dim, gs);
        }
        if (logits) {
            matmul(team, s->logits + (size_t)r0 * p->vocab_size, &w->wcls, xb, &xq, dim,
                   p->vocab_size, nr, gs);
        }
    } // the region's end waits for every thread's rows of the logits
    return s->logits;
}

float *transformer_forward(Transformer *t, int token, int pos) {
    const int slot = 0;
    return transformer_forward_rows(t, &token, &pos, &slot, 1, 1);
}

// ----------------------------------------------------------------------------
// generation

int transformer_check_prompt(const Transformer *t, const int *prompt, int n_prompt, char *err) {
    const Config *p = &t->ckpt.config;
    if (n_prompt < 1) return fail(err, "empty prompt: need at least one token (BOS)");
    if (n_prompt > p->seq_len) {
        return fail(err, "prompt of %d tokens is longer than the context (seq_len %d)", n_prompt,
                    p->seq_len);
    }
    for (int i = 0; i < n_prompt; i++) {
        if (prompt[i] < 0 || prompt[i] >= p->vocab_size) {
            return fail(err, "prompt token %d at position %d is out of range [0, %d)", prompt[i],
                        i, p->vocab_size);
        }
    }
    return 0;
}

int transformer_generate(Transformer *t, Sampler *sampler, const int *prompt, int n_prompt,
                         int steps, int *out, TokenCallback on_token, void *ctx, char *err) {
    const Config *p = &t->ckpt.config;
    if (transformer_check_prompt(t, prompt, n_prompt, err) != 0) return -1;
    if (sampler->vocab_size != p->vocab_size) {
        return fail(err, "sampler vocab_size %d does not match the model's %d",
                    sampler->vocab_size, p->vocab_size);
    }
    if (steps <= 0 || steps > p->seq_len) steps = p->seq_len;
    int token = prompt[0];
    int n = 0;
    if (out) out[n] = token;
    n++;
    for (int pos = 0; pos < steps; pos++) {
        float *logits = transformer_forward(t, token, pos);
        // force the prompt, then sample
        int next = pos < n_prompt - 1 ? prompt[pos + 1] : sampler_sample(sampler, logits);
        if (next == 1) break; // BOS: the model starts a new story
        if (out) out[n] = next;
        n++;
        if (on_token) on_token(ctx, token, next);
        token = next;
    }
    return n;
}
