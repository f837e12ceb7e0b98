// The element-wise and normalising steps of the forward pass and the sampler, in one place.
#ifndef OPS_H
#define OPS_H

// o = weight * x / sqrt(mean(x^2) + 1e-5); o may be x
void rmsnorm(float *o, const float *x, const float *weight, int size);
// x = exp(x) / sum(exp(x)), in place: attention's softmax and the sampler's
void softmax(float *x, int size);
// cos and sin of each pair (i, i+1) of a head at position pos, into rope (head_size,): the same
// for every head and layer, so computed once per token
void rope_table(float *rope, int pos, int head_size);
// RoPE: rotates the pairs (i, i+1) of vec (n,) by the angles of rope_table, where vec holds the
// values first..first+n-1 (first even) of a vector of heads of head_size
void rope_rotate(float *vec, int first, int n, const float *rope, int head_size);
// SwiGLU's gate: out = silu(h) * h2 = h * sigmoid(h) * h2
void swiglu(float *out, const float *h, const float *h2, int size);

#endif
