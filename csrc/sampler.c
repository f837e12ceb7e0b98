// The sampler, as in llama2.c's run.c. See sampler.h.
#include "sampler.h"
#include "error.h"
#include "ops.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>

// The first index of the largest value (NaN never wins; 0 if nothing but NaN and -inf). The
// maximum of each block of 64 is a loop the compiler vectorises (-Ofast); only the first block
// holding the overall maximum is searched. A scan that compares each value with the best so far
// is a chain of dependent loads: at vocab 32000 it took 6% of a 15M model's token.
static int sample_argmax(const float *probabilities, int n) {
    enum { BLOCK = 64 };
    float best = -FLT_MAX;
    int best_block = 0;
    for (int b = 0; b < n; b += BLOCK) {
        const int end = b + BLOCK < n ? b + BLOCK : n;
        float m = -FLT_MAX;
        for (int i = b; i < end; i++) m = probabilities[i] > m ? probabilities[i] : m;
        if (m > best) {
            best = m;
            best_block = b;
        }
    }
    for (int i = best_block; i < n; i++) {
        if (probabilities[i] == best) return i;
    }
    return 0;
}

// coin in [0, 1), probabilities sum to 1
static int sample_mult(const float *probabilities, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += probabilities[i];
        if (coin < cdf) return i;
    }
    return n - 1; // in case of rounding errors
}

static int compare(const void *a, const void *b) {
    const ProbIndex *a_ = a, *b_ = b;
    return (a_->prob < b_->prob) - (a_->prob > b_->prob); // descending
}

// Samples from the smallest set of tokens whose cumulative probability exceeds topp.
static int sample_topp(const float *probabilities, int n, float topp, ProbIndex *probindex,
                       float coin) {
    // tokens below (1 - topp) / (n - 1) cannot be in the nucleus: skip them before sorting
    int n0 = 0;
    const float cutoff = (1.0f - topp) / (n - 1);
    for (int i = 0; i < n; i++) {
        if (probabilities[i] >= cutoff) probindex[n0++] = (ProbIndex){probabilities[i], i};
    }
    if (n0 == 0) return sample_argmax(probabilities, n); // only with NaN logits
    qsort(probindex, n0, sizeof(ProbIndex), compare);
    float cumulative_prob = 0.0f;
    int last_idx = n0 - 1; // in case of rounding errors consider all elements
    for (int i = 0; i < n0; i++) {
        cumulative_prob += probindex[i].prob;
        if (cumulative_prob > topp) {
            last_idx = i;
            break;
        }
    }
    float r = coin * cumulative_prob;
    float cdf = 0.0f;
    for (int i = 0; i <= last_idx; i++) {
        cdf += probindex[i].prob;
        if (r < cdf) return probindex[i].index;
    }
    return probindex[last_idx].index;
}

int sampler_init(Sampler *s, int vocab_size, float temperature, float topp,
                 unsigned long long seed, char *err) {
    *s = (Sampler){0};
    if (!(temperature >= 0.0f)) return fail(err, "temperature %g is not >= 0", temperature);
    if (!(topp >= 0.0f && topp <= 1.0f)) return fail(err, "top-p %g is not in [0, 1]", topp);
    if (seed == 0) return fail(err, "seed must not be 0");
    if (vocab_size < 1) return fail(err, "vocab_size %d is not positive", vocab_size);
    s->probindex = malloc(vocab_size * sizeof(ProbIndex));
    if (!s->probindex) return fail(err, "out of memory");
    s->vocab_size = vocab_size;
    s->temperature = temperature;
    s->topp = topp;
    s->rng_state = seed;
    return 0;
}

void sampler_free(Sampler *s) {
    free(s->probindex);
    *s = (Sampler){0};
}

static unsigned int random_u32(unsigned long long *state) {
    // xorshift rng: https://en.wikipedia.org/wiki/Xorshift#xorshift.2A
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (*state * 0x2545F4914F6CDD1Dull) >> 32;
}

static float random_f32(unsigned long long *state) { // in [0, 1)
    return (random_u32(state) >> 8) / 16777216.0f;
}

int sampler_sample(Sampler *s, float *logits) {
    if (s->temperature == 0.0f) return sample_argmax(logits, s->vocab_size);
    for (int q = 0; q < s->vocab_size; q++) logits[q] /= s->temperature;
    softmax(logits, s->vocab_size);
    float coin = random_f32(&s->rng_state);
    if (s->topp <= 0.0f || s->topp >= 1.0f) return sample_mult(logits, s->vocab_size, coin);
    return sample_topp(logits, s->vocab_size, s->topp, s->probindex, coin);
}

// ----------------------------------------------------------------------------
// batched generation and scoring

// The largest of z = logits / temperature, and the sum of exp(z - max), each term written to terms (n,)
static float tempered_sum(const float *logits, int n, float temperature, float *max, float *terms) {
    *max = max_of(logits, n) / temperature; // (the largest of logits / temperature: dividing keeps order)
    return exp_sum(terms, logits, n, temperature, *max);
}

float token_logprob(const float *logits, int n, float temperature, int token, float *probs) {
    float m, sum = tempered_sum(logits, n, temperature, &m, probs);
    return (logits[token] / temperature - m) - logf(sum);
}

int sample_logprob(const float *logits, int n, float temperature, unsigned long long *rng,
                   float *probs, float *logprob) {
    if (temperature == 0.0f) {
        *logprob = 0.0f;
        return sample_argmax(logits, n);
    }
    float m, sum = tempered_sum(logits, n, temperature, &m, probs);
    // the first token whose cumulative mass passes coin * sum; rounding can leave the coin past
    // the last, which then goes to the last token of nonzero probability
    const float target = random_f32(rng) * sum;
    float cdf = 0.0f;
    int token = 0;
    for (int i = 0; i < n; i++) {
        if (probs[i] > 0.0f) token = i;
        cdf += probs[i];
        if (target < cdf) break;
    }
    *logprob = (logits[token] / temperature - m) - logf(sum);
    return token;
}
