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
#endif
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------
// run state

static void free_run_state(RunState *s) {
    void *buffers[] = {s->xb, s->xb2, s->hb, s->hb2, s->q, s->k, s->v, s->att, s->logits,
                       s->rope, s->key_cache, s->value_cache};
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]);
    for (int i = 0; s->threads && i < s->n_threads; i++) {
        free(s->threads[i].x);
        free(s->threads[i].xb);
        free(s->threads[i].xq.q);
        free(s->threads[i].xq.s);
    }
    free(s->threads);
    memset(s, 0, sizeof(*s));
}

// bytes of an element of a KV cache of `type`
static size_t kv_size(KVType type) { return type == KV_F16 ? sizeof(uint16_t) : sizeof(float); }

static int malloc_run_state(RunState *s, const Config *p, int group_size, KVType kv_type) {
    const size_t kv_dim = (size_t)p->dim * p->n_kv_heads / p->n_heads;
    const size_t cache = (size_t)p->n_layers * p->seq_len * kv_dim;
    const size_t max_n = p->dim > p->hidden_dim ? p->dim : p->hidden_dim;
    memset(s, 0, sizeof(*s));
    s->xb = calloc(p->dim, sizeof(float));
    s->xb2 = calloc(p->dim, sizeof(float));
    s->hb = calloc(p->hidden_dim, sizeof(float));
    s->hb2 = calloc(p->hidden_dim, sizeof(float));
    s->q = calloc(p->dim, sizeof(float));
    s->k = calloc(kv_dim, sizeof(float));
    s->v = calloc(kv_dim, sizeof(float));
    s->att = calloc((size_t)p->n_heads * p->seq_len, sizeof(float));
    s->logits = calloc(p->vocab_size, sizeof(float));
    s->rope = calloc(p->dim / p->n_heads, sizeof(float));
    s->kv_type = kv_type;
    s->key_cache = calloc(cache, kv_size(kv_type));
    s->value_cache = calloc(cache, kv_size(kv_type));
    s->n_threads = omp_get_max_threads();
    s->threads = calloc(s->n_threads, sizeof(ThreadState));
    int ok = s->xb && s->xb2 && s->hb && s->hb2 && s->q && s->k && s->v && s->att && s->logits &&
             s->rope && s->key_cache && s->value_cache && s->threads;
    for (int i = 0; ok && i < s->n_threads; i++) {
        ThreadState *ts = &s->threads[i];
        ts->x = calloc(p->dim, sizeof(float));
        ts->xb = calloc(max_n, sizeof(float));
        ok = ts->x && ts->xb;
        if (group_size > 0) {
            ts->xq.q = calloc(max_n, sizeof(int8_t));
            ts->xq.s = calloc(max_n / group_size, sizeof(float));
            ok = ok && ts->xq.q && ts->xq.s;
        }
    }
    if (!ok) free_run_state(s);
    return ok ? 0 : -1;
}

int transformer_init(Transformer *t, const char *name, KVType kv_type, char *err) {
    const Config *p = &t->ckpt.config;
    if (kv_type != KV_F32 && kv_type != KV_F16) return fail(err, "unknown KV cache type %d", (int)kv_type);
    if (malloc_run_state(&t->state, p, t->ckpt.group_size, kv_type) != 0) {
        double mb = 2.0 * p->n_layers * p->seq_len * p->dim * p->n_kv_heads / p->n_heads *
                    kv_size(kv_type) / 1e6;
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
}

void transformer_reset(Transformer *t) {
    const Config *p = &t->ckpt.config;
    size_t cache = (size_t)p->n_layers * p->seq_len * (p->dim * p->n_kv_heads / p->n_heads);
    memset(t->state.key_cache, 0, cache * kv_size(t->state.kv_type));
    memset(t->state.value_cache, 0, cache * kv_size(t->state.kv_type));
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

// x (n,) into a row of a cache of `type`
static void cache_store(char *row, const float *x, int n, KVType type) {
    if (type == KV_F16) {
        f32_to_f16((uint16_t *)row, x, n);
    } else {
        memcpy(row, x, n * sizeof(float));
    }
}

// Attention of query head h of s->q over positions 0..pos of layer l; writes the head's output to
// its part of s->xb. Positions before pos come from the cache, pos itself from s->k and s->v
// (fp32 whatever the cache's type), which the first query head of each kv head then stores in the
// cache: the other heads read only earlier positions there, so no thread waits for that write.
static void attention_head(RunState *s, const Config *p, int l, int pos, int h) {
    const int head_size = p->dim / p->n_heads;
    const int kv_mul = p->n_heads / p->n_kv_heads; // query heads per kv head (GQA)
    const int kv_head = h / kv_mul;
    const float scale = 1.0f / sqrtf(head_size);
    const KVType type = s->kv_type;
    const size_t cache_offset = ((size_t)l * p->n_kv_heads + kv_head) * p->seq_len * head_size;
    char *k = (char *)s->key_cache + cache_offset * kv_size(type);
    char *v = (char *)s->value_cache + cache_offset * kv_size(type);
    const float *k_pos = s->k + kv_head * head_size, *v_pos = s->v + kv_head * head_size;
    const float *q = s->q + h * head_size;
    float *att = s->att + (size_t)h * p->seq_len;
    dot_rows(att, q, k, pos, head_size, type);
    dot_rows(att + pos, q, k_pos, 1, head_size, KV_F32);
    for (int t = 0; t <= pos; t++) att[t] *= scale;
    softmax(att, pos + 1);
    float *xb = s->xb + h * head_size;
    memset(xb, 0, head_size * sizeof(float));
    add_weighted_rows(xb, att, v, pos, head_size, type);
    add_weighted_rows(xb, att + pos, v_pos, 1, head_size, KV_F32);
    if (h % kv_mul == 0) {
        const size_t row = (size_t)pos * head_size * kv_size(type);
        cache_store(k + row, k_pos, head_size, type);
        cache_store(v + row, v_pos, head_size, type);
    }
}

// The residual connection, then the next matmul's input: x += delta; xb = rmsnorm(x), and xq
// its quantised form for Q8_0 weights
static void residual_norm(ThreadState *ts, const float *delta, const float *weight, int dim,
                          int group_size) {
    for (int i = 0; i < dim; i++) ts->x[i] += delta[i];
    rmsnorm(ts->xb, ts->x, weight, dim);
    if (group_size) quantize_q8(&ts->xq, ts->xb, dim, group_size);
}

// ----------------------------------------------------------------------------
// forward
//
// One OpenMP parallel region for the whole token: the threads share out the rows of each matmul
// (matmul.c's `omp for nowait`) and the attention heads, and meet at a barrier before whatever
// reads the results: five barriers a layer. The small steps between matmuls (residual, RMSNorm,
// SwiGLU, quantising) run on every thread, each into its own ThreadState, rather than on one
// thread while the others wait at two more barriers; RoPE runs inside the q and k matmuls. A
// region per matmul, as before, cost a fork and a join each, about 30 a token, and kept the
// threads off models below 15M; with barriers instead, threads pay at every size.

float *transformer_forward(Transformer *t, int token, int pos) {
    const Config *p = &t->ckpt.config;
    if (token < 0 || token >= p->vocab_size || pos < 0 || pos >= p->seq_len) return NULL;
    const Checkpoint *w = &t->ckpt;
    RunState *s = &t->state;
    const int dim = p->dim, hidden_dim = p->hidden_dim, gs = w->group_size;
    const int head_size = dim / p->n_heads;
    const int kv_dim = dim * p->n_kv_heads / p->n_heads;
    rope_table(s->rope, pos, head_size);

    // (no more threads than the state has room for; fewer if the caller has asked for fewer since)
#pragma omp parallel num_threads(omp_get_max_threads() < s->n_threads ? omp_get_max_threads() : s->n_threads)
    {
        ThreadState *ts = &s->threads[omp_get_thread_num()];
        embed(ts->x, &w->tok_embeddings, token, dim, gs);
        rmsnorm(ts->xb, ts->x, w->layers[0].rms_att, dim);
        if (gs) quantize_q8(&ts->xq, ts->xb, dim, gs);
        for (int l = 0; l < p->n_layers; l++) {
            const Layer *L = &w->layers[l];

            // attention
            matmul_rope(s->q, &L->wq, ts->xb, &ts->xq, dim, dim, gs, s->rope, head_size);
            matmul_rope(s->k, &L->wk, ts->xb, &ts->xq, dim, kv_dim, gs, s->rope, head_size);
            matmul(s->v, &L->wv, ts->xb, &ts->xq, dim, kv_dim, gs);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int h = 0; h < p->n_heads; h++) attention_head(s, p, l, pos, h);
            if (gs) quantize_q8(&ts->xq, s->xb, dim, gs);
            matmul(s->xb2, &L->wo, s->xb, &ts->xq, dim, dim, gs);
#pragma omp barrier
            residual_norm(ts, s->xb2, L->rms_ffn, dim, gs);

            // ffn: w2(silu(w1(x)) * w3(x))
            matmul(s->hb, &L->w1, ts->xb, &ts->xq, dim, hidden_dim, gs);
            matmul(s->hb2, &L->w3, ts->xb, &ts->xq, dim, hidden_dim, gs);
#pragma omp barrier
            swiglu(ts->xb, s->hb, s->hb2, hidden_dim);
            if (gs) quantize_q8(&ts->xq, ts->xb, hidden_dim, gs);
            matmul(s->xb2, &L->w2, ts->xb, &ts->xq, hidden_dim, dim, gs);
#pragma omp barrier
            // the next layer's input, or the classifier's
            residual_norm(ts, s->xb2, l + 1 < p->n_layers ? w->layers[l + 1].rms_att : w->rms_final,
                          dim, gs);
        }
        matmul(s->logits, &w->wcls, ts->xb, &ts->xq, dim, p->vocab_size, gs);
    } // the region's end waits for every thread's rows of the logits
    return s->logits;
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
