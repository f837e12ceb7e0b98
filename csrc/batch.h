// Batched generation and scoring: many sequences through transformer_forward_rows at once, each
// with its own KV cache slot, position and stop, so that each step reads the weights once for all of
// them. The RL loop's rollouts (generate) and its policy and reference log-probabilities (score).
#ifndef BATCH_H
#define BATCH_H

#include "transformer.h"

// Samples up to max_new_tokens tokens after each of n_seqs prompts (1 <= n_seqs <= the run state's
// slots, transformer_reserve): prompt b is the prompt_lens[b] ids from prompts + the sum of the
// lengths before it. Sequence b draws from its own xorshift stream, seeded with seeds[b] (nonzero),
// at `temperature` (sampler.h's sample_logprob), so its tokens depend on its own seed and logits
// alone, not on the batch it is in. A sequence stops after emitting one of the n_stop stop_tokens
// (which its output includes), after max_new_tokens, or where the context ends (prompt + output =
// seq_len); it then leaves the batch. Writes sequence b's tokens and their log-probabilities under
// softmax(logits / temperature) to row b of out_tokens and out_logprobs (n_seqs, max_new_tokens), and
// their count to out_lens[b]; when out_hidden (n_seqs, max_new_tokens, dim) is not NULL, the final
// normalised hidden state each token was sampled from to out_hidden[b, i] (a value head's input for
// token i, as transformer_score_batch gives it), the rest untouched. group sequences are decoded
// together, one group after another (the results are the same whatever the grouping); 0 lets the
// engine choose: all of them, unless their KV caches would spill out of the last-level cache
// (batch.c). Returns 0, or -1 with a one-line message in err for an argument out of range (a prompt
// must leave room for a token in seq_len).
int transformer_generate_batch(Transformer *t, const int *prompts, const int *prompt_lens, int n_seqs,
                               int max_new_tokens, float temperature, const unsigned long long *seeds,
                               const int *stop_tokens, int n_stop, int group, int *out_tokens,
                               float *out_logprobs, float *out_hidden, int *out_lens, char *err);

// The log-probabilities of given tokens, all of a sequence's positions through the forward at once
// (prefill): sequence b is the lens[b] ids of row b of tokens (n_seqs, max_len), 1 <= n_seqs <= the
// slots. Writes log softmax(logits / temperature) of tokens[b, t] given tokens[b, :t], for t in
// [starts[b], lens[b]) (1 <= starts[b] <= lens[b]), to out_logprobs[b, t] (n_seqs, max_len), zero
// elsewhere; and, when out_hidden (n_seqs, max_len, dim) is not NULL, to out_hidden[b, t] the final
// normalised hidden state that predicts tokens[b, t] (position t - 1's, where a value head reads
// token t's value), zero elsewhere. Returns 0, or -1 with a one-line message in err.
int transformer_score_batch(Transformer *t, const int *tokens, int n_seqs, int max_len, const int *lens,
                            const int *starts, float temperature, float *out_logprobs, float *out_hidden,
                            char *err);

#endif
