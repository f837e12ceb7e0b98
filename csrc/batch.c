// Batched generation and scoring on top of transformer_forward_rows. See batch.h.
#include "batch.h"
#include "error.h"
#include "kernels.h" // PANEL_COLS
#include "sampler.h"

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif
#include <stdlib.h>
#include <string.h>

// A forward's rows: token, position and KV cache slot (the sequence's index in the batch) of each
typedef struct {
    int *tokens, *pos, *slots; // (max_rows,)
    int n;
} Chunk;

static int alloc_chunk(Chunk *c, int max_rows) {
    c->tokens = malloc(max_rows * sizeof(int));
    c->pos = malloc(max_rows * sizeof(int));
    c->slots = malloc(max_rows * sizeof(int));
    c->n = 0;
    return c->tokens && c->pos && c->slots ? 0 : -1;
}

static void free_chunk(Chunk *c) {
    free(c->tokens);
    free(c->pos);
    free(c->slots);
}

// Fills c with the next rows, in order, of positions at[b] to end[b] - 1 of each sequence b (ids
// seq[b]), at most max_rows, and moves at past them. Returns the number of rows: 0 once all are done.
static int next_chunk(Chunk *c, const int *const *seq, int *at, const int *end, int n_seqs, int max_rows) {
    c->n = 0;
    for (int b = 0; b < n_seqs && c->n < max_rows; b++) {
        for (; at[b] < end[b] && c->n < max_rows; at[b]++, c->n++) {
            c->tokens[c->n] = seq[b][at[b]];
            c->pos[c->n] = at[b];
            c->slots[c->n] = b;
        }
    }
    return c->n;
}

// the forward of a chunk; NULL only if the chunk breaks transformer_forward_rows' rules, which the
// callers' checks rule out
static float *forward_chunk(Transformer *t, const Chunk *c, int logits, char *err) {
    float *out = transformer_forward_rows(t, c->tokens, c->pos, c->slots, c->n, logits);
    if (!out) fail(err, "internal error: transformer_forward_rows refused a chunk of %d rows", c->n);
    return out;
}

// whether sequence b's first end[b] ids are those of the sequence before it (a group's prompt)
static int repeats(const int *const *seq, const int *end, int b) {
    return b > 0 && end[b] > 0 && end[b] == end[b - 1] && memcmp(seq[b], seq[b - 1], end[b] * sizeof(int)) == 0;
}

// Fills the caches of slots b < n_seqs with positions 0..end[b]-1 of sequence b (ids seq[b]), chunk by
// chunk, and leaves at[b] = end[b]. A sequence that repeats the one before it takes a copy of that
// one's cache rather than running its ids again: the same rows, as a row's results do not depend on
// the rows beside it.
static int fill_caches(Transformer *t, const int *const *seq, const int *end, int n_seqs, int *at, Chunk *c,
                       char *err) {
    for (int b = 0; b < n_seqs; b++) at[b] = repeats(seq, end, b) ? end[b] : 0;
    while (next_chunk(c, seq, at, end, n_seqs, t->state.max_rows) > 0) {
        if (!forward_chunk(t, c, 0, err)) return -1;
    }
    for (int b = 1, from = 0; b < n_seqs; b++) {
        if (repeats(seq, end, b)) {
            transformer_copy_cache(t, from, b, end[b]);
        } else {
            from = b;
        }
    }
    return 0;
}

static int check_batch(const Transformer *t, int n_seqs, char *err) {
    if (n_seqs < 1 || n_seqs > t->state.n_slots) {
        return fail(err, "batch of %d sequences is out of range [1, %d] (the run state's slots: "
                    "transformer_reserve)", n_seqs, t->state.n_slots);
    }
    return 0;
}

// ----------------------------------------------------------------------------
// generation

static int check_generate(const Transformer *t, const int *const *prompt, const int *prompt_lens,
                          int n_seqs, int max_new_tokens, float temperature,
                          const unsigned long long *seeds, const int *stop_tokens, int n_stop, char *err) {
    const Config *p = &t->ckpt.config;
    if (check_batch(t, n_seqs, err) != 0) return -1;
    if (max_new_tokens < 1) return fail(err, "max_new_tokens %d is not positive", max_new_tokens);
    if (!(temperature >= 0.0f) || isinf(temperature)) { // (NaN fails the first)
        return fail(err, "temperature %g is not a finite number >= 0", temperature);
    }
    if (n_stop < 0) return fail(err, "n_stop %d is negative", n_stop);
    for (int i = 0; i < n_stop; i++) {
        if (stop_tokens[i] < 0 || stop_tokens[i] >= p->vocab_size) {
            return fail(err, "stop token %d is out of range [0, %d)", stop_tokens[i], p->vocab_size);
        }
    }
    for (int b = 0; b < n_seqs; b++) {
        char why[ERR_LEN];
        if (transformer_check_prompt(t, prompt[b], prompt_lens[b], why) != 0) {
            return fail(err, "prompt %d: %s", b, why);
        }
        if (prompt_lens[b] >= p->seq_len) {
            return fail(err, "prompt %d: %d tokens leave no room in the context (seq_len %d)", b,
                        prompt_lens[b], p->seq_len);
        }
        if (seeds[b] == 0) return fail(err, "seed of sequence %d is 0 (xorshift needs a nonzero state)", b);
    }
    return 0;
}

// Sequences decoded together when the caller leaves it to the engine. Each step reads the weights
// once for the group, and every sequence's KV cache so far. Where the caches of all n_seqs would not
// fit in CACHE_BUDGET beside the weights (the default model's 64 rollouts: 50 MB of caches at full
// length), groups one after the other that fit keep theirs in the last-level cache, at the price of
// reading the weights once a step for each group: only for weights under half the budget, which
// stay there too. The default model's 64 rollouts of 226 tokens ran 18% faster in groups of 16
// than all together on a 32 MB L3 (reports/rl_speed.md). A group of at least PANEL_COLS rows a thread
// is a whole number of them: a thread's rows go through the fp32 products PANEL_COLS at a time, and
// a call for the one or two left over costs nearly a whole one (64 rollouts on 2 threads: groups of
// 12, 6-9% faster than of 13).
#define CACHE_BUDGET (16.0 * 1024 * 1024) // bytes: half the L3 of the desktop and server CPUs we measured
static int auto_group(const Transformer *t, int n_seqs) {
    const Config *p = &t->ckpt.config;
    const double kv_dim = (double)p->dim * p->n_kv_heads / p->n_heads;
    const double params = (double)p->n_layers * p->dim * (2.0 * p->dim + 2.0 * kv_dim + 3.0 * p->hidden_dim) +
                          (double)p->vocab_size * p->dim;
    const double weights = params * (t->ckpt.group_size ? 1.0 + 4.0 / t->ckpt.group_size : 4.0);
    const double kv = 2.0 * p->n_layers * kv_dim * p->seq_len * (t->state.kv_type == KV_F16 ? 2 : 4); // a sequence's
    if (weights > CACHE_BUDGET / 2.0 || n_seqs * kv + weights <= CACHE_BUDGET) return n_seqs;
    const int fit = (int)((CACHE_BUDGET - weights) / kv) > 1 ? (int)((CACHE_BUDGET - weights) / kv) : 1;
    const int groups = (n_seqs + fit - 1) / fit, size = (n_seqs + groups - 1) / groups; // about equal sizes
    const int whole = PANEL_COLS * omp_get_max_threads();
    return size >= whole ? size / whole * whole : size;
}

// Generation of sequences b = 0..n_seqs-1 in KV cache slots b; the arrays as transformer_generate_batch's,
// checked, and scratch of its own (at, active, rng: n_seqs each; probs: a vocabulary a thread; c)
static int generate_group(Transformer *t, const int *const *prompt, const int *prompt_lens, int n_seqs,
                          int max_new_tokens, float temperature, const unsigned long long *seeds,
                          const int *stop_tokens, int n_stop, int *out_tokens, float *out_logprobs,
                          float *out_hidden, int *out_lens, int *at, int *end, int *active,
                          unsigned long long *rng, float *probs, Chunk *c, char *err) {
    const int vocab_size = t->ckpt.config.vocab_size, dim = t->ckpt.config.dim;
    // the prompts but their last tokens fill the caches
    for (int b = 0; b < n_seqs; b++) {
        end[b] = prompt_lens[b] - 1;
        rng[b] = seeds[b];
        out_lens[b] = 0;
        active[b] = b;
    }
    if (fill_caches(t, prompt, end, n_seqs, at, c, err) != 0) return -1;
    // then each step runs every active sequence's last token (at position at[b]) and samples its next
    int n_active = n_seqs;
    for (int b = 0; b < n_seqs; b++) c->tokens[b] = prompt[b][prompt_lens[b] - 1];
    while (n_active > 0) {
        for (int i = 0; i < n_active; i++) c->pos[i] = at[active[i]], c->slots[i] = active[i];
        c->n = n_active;
        const float *logits = forward_chunk(t, c, 1, err);
        if (!logits) return -1;
#pragma omp parallel for schedule(static) if (n_active > 1)
        for (int i = 0; i < n_active; i++) {
            const int b = active[i];
            const size_t o = (size_t)b * max_new_tokens + out_lens[b];
            out_tokens[o] = sample_logprob(logits + (size_t)i * vocab_size, vocab_size, temperature, &rng[b],
                                           probs + (size_t)omp_get_thread_num() * vocab_size, &out_logprobs[o]);
            if (out_hidden) memcpy(out_hidden + o * dim, t->state.hidden + (size_t)i * dim, dim * sizeof(float));
            out_lens[b]++;
        }
        // the sequences that go on keep their order, with their new token at the next position
        int kept = 0;
        for (int i = 0; i < n_active; i++) {
            const int b = active[i], token = out_tokens[(size_t)b * max_new_tokens + out_lens[b] - 1];
            int stop = out_lens[b] == max_new_tokens || prompt_lens[b] + out_lens[b] == t->ckpt.config.seq_len;
            for (int k = 0; k < n_stop; k++) stop |= token == stop_tokens[k];
            if (!stop) {
                at[b]++;
                c->tokens[kept] = token;
                active[kept++] = b;
            }
        }
        n_active = kept;
    }
    return 0;
}

int transformer_generate_batch(Transformer *t, const int *prompts, const int *prompt_lens, int n_seqs,
                               int max_new_tokens, float temperature, const unsigned long long *seeds,
                               const int *stop_tokens, int n_stop, int group, int *out_tokens,
                               float *out_logprobs, float *out_hidden, int *out_lens, char *err) {
    const int n_threads = omp_get_max_threads();
    if (n_seqs < 1) return check_batch(t, n_seqs, err); // before the allocations below take n_seqs
    if (group < 0) return fail(err, "group %d is negative", group);
    group = group == 0 ? auto_group(t, n_seqs) : group < n_seqs ? group : n_seqs;
    const int **prompt = malloc(n_seqs * sizeof(int *));
    int *at = malloc(group * sizeof(int)), *end = malloc(group * sizeof(int));
    int *active = malloc(group * sizeof(int));
    unsigned long long *rng = malloc(group * sizeof(unsigned long long));
    float *probs = malloc((size_t)n_threads * t->ckpt.config.vocab_size * sizeof(float));
    Chunk c;
    int ok = alloc_chunk(&c, t->state.max_rows) == 0 && prompt && at && end && active && rng && probs;
    int rc = ok ? 0 : fail(err, "out of memory");
    for (size_t b = 0, offset = 0; ok && b < (size_t)n_seqs; offset += prompt_lens[b], b++) {
        prompt[b] = prompts + offset;
    }
    if (ok) {
        rc = check_generate(t, prompt, prompt_lens, n_seqs, max_new_tokens, temperature, seeds, stop_tokens,
                            n_stop, err);
    }
    // each group in slots 0..group-1, as if it were the whole batch
    for (int b0 = 0; rc == 0 && b0 < n_seqs; b0 += group) {
        const int n = n_seqs - b0 < group ? n_seqs - b0 : group;
        const size_t o = (size_t)b0 * max_new_tokens;
        rc = generate_group(t, prompt + b0, prompt_lens + b0, n, max_new_tokens, temperature, seeds + b0,
                            stop_tokens, n_stop, out_tokens + o, out_logprobs + o,
                            out_hidden ? out_hidden + o * t->ckpt.config.dim : NULL, out_lens + b0, at, end,
                            active, rng, probs, &c, err);
    }
    free_chunk(&c);
    free(prompt), free(at), free(end), free(active), free(rng), free(probs);
    return rc;
}

// ----------------------------------------------------------------------------
// scoring

static int check_score(const Transformer *t, const int *const *seq, int n_seqs, int max_len,
                       const int *lens, const int *starts, float temperature, char *err) {
    const Config *p = &t->ckpt.config;
    if (check_batch(t, n_seqs, err) != 0) return -1;
    if (!(temperature > 0.0f) || isinf(temperature)) {
        return fail(err, "temperature %g is not a finite number > 0", temperature);
    }
    const int longest = max_len < p->seq_len ? max_len : p->seq_len;
    for (int b = 0; b < n_seqs; b++) {
        if (lens[b] < 1 || lens[b] > longest) {
            return fail(err, "sequence %d: length %d is out of range [1, %d] (tokens' width %d, seq_len %d)", b,
                        lens[b], longest, max_len, p->seq_len);
        }
        if (starts[b] < 1 || starts[b] > lens[b]) {
            return fail(err, "sequence %d: start %d is out of range [1, %d] (the first token has no "
                        "prediction)", b, starts[b], lens[b]);
        }
        for (int i = 0; i < lens[b]; i++) {
            if (seq[b][i] < 0 || seq[b][i] >= p->vocab_size) {
                return fail(err, "sequence %d: token %d at position %d is out of range [0, %d)", b, seq[b][i],
                            i, p->vocab_size);
            }
        }
    }
    return 0;
}

int transformer_score_batch(Transformer *t, const int *tokens, int n_seqs, int max_len, const int *lens,
                            const int *starts, float temperature, float *out_logprobs, float *out_hidden,
                            char *err) {
    const int vocab_size = t->ckpt.config.vocab_size, dim = t->ckpt.config.dim, n_threads = omp_get_max_threads();
    if (n_seqs < 1 || max_len < 1) {
        return n_seqs < 1 ? check_batch(t, n_seqs, err) : fail(err, "tokens' width %d is not positive", max_len);
    }
    const int **seq = malloc(n_seqs * sizeof(int *));
    int *at = malloc(n_seqs * sizeof(int)), *end = malloc(n_seqs * sizeof(int));
    float *probs = malloc((size_t)n_threads * vocab_size * sizeof(float));
    Chunk c;
    int ok = alloc_chunk(&c, t->state.max_rows) == 0 && seq && at && end && probs;
    int rc = ok ? 0 : fail(err, "out of memory");
    for (int b = 0; ok && b < n_seqs; b++) seq[b] = tokens + (size_t)b * max_len;
    if (ok) rc = check_score(t, seq, n_seqs, max_len, lens, starts, temperature, err);
    if (rc == 0) {
        memset(out_logprobs, 0, (size_t)n_seqs * max_len * sizeof(float));
        if (out_hidden) memset(out_hidden, 0, (size_t)n_seqs * max_len * dim * sizeof(float));
    }
    // the positions before the first one that predicts a scored token only fill the caches; then
    // each position from starts[b] - 1 on predicts the token after it
    for (int b = 0; rc == 0 && b < n_seqs; b++) end[b] = starts[b] < lens[b] ? starts[b] - 1 : 0;
    if (rc == 0) rc = fill_caches(t, seq, end, n_seqs, at, &c, err);
    for (int b = 0; rc == 0 && b < n_seqs; b++) at[b] = starts[b] - 1, end[b] = lens[b] - 1;
    while (rc == 0 && next_chunk(&c, seq, at, end, n_seqs, t->state.max_rows) > 0) {
        const float *logits = forward_chunk(t, &c, 1, err);
        if (!logits) {
            rc = -1;
            break;
        }
#pragma omp parallel for schedule(static) if (c.n > 1)
        for (int i = 0; i < c.n; i++) {
            const size_t o = (size_t)c.slots[i] * max_len + c.pos[i] + 1; // the token row i predicts
            out_logprobs[o] = token_logprob(logits + (size_t)i * vocab_size, vocab_size, temperature, tokens[o],
                                            probs + (size_t)omp_get_thread_num() * vocab_size);
            if (out_hidden) memcpy(out_hidden + o * dim, t->state.hidden + (size_t)i * dim, dim * sizeof(float));
        }
    }
    free_chunk(&c);
    free(seq), free(at), free(end), free(probs);
    return rc;
}
