// llama2.c's sampler: greedy at temperature 0, else softmax(logits / temperature) and
// multinomial or top-p (nucleus) sampling, with a xorshift rng.
#ifndef SAMPLER_H
#define SAMPLER_H

typedef struct {
    float prob;
    int index;
} ProbIndex; // a candidate token of top-p sampling

typedef struct {
    int vocab_size;
    ProbIndex *probindex; // (vocab_size,) buffer for top-p sampling
    float temperature;
    float topp;
    unsigned long long rng_state;
} Sampler;

// temperature >= 0, topp in [0, 1] (0 or 1 turns top-p off), seed != 0 (a zero xorshift
// state stays zero); -1 with a message in err[ERR_LEN] otherwise.
int sampler_init(Sampler *s, int vocab_size, float temperature, float topp,
                 unsigned long long seed, char *err);
void sampler_free(Sampler *s);
// Samples a token id from logits (vocab_size,), which it overwrites with probabilities.
int sampler_sample(Sampler *s, float *logits);

// Batched generation's draw, llama2.c's without top-p, from logits (n,): at temperature 0 the first
// largest logit (NaN never wins), else inverse-CDF sampling of softmax(logits / temperature) with one
// coin from the xorshift state *rng. probs (n,) is scratch. Writes the token's log-probability under
// that distribution to *logprob, as token_logprob computes it (0 at temperature 0: all the mass is
// on the first maximum).
int sample_logprob(const float *logits, int n, float temperature, unsigned long long *rng,
                   float *probs, float *logprob);
// log softmax(logits / temperature)[token] for logits (n,), temperature > 0, as PyTorch computes it:
// z[token] - max(z) - log(sum(exp(z - max(z)))), z = logits / temperature; probs (n,) is scratch
float token_logprob(const float *logits, int n, float temperature, int token, float *probs);

#endif
