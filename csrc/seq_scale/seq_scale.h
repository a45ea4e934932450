// seq_scale: per-sequence scaling, y[r] = x[r] * vec[seq(r)] over the last dim n.
//
// Two layouts share one set of kernels:
//   dense  x [B, T, n]: row r = b * T + t belongs to sequence b = r / T;
//   packed x [N, n] with seq_index [N]: row r belongs to sequence seq_index[r].
// The per-element math and the row addressing live here as host/device inline functions so the CPU
// kernels (tested here) and the CUDA kernels (compiled here, run on a GPU) execute the same code.
#pragma once

#include "common/common.h"

namespace red_kernels {

// Forward element, in the accumulation type A.
template <typename A>
RK_HD A seq_scale_apply(A x, A v) {
  return x * v;
}

// Backward elements: grad_x = g * vec[seq]; grad_vec[seq] sums g * x over the sequence's rows.
template <typename A>
RK_HD A seq_scale_grad_x(A g, A v) {
  return g * v;
}
template <typename A>
RK_HD A seq_scale_grad_vec_term(A g, A x) {
  return g * x;
}

// Element offset of row r = b * t_len + t's first element, given the strides of b and t.
RK_HD int64_t seq_scale_row_offset(int64_t r, int64_t t_len, int64_t s_b, int64_t s_t) {
  return (r / t_len) * s_b + (r % t_len) * s_t;
}

// Sequence of row r: seq_index[r] when packed (validated on the host), else r / T.
RK_HD int64_t seq_scale_seq_of_row(int64_t r, int64_t t_len, const int64_t* seq_index) {
  return seq_index != nullptr ? seq_index[r] : r / t_len;
}

// Rows of a [B, T, n] tensor with unit stride in the last dim and any strides in the leading two
// (packed [N, n] is the case t_len = N, s_b = 0): kept strided instead of copying a
// non-contiguous x or grad_out.
template <typename T>
struct StridedRows {
  T* base;
  int64_t t_len, s_b, s_t;
  RK_HD T* row(int64_t r) const { return base + seq_scale_row_offset(r, t_len, s_b, s_t); }
};

// Rows per chunk of the deterministic per-sequence reduction: a function of the shapes only, so
// the partial sums (and the bits of grad_vec) do not depend on thread or SM counts.
RK_HD int64_t seq_scale_chunk_rows(int64_t rows, int64_t max_chunks, int64_t min_rows) {
  const int64_t by_count = ceil_div(rows, max_chunks > 0 ? max_chunks : 1);
  const int64_t c = by_count > min_rows ? by_count : min_rows;
  return c > 0 ? c : 1;
}

}  // namespace red_kernels

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace red_kernels {

// Row layout of x or grad_out: a pointer base plus the strides of the two leading dims.
struct SeqRows {
  at::Tensor t;  // unit stride in the last dim (copied only when it was not)
  int64_t t_len = 1, s_b = 0, s_t = 0;
};

// The kernels' read-only view of rows prepared by seq_scale_rows.
template <typename T>
StridedRows<const T> strided(const SeqRows& rows) {
  return {rows.t.const_data_ptr<T>(), rows.t_len, rows.s_b, rows.s_t};
}

// Work plan of the backward reduction. Rows are visited in "positions" grouped by sequence:
// position p holds row perm[p] (perm undefined: row p, i.e. rows already grouped). Sequence b owns
// positions [seg_off[b], seg_off[b+1]), cut into chunks of at most chunk_rows positions; chunk k is
// chunks[k] = (b, begin, end) and sequence b owns chunks [chunk_off[b], chunk_off[b+1]).
// Each chunk writes one fp32 partial row; a second pass sums a sequence's chunks in order.
struct SeqScalePlan {
  at::Tensor perm;       // [M] int64 or undefined
  at::Tensor chunks;     // [K, 3] int64
  at::Tensor chunk_off;  // [B + 1] int64
  int64_t num_chunks = 0;
};

// Host helpers shared by the CPU and CUDA entry points (defined in seq_scale.cpp).
// `op` names the calling op in error messages (the backward checks grad_out as 'x').
void seq_scale_check(const char* op, const at::Tensor& x, const at::Tensor& vec,
                     const c10::optional<at::Tensor>& seq_index);
void seq_scale_bwd_check(const at::Tensor& grad_out, const c10::optional<at::Tensor>& x,
                         const at::Tensor& vec, const c10::optional<at::Tensor>& seq_index,
                         bool need_vec);
int64_t seq_scale_num_rows(const at::Tensor& x, bool packed);
SeqRows seq_scale_rows(const at::Tensor& x, bool packed);
at::Tensor seq_scale_vec_acc(const at::Tensor& vec, const at::Tensor& x);
at::Tensor seq_index_host(const char* op, const at::Tensor& seq_index, int64_t num_seqs);
// The backward's work plan; validates seq_index (errors name seq_scale_bwd).
SeqScalePlan seq_scale_plan(const c10::optional<at::Tensor>& seq_index, int64_t num_seqs,
                            int64_t seq_len, int64_t rows, int64_t max_chunks, int64_t min_rows);

}  // namespace red_kernels
