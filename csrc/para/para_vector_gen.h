// PARA vector generator, plain and multi-tenant (one kernel family: the plain op is K = 1 with no
// tenant ids). The per-row and per-element math lives here as host/device inline functions so the
// CPU kernels (tested here) and the CUDA kernels (compiled here, run on a GPU) execute the same
// arithmetic.
//
// For sequence b with tenant k = tenant_ids[b] (0 when there are no tenant ids) and pooled row
// x = h[b, pool_index[b], :] (d values):
//
//   z[c]   = sum_i x[i] * w_down[k, i, c]                      c < r      (down projection)
//   a[c]   = act(z[c])
//   out[j] = b_up[k, j] + sum_c a[c] * w_up[k, c, j]           j < n      (up projection)
//
// and out[j] = 1 when k = -1 (no generator: the scaling vectors leave the model unchanged).
// Backward, with g = grad_out[b]:
//
//   ga[c]               = sum_j g[j] * w_up[k, c, j]
//   gz[c]               = ga[c] * act'(z[c])
//   grad_h[b, p, i]     = sum_c w_down[k, i, c] * gz[c]      (the only non-zero row of grad_h[b])
//   grad_b_up[k, j]     = sum_{b in k} g_b[j]
//   grad_w_up[k, c, j]  = sum_{b in k} a_b[c] * g_b[j]
//   grad_w_down[k, i, c] = sum_{b in k} x_b[i] * gz_b[c]
//
// Sums over the rows of a tenant run in batch order (rows sorted stably by tenant), so the weight
// gradients are deterministic without atomics.
#pragma once

#include <type_traits>

#include "common/activations.h"
#include "common/common.h"

namespace red_kernels {

// Largest bottleneck rank the kernels support (per-thread accumulators are sized by it).
constexpr int kParaMaxRank = 64;

// Lanes of the CPU dot products: independent partial sums the compiler can keep in one vector
// register, added in a fixed order at the end (deterministic, no fast-math needed).
constexpr int kParaLanes = 8;

// Accumulation type: fp64 when h or the weights are fp64 (gradcheck), fp32 otherwise.
template <typename T, typename W>
using para_acc_t =
    std::conditional_t<std::is_same_v<T, double> || std::is_same_v<W, double>, double, float>;

// Everything a kernel needs to read, as raw pointers and sizes (passed by value to CUDA kernels).
// h is [B, T, d] with any strides; the weights are contiguous [K, d, r], [K, r, n], [K, n];
// tenant_ids is null for the plain op (one generator, K = 1).
template <typename T, typename W>
struct ParaArgs {
  const T* h;
  int64_t sb, st, sd;
  const int64_t* pool_index;
  const int64_t* tenant_ids;
  const W* wd;
  const W* wu;
  const W* bu;
  int64_t batch, t, d, n;
  int r, act;

  RK_HD const T* pooled_row(int64_t b) const { return h + b * sb + pool_index[b] * st; }
};

// The generator of row b: its tenant id, or 0 for the plain (single-generator) op.
RK_HD int64_t para_tenant(const int64_t* tenant_ids, int64_t b) {
  return tenant_ids == nullptr ? 0 : tenant_ids[b];
}

// z[c] += sum_{i = i0, i0 + step, ... < i1} x[i * sx] * wd[i * r + c]   (wd: one tenant's [d, r]).
template <typename T, typename W, typename A>
RK_HD void para_down_partial(const T* x, int64_t sx, const W* wd, int r, int64_t i0, int64_t i1,
                             int64_t step, A* z) {
  for (int64_t i = i0; i < i1; i += step) {
    const A xi = static_cast<A>(x[i * sx]);
    const W* w = wd + i * r;
    for (int c = 0; c < r; ++c) z[c] += xi * static_cast<A>(w[c]);
  }
}

// a[c] = act(z[c]).
template <typename A>
RK_HD void para_activate(int act, int r, const A* z, A* a) {
  for (int c = 0; c < r; ++c) a[c] = act_forward<A>(act, z[c]);
}

// gz[c] = ga[c] * act'(z[c]) (see act_backward for NaN and inf).
template <typename A>
RK_HD void para_grad_z(int act, int r, const A* z, const A* ga, A* gz) {
  for (int c = 0; c < r; ++c) gz[c] = act_backward<A>(act, z[c], ga[c]);
}

// out[j - j0] = b_up[j] + sum_c a[c] * w_up[c, j] for j in [j0, j1) (wu: one tenant's [r, n],
// bu: its [n]); c is the outer loop so the inner loop runs over contiguous columns.
template <typename W, typename A>
RK_HD void para_up_block(const A* a, const W* wu, const W* bu, int r, int64_t n, int64_t j0,
                         int64_t j1, A* out) {
  for (int64_t j = j0; j < j1; ++j) out[j - j0] = static_cast<A>(bu[j]);
  for (int c = 0; c < r; ++c) {
    const A ac = a[c];
    const W* w = wu + c * n;
    for (int64_t j = j0; j < j1; ++j) out[j - j0] += ac * static_cast<A>(w[j]);
  }
}

// sum_{j = j0, j0 + step, ... < j1} g[j] * w[j]: one thread's share of ga[c] on CUDA.
template <typename T, typename W, typename A>
RK_HD A para_dot_strided(const T* g, const W* w, int64_t j0, int64_t j1, int64_t step) {
  A s = 0;
  for (int64_t j = j0; j < j1; j += step) s += static_cast<A>(g[j]) * static_cast<A>(w[j]);
  return s;
}

// sum_{j < n} g[j] * w[j] in kParaLanes interleaved partial sums, added pairwise at the end: the
// CPU form of ga[c] (vectorisable, and the same bits whatever the thread count).
template <typename T, typename W, typename A>
RK_HD A para_dot_lanes(const T* g, const W* w, int64_t n) {
  A lane[kParaLanes] = {};
  const int64_t full = n - n % kParaLanes;
  for (int64_t j = 0; j < full; j += kParaLanes) {
    for (int l = 0; l < kParaLanes; ++l)
      lane[l] += static_cast<A>(g[j + l]) * static_cast<A>(w[j + l]);
  }
  for (int64_t j = full; j < n; ++j) lane[j - full] += static_cast<A>(g[j]) * static_cast<A>(w[j]);
  for (int width = kParaLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
  }
  return lane[0];
}

// grad of the pooled row, element i: sum_c w_down[i, c] * gz[c].
template <typename W, typename A>
RK_HD A para_grad_pooled(const W* wd, int r, int64_t i, const A* gz) {
  const W* w = wd + i * r;
  A s = 0;
  for (int c = 0; c < r; ++c) s += static_cast<A>(w[c]) * gz[c];
  return s;
}

// One row's rank-1 contribution to a weight gradient: acc[c * ld + (j - j0)] += u[c] * v[j] for
// c < r, j in [j0, j1): a block of grad_w_up (u = a_b, v = g_b) for one row b.
template <typename T, typename A>
RK_HD void para_outer_accumulate(const A* u, int r, const T* v, int64_t j0, int64_t j1, A* acc,
                                 int64_t ld) {
  for (int c = 0; c < r; ++c) {
    const A uc = u[c];
    A* dst = acc + c * ld - j0;
    for (int64_t j = j0; j < j1; ++j) dst[j] += uc * static_cast<A>(v[j]);
  }
}

// grad_w_down[i, c] += x_i * gz[c] for c < r (one row of the [d, r] gradient).
template <typename A>
RK_HD void para_grad_w_down_row(A xi, const A* gz, int r, A* acc) {
  for (int c = 0; c < r; ++c) acc[c] += xi * gz[c];
}

}  // namespace red_kernels

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace red_kernels {
// Host helpers shared by the CPU and CUDA entry points (defined in para_vector_gen.cpp).

// The checked arguments as the kernels read them: index tensors contiguous, weights contiguous
// and in the gathered form [K, d, r], [K, r, n], [K, n] (K = 1 for the plain op).
struct ParaInputs {
  at::Tensor pool_index, w_down, w_up, b_up;
  c10::optional<at::Tensor> tenant_ids;
};

// Checks every argument (shapes, dtypes, devices, 1 <= r <= kParaMaxRank, activation code) and
// the index values: pool_index in [0, T) and tenant_ids in [-1, K), on the host before any kernel
// reads memory (a loop over the B values on CPU; one sync on CUDA). Without tenant_ids the
// weights are one generator, [d, r], [r, n], [n]; with them [K, d, r], [K, r, n], [K, n].
// `op` (see para_op_name) names the op in error messages.
ParaInputs para_prepare(const char* op, const at::Tensor& h, const at::Tensor& pool_index,
                        const at::Tensor& w_down, const at::Tensor& w_up, const at::Tensor& b_up,
                        const c10::optional<at::Tensor>& tenant_ids, int64_t activation);

// grad_out of para_vector_gen_bwd: [B, n], the weights' dtype, h's device.
void para_check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& h,
                         const at::Tensor& w_up, int64_t batch, int64_t n);

// The op named in error messages: the public op the C++ op serves (the plain or the multi-tenant
// generator, as the Python layer names them), with "_bwd" for the backward op.
const char* para_op_name(bool gathered, bool backward);

// Rows of the batch grouped by tenant, in batch order within a tenant: tenant k owns
// rows[offsets[k] .. offsets[k + 1]). Rows of tenant -1 come first and belong to no segment.
// The plain op has rows = 0..B-1 and offsets = {0, B}. Runs on the ids' device without a sync.
std::tuple<at::Tensor, at::Tensor> para_segments(const c10::optional<at::Tensor>& tenant_ids,
                                                 int64_t batch, int64_t num_tenants,
                                                 const at::Tensor& like);

// Calls f(T*, W*) with null pointers typed by h's dtype T and the weights' dtype W.
template <typename F>
void para_dispatch(at::ScalarType h_type, at::ScalarType w_type, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_type, "para_vector_gen", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w_type, "para_vector_gen", [&] {
      f(static_cast<T*>(nullptr), static_cast<scalar_t*>(nullptr));
    });
  });
}

// Raw pointers of prepared arguments.
template <typename T, typename W>
ParaArgs<T, W> para_args(const at::Tensor& h, const ParaInputs& in, int64_t activation) {
  ParaArgs<T, W> p;
  p.h = h.const_data_ptr<T>();
  p.sb = h.stride(0);
  p.st = h.stride(1);
  p.sd = h.stride(2);
  p.pool_index = in.pool_index.const_data_ptr<int64_t>();
  p.tenant_ids = in.tenant_ids.has_value() ? in.tenant_ids->const_data_ptr<int64_t>() : nullptr;
  p.wd = in.w_down.const_data_ptr<W>();
  p.wu = in.w_up.const_data_ptr<W>();
  p.bu = in.b_up.const_data_ptr<W>();
  p.batch = h.size(0);
  p.t = h.size(1);
  p.d = h.size(2);
  p.n = in.w_up.size(2);
  p.r = static_cast<int>(in.w_down.size(2));
  p.act = static_cast<int>(activation);
  return p;
}
}  // namespace red_kernels
