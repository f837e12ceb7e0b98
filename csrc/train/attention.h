// Causal self-attention for training at small head sizes, called from model.py through cffi:
// PyTorch keeps the autograd graph, these do the arithmetic. All tensors are contiguous fp32,
// (BH, T, D) for q, k, v, out and their gradients, (BH, T) for lse; one KV head per query head
// (model.py repeats them for grouped-query attention). bounds (n_seqs + 1 row offsets from 0 to T),
// or NULL for one sequence: the sequences packed along T (an RL minibatch without its padding), each
// causal within itself and blind to the others, but for the one it continues: parents[s] (NULL: all
// -1) is the index of an earlier sequence, itself continuing none, that comes before s's own rows
// (a prompt shared by a group of responses, packed once), or -1. n_threads: PyTorch's count, as its
// OpenMP runtime is not ours. Return 0, or -1 when out of memory.
#ifndef ATTENTION_H
#define ATTENTION_H

// out = softmax(q k^T / sqrt(D), causal) v, and lse = the log-sum-exp of each score row
int attention_forward(const float *q, const float *k, const float *v, float *out, float *lse, int BH, int T, int D,
                      const int *bounds, const int *parents, int n_seqs, int n_threads);

// dq, dk, dv from dout and the forward pass's out and lse
int attention_backward(const float *q, const float *k, const float *v, const float *out, const float *lse,
                       const float *dout, float *dq, float *dk, float *dv, int BH, int T, int D, const int *bounds,
                       const int *parents, int n_seqs, int n_threads);

#endif
