// The transformer forward pass and the generation loop. See transformer.h.
#include "transformer.h"
#include "error.h"
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------
// run state

static void free_run_state(RunState *s) {
    float *buffers[] = {s->x, s->xb, s->xb2, s->hb, s->hb2, s->q, s->att, s->logits,
                        s->rope, s->key_cache, s->value_cache, s->xq.s};
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]);
    free(s->xq.q);
    memset(s, 0, sizeof(*s));
}

static int malloc_run_state(RunState *s, const Config *p, int group_size) {
    const size_t kv_dim = (size_t)p->dim * p->n_kv_heads / p->n_heads;
    const size_t cache = (size_t)p->n_layers * p->seq_len * kv_dim;
    const size_t max_n = p->dim > p->hidden_dim ? p->dim : p->hidden_dim;
    memset(s, 0, sizeof(*s));
    s->x = calloc(p->dim, sizeof(float));
    s->xb = calloc(p->dim, sizeof(float));
    s->xb2 = calloc(p->dim, sizeof(float));
    s->hb = calloc(p->hidden_dim, sizeof(float));
    s->hb2 = calloc(p->hidden_dim, sizeof(float));
    s->q = calloc(p->dim, sizeof(float));
    s->att = calloc((size_t)p->n_heads * p->seq_len, sizeof(float));
    s->logits = calloc(p->vocab_size, sizeof(float));
    s->rope = calloc(p->dim / p->n_heads, sizeof(float));
    s->key_cache = calloc(cache, sizeof(float));
    s->value_cache = calloc(cache, sizeof(float));
    int ok = s->x && s->xb && s->xb2 && s->hb && s->hb2 && s->q && s->att && s->logits &&
             s->rope && s->key_cache && s->value_cache;
    if (group_size > 0) {
        s->xq.q = calloc(max_n, sizeof(int8_t));
        s->xq.s = calloc(max_n / group_size, sizeof(float));
        ok = ok && s->xq.q && s->xq.s;
    }
    if (!ok) free_run_state(s);
    return ok ? 0 : -1;
}

int transformer_init(Transformer *t, const char *name, char *err) {
    const Config *p = &t->ckpt.config;
    if (malloc_run_state(&t->state, p, t->ckpt.group_size) != 0) {
        double mb = 2.0 * p->n_layers * p->seq_len * p->dim * p->n_kv_heads / p->n_heads * 4 / 1e6;
        return fail(err, "%s: out of memory for the run state (KV cache %.0f MB)", name, mb);
    }
    return 0;
}

int transformer_open(Transformer *t, const char *path, char *err) {
    memset(t, 0, sizeof(*t));
    if (checkpoint_open(&t->ckpt, path, err) != 0) return -1;
    if (transformer_init(t, path, err) != 0) {
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
    memset(t->state.key_cache, 0, cache * sizeof(float));
    memset(t->state.value_cache, 0, cache * sizeof(float));
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

// Attention of query head h of s->q over the cached keys and values of positions 0..pos of one
// layer; writes the head's output to its part of s->xb.
static void attention_head(RunState *s, const Config *p, size_t layer_offset, int pos, int h) {
    const int head_size = p->dim / p->n_heads;
    const int kv_dim = p->dim * p->n_kv_heads / p->n_heads;
    const int kv_mul = p->n_heads / p->n_kv_heads; // query heads per kv head (GQA)
    const float scale = 1.0f / sqrtf(head_size);
    const float *q = s->q + h * head_size;
    float *att = s->att + (size_t)h * p->seq_len;
    const float *k = s->key_cache + layer_offset + (h / kv_mul) * head_size;
    const float *v = s->value_cache + layer_offset + (h / kv_mul) * head_size;
    for (int t = 0; t <= pos; t++) {
        const float *kt = k + (size_t)t * kv_dim;
        float score = 0.0f;
        for (int i = 0; i < head_size; i++) score += q[i] * kt[i];
        att[t] = score * scale;
    }
    softmax(att, pos + 1);
    float *xb = s->xb + h * head_size;
    memset(xb, 0, head_size * sizeof(float));
    for (int t = 0; t <= pos; t++) {
        const float *vt = v + (size_t)t * kv_dim;
        const float a = att[t];
        for (int i = 0; i < head_size; i++) xb[i] += a * vt[i];
    }
}

static void residual(float *x, const float *delta, int size) {
    for (int i = 0; i < size; i++) x[i] += delta[i];
}

// ----------------------------------------------------------------------------
// forward
//
// One OpenMP parallel region for the whole token: the threads share out the rows of each matmul
// (matmul.c's `omp for nowait`) and the attention heads, and meet at a barrier before whatever
// reads the results; the small serial steps (norms, RoPE, quantising an activation) run on one
// thread (`omp single`, which ends in a barrier). A region per matmul, as before, cost a fork
// and a join each, about 30 a token, and kept the threads off models below 15M; with barriers
// instead, threads pay at every size (bench/run_speed.py).

float *transformer_forward(Transformer *t, int token, int pos) {
    const Config *p = &t->ckpt.config;
    if (token < 0 || token >= p->vocab_size || pos < 0 || pos >= p->seq_len) return NULL;
    const Checkpoint *w = &t->ckpt;
    RunState *s = &t->state;
    float *x = s->x;
    const int dim = p->dim, hidden_dim = p->hidden_dim, gs = w->group_size;
    const int head_size = dim / p->n_heads;
    const int kv_dim = dim * p->n_kv_heads / p->n_heads;
    QVector *xq = &s->xq; // used by Q8_0 matmuls only (gs > 0)

    embed(x, &w->tok_embeddings, token, dim, gs);
    rope_table(s->rope, pos, head_size);
    rmsnorm(s->xb, x, w->layers[0].rms_att, dim);
    if (gs) quantize_q8(xq, s->xb, dim, gs);

#pragma omp parallel
    {
        for (int l = 0; l < p->n_layers; l++) {
            const Layer *L = &w->layers[l];
            const size_t layer_offset = (size_t)l * p->seq_len * kv_dim;
            // this position's key and value are written straight into the cache
            float *k = s->key_cache + layer_offset + (size_t)pos * kv_dim;
            float *v = s->value_cache + layer_offset + (size_t)pos * kv_dim;

            // attention (s->xb holds the normalised x, and xq its quantised form)
            matmul(s->q, &L->wq, s->xb, xq, dim, dim, gs);
            matmul(k, &L->wk, s->xb, xq, dim, kv_dim, gs);
            matmul(v, &L->wv, s->xb, xq, dim, kv_dim, gs);
#pragma omp barrier
#pragma omp single
            {
                rope_rotate(s->q, dim, s->rope, head_size);
                rope_rotate(k, kv_dim, s->rope, head_size);
            }
#pragma omp for schedule(static)
            for (int h = 0; h < p->n_heads; h++) attention_head(s, p, layer_offset, pos, h);
#pragma omp single
            if (gs) quantize_q8(xq, s->xb, dim, gs);
            matmul(s->xb2, &L->wo, s->xb, xq, dim, dim, gs);
#pragma omp barrier
#pragma omp single
            {
                residual(x, s->xb2, dim);
                rmsnorm(s->xb, x, L->rms_ffn, dim);
                if (gs) quantize_q8(xq, s->xb, dim, gs);
            }

            // ffn: w2(silu(w1(x)) * w3(x))
            matmul(s->hb, &L->w1, s->xb, xq, dim, hidden_dim, gs);
            matmul(s->hb2, &L->w3, s->xb, xq, dim, hidden_dim, gs);
#pragma omp barrier
#pragma omp single
            {
                swiglu(s->hb, s->hb2, hidden_dim);
                if (gs) quantize_q8(xq, s->hb, hidden_dim, gs);
            }
            matmul(s->xb, &L->w2, s->hb, xq, hidden_dim, dim, gs);
#pragma omp barrier
#pragma omp single
            {
                residual(x, s->xb, dim);
                // the next layer's input, or the classifier's
                rmsnorm(s->xb, x, l + 1 < p->n_layers ? w->layers[l + 1].rms_att : w->rms_final, dim);
                if (gs) quantize_q8(xq, s->xb, dim, gs);
            }
        }
        matmul(s->logits, &w->wcls, s->xb, xq, dim, p->vocab_size, gs);
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
