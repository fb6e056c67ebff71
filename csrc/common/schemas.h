// The op schemas, declared once for the C++ backends: csrc/ops.cpp defines them in
// TORCH_LIBRARY(metaembed, m), and the CUDA emulator's test-only library
// (csrc/cuda/ops_cuda.cpp) under its own namespace. The Python-defined backends (reference,
// triton) register the same strings from metaembed_kernels/_schemas.py, and
// tests/test_schemas.py checks the two tables are identical.
//
// Backward ops take output_mask (like ATen's convolution_backward): a gradient whose flag is
// false is not computed and is returned as an empty tensor of shape (0,).
#pragma once
#include <torch/library.h>

namespace metaembed {

inline void define_ops(torch::Library& m) {
  // (scores, argmax): scores[g, a, b] = sum_{i < group_rq[g], q valid} max_{j < group_rc[g], c valid}
  // <q[a,i], c[b,j]>; argmax: the maximising tokens when save_argmax and the backend saves them
  // (cpu), (Nq, Nc, max r_q, distinct r_c) int16 (int32 from r_c = 2^15), for a backward that
  // then recomputes nothing; else (0,).
  m.def(
      "maxsim_grouped(Tensor q, Tensor c, int[] group_rq, int[] group_rc, Tensor? q_mask, Tensor? c_mask,"
      " bool save_argmax=False) -> (Tensor, Tensor)");
  m.def(
      "maxsim_grouped_backward(Tensor grad, Tensor q, Tensor c, int[] group_rq, int[] group_rc,"
      " Tensor? q_mask, Tensor? c_mask, bool[2] output_mask, Tensor? argmax=None) -> (Tensor, Tensor)");
  // scores[g, a, n] = the same, for query a against its own candidates c[a, n] (B, N, Rc, D)
  m.def(
      "maxsim_paired_grouped(Tensor q, Tensor c, int[] group_rq, int[] group_rc, Tensor? q_mask,"
      " Tensor? c_mask, bool save_argmax=False) -> (Tensor, Tensor)");
  m.def(
      "maxsim_paired_grouped_backward(Tensor grad, Tensor q, Tensor c, int[] group_rq, int[] group_rc,"
      " Tensor? q_mask, Tensor? c_mask, bool[2] output_mask, Tensor? argmax=None) -> (Tensor, Tensor)");
  // (terms, lse, query_gradient): terms, lse (G, Nq), terms[g, a] = lse[g, a] - logit_g(a, labels[a]),
  // logits_g[a] = scale * concat(s_g(a, c[:]), s_g(a, hard_negatives[a, :])); query_gradient:
  // d terms_g(a) / d q[a] as (Nq, sum_g r_q(g), D) when asked for and fused (cpu), else (0,).
  m.def(
      "matryoshka_infonce(Tensor q, Tensor c, Tensor hard_negatives, Tensor labels, int[] group_rq,"
      " int[] group_rc, float scale, Tensor? q_mask, Tensor? c_mask, Tensor? hard_negatives_mask,"
      " bool query_gradient=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "matryoshka_infonce_backward(Tensor grad, Tensor lse, Tensor q, Tensor c, Tensor hard_negatives,"
      " Tensor labels, int[] group_rq, int[] group_rc, float scale, Tensor? q_mask, Tensor? c_mask,"
      " Tensor? hard_negatives_mask, bool[3] output_mask, Tensor? query_gradient=None)"
      " -> (Tensor, Tensor, Tensor)");
}

}  // namespace metaembed
