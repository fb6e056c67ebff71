// Schemas of the index ops (metaembed_kernels/index), defined in csrc/ops.cpp's
// TORCH_LIBRARY block through define_index_ops. The CPU kernels are in csrc/cpu/index_*.
#pragma once
#include <torch/library.h>

namespace metaembed {

inline void define_index_ops(torch::Library& m) {
  // Exact top-k over the rows of every segment. A segment's rows are stored as prefix slabs
  // (storage.py): data / scales / masks hold, segment by segment, the first S slabs
  // (S = len(data) / len(segment_rows)); bounds are the index's slab bounds. For group g and
  // query a, the k best rows by (score desc, id asc) among those allowed (allowed: one bool
  // per row and segment, or an empty list for all rows):
  //   scores (G, Nq, k) float32, ids (G, Nq, k) int64, rows (G, Nq, k) int64 global rows
  // (segments concatenated), with score -inf, id -1, row -1 past the allowed rows.
  m.def(
      "index_search(Tensor q, Tensor? q_mask, Tensor[] data, Tensor[] scales, Tensor[] masks, Tensor[] ids,"
      " Tensor[] allowed, int[] segment_rows, int[] bounds, int[] group_rq, int[] group_rc, int k)"
      " -> (Tensor, Tensor, Tensor)");
  // scores (G, Nq, K): s_g(q[a], row rows[a, x]) for global rows (-1 -> -inf).
  m.def(
      "index_score_rows(Tensor q, Tensor? q_mask, Tensor[] data, Tensor[] scales, Tensor[] masks,"
      " int[] segment_rows, int[] bounds, int[] group_rq, int[] group_rc, Tensor rows) -> Tensor");
}

}  // namespace metaembed
