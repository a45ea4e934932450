// gathered_red_edit: multi-tenant RED, row i of h gets h[i] * scales[t] + biases[t] with
// t = tenant of row i (-1: unedited). The element math is red_edit.h's; this header adds the row
// -> tenant mapping and the host-side plan of the deterministic backward, both shared by the CPU
// and CUDA kernels.
//
// Rows and units. h is viewed as rows [m, d]; tenant_ids has shape h.shape[:k] (k >= 1), so each
// id covers a "unit" of rows_per_unit = m / units consecutive rows: a whole sequence for ids [B] on
// h [B, T, d], a single token for packed ids [N] on h [N, d].
#pragma once

#include <tuple>

#include "common/common.h"
#include "red_edit/red_edit.h"

namespace red_kernels {

// Row r of the [m, d] view belongs to unit r / rows_per_unit.
RK_HD int64_t gathered_unit_of_row(int64_t r, int64_t rows_per_unit) { return r / rows_per_unit; }

// Backward plan: units are sorted by tenant (stable counting sort, the unedited -1 units last) and
// the sorted rows are cut into chunks of at most rows_per_chunk rows that never mix tenants. Stage
// 1 gives every tenant chunk one [d] row of fp32 partial sums; stage 2 sums tenant t's chunks
// seg[t] .. seg[t + 1] - 1 in order. The chunking depends on the ids and shapes only (not on thread
// or SM counts), so the gradients have the same bits on every run, without atomics.
//
// Sorted row position p is row sorted_row(p) = order[p / T] * T + p % T (T = rows_per_unit).
RK_HD int64_t gathered_sorted_row(const int64_t* order, int64_t p, int64_t rows_per_unit) {
  return order[p / rows_per_unit] * rows_per_unit + p % rows_per_unit;
}

}  // namespace red_kernels

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace red_kernels {

// Host plan (see above). `table` is one int64 tensor holding, in this order:
//   order [units] | chunk_tenant [nchunks] | chunk_begin [nchunks] | chunk_end [nchunks] |
//   seg [K+1]
// so a CUDA caller moves it to the device with one copy; ptrs() is that layout. Tenant chunks come
// first (tenant order), then the chunks of unedited rows (chunk_tenant -1), which only produce
// grad_h.
template <typename P>  // const int64_t* to read the plan, int64_t* to fill it
struct GatheredPlanPtrs {
  P order, tenant, begin, end, seg;
};

struct GatheredPlan {
  at::Tensor table;
  int64_t units = 0;
  int64_t nchunks = 0;        // all chunks
  int64_t tenant_chunks = 0;  // chunks [0, tenant_chunks) belong to tenants 0..K-1

  // The sections of the table starting at `base` (the host table or its device copy).
  template <typename P>
  GatheredPlanPtrs<P> ptrs(P base) const {
    return {base, base + units, base + units + nchunks, base + units + 2 * nchunks,
            base + units + 3 * nchunks};
  }
};

// Checks shared by the CPU and CUDA entry points (defined in gathered_red_edit.cpp). The id values
// are checked on the host, from `ids_cpu`, before any kernel reads memory through them.
int64_t gathered_num_tenants(const c10::optional<at::Tensor>& scales,
                             const c10::optional<at::Tensor>& biases);
void gathered_check(const at::Tensor& h, const c10::optional<at::Tensor>& scales,
                    const c10::optional<at::Tensor>& biases, const at::Tensor& tenant_ids);
// `op` names the calling op (gathered_red_edit or gathered_red_edit_bwd) in error messages.
void gathered_check_id_values(const char* op, const at::Tensor& ids_cpu, int64_t num_tenants);
void gathered_bwd_check(const at::Tensor& grad_out, const c10::optional<at::Tensor>& h,
                        const c10::optional<at::Tensor>& scales, const at::Tensor& tenant_ids,
                        int64_t num_tenants, bool need_scales);
// Units and rows per unit of h's [m, d] view for these ids.
int64_t gathered_rows_per_unit(const at::Tensor& h, const at::Tensor& tenant_ids);
// Output tensors of the backward pass, shared by the CPU and CUDA entry points: grad_h (grad_out's
// shape, or [0] when not needed) and the per-tenant sums [K, d] in the accumulation dtype (or [0]).
// `empty_work` is true when there is nothing to compute; the sums are then zero-filled, otherwise
// the segmented column sum writes every entry (tenants absent from the batch get 0 there).
struct GatheredGrads {
  at::Tensor grad_h, sum_gh, sum_g;
  bool empty_work;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(at::ScalarType param_dtype) const {
    return {grad_h, sum_gh.to(param_dtype), sum_g.to(param_dtype)};
  }
};
GatheredGrads gathered_bwd_outputs(const at::Tensor& grad_out, int64_t num_tenants, bool need_h,
                                   bool need_scales, bool need_biases);
// The backward plan from checked ids on the CPU.
GatheredPlan gathered_plan(const at::Tensor& ids_cpu, int64_t num_tenants, int64_t rows_per_unit,
                           int64_t rows_per_chunk);
// [K, d] tenant table in the accumulation dtype (contiguous), or a [1, d] ones/zeros row with
// tenant stride 0 when the table is absent; *tenant_stride receives the stride between tenants.
at::Tensor gathered_table(const c10::optional<at::Tensor>& p, int64_t d, const at::Tensor& like,
                          double fill, int64_t* tenant_stride);

}  // namespace red_kernels
