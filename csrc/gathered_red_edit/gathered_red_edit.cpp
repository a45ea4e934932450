// gathered_red_edit: operator schemas (red_kernels_C namespace), the host checks and backward plan
// shared with the CUDA kernels, and the CPU kernels.
//
//   gathered_red_edit(h[..., d], scales[K, d]?, biases[K, d]?, tenant_ids) -> Tensor
//     row i: h[i] * scales[t] + biases[t], t = tenant of row i; t = -1 leaves the row as it is
//   gathered_red_edit_bwd(grad_out, h?, scales?, tenant_ids, num_tenants, need_h, need_scales,
//                         need_biases, param_dtype) -> (grad_h, grad_scales [K, d], grad_biases [K,
//                         d])
// gathered_red_edit is differentiable (autograd registered here, for CPU and CUDA); a gradient that
// is not needed comes back from the _bwd op as an empty tensor. The CPU row loops are red_edit's
// (red_edit_cpu_kernels.inc), called with each run of rows' tenant vectors.
#include "gathered_red_edit/gathered_red_edit.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/alloc.h"
#include "common/autograd.h"
#include "common/checks.h"
#include "common/column_sum_cpu.h"
#include "common/cpu_isa.h"

namespace red_kernels {

// --- checks and plan (shared with gathered_red_edit_cuda.cu) -------------------------------------

namespace {

constexpr const char* kFwdOp = "gathered_red_edit";
constexpr const char* kBwdOp = "gathered_red_edit_bwd";

// A [K, d] tenant table of an op whose activations have last dim d.
void check_table(const char* op, const c10::optional<at::Tensor>& p, const char* name, int64_t d,
                 const at::Tensor& h) {
  if (!p.has_value()) return;
  RK_CHECK_ARG(p->dim() == 2, op, name, "must be a 2-D tensor [num_tenants, ", d, "], got shape ",
               p->sizes());
  RK_CHECK_ARG(p->size(1) == d, op, name, "has ", p->size(1),
               " columns but the last dim of 'h' is ", d);
  check_floating(op, *p, name);
  check_same_device(op, h, "h", *p, name);
}

void check_ids(const char* op, const at::Tensor& ids, const at::Tensor& h, const char* h_name) {
  RK_CHECK_ARG(ids.scalar_type() == at::kLong, op, "tenant_ids", "must be int64, got ",
               ids.scalar_type());
  RK_CHECK_ARG(ids.dim() >= 1 && ids.dim() < h.dim(), op, "tenant_ids", "must have shape ",
               h.sizes().slice(0, 1), " (one id per sequence) or a longer prefix of '", h_name,
               "'.shape[:-1] (one per token), got ", ids.sizes());
  RK_CHECK_ARG(ids.sizes() == h.sizes().slice(0, ids.dim()), op, "tenant_ids", "shape ",
               ids.sizes(), " is not a prefix of '", h_name,
               "'.shape[:-1] = ", h.sizes().slice(0, h.dim() - 1));
  check_same_device(op, h, h_name, ids, "tenant_ids");
}

}  // namespace

int64_t gathered_num_tenants(const c10::optional<at::Tensor>& scales,
                             const c10::optional<at::Tensor>& biases) {
  RK_CHECK_ARG(scales.has_value() || biases.has_value(), kFwdOp, "scales",
               "and 'biases' are both None; at least one is needed (it defines the number of "
               "tenants)");
  return scales.has_value() ? scales->size(0) : biases->size(0);
}

void gathered_check(const at::Tensor& h, const c10::optional<at::Tensor>& scales,
                    const c10::optional<at::Tensor>& biases, const at::Tensor& tenant_ids) {
  constexpr const char* op = kFwdOp;
  check_kernel_dtype(op, h, "h");
  RK_CHECK_ARG(h.dim() >= 2, op, "h",
               "must have at least 2 dims [units, ..., d] (the leading dims are indexed by "
               "'tenant_ids'), got shape ",
               h.sizes());
  const int64_t d = h.size(-1);
  check_table(op, scales, "scales", d, h);
  check_table(op, biases, "biases", d, h);
  gathered_num_tenants(scales, biases);
  if (scales.has_value() && biases.has_value()) {
    RK_CHECK_ARG(biases->size(0) == scales->size(0), op, "biases", "has ", biases->size(0),
                 " tenants (rows) but 'scales' has ", scales->size(0));
    RK_CHECK_ARG(scales->scalar_type() == biases->scalar_type(), op, "biases", "has dtype ",
                 biases->scalar_type(), " but 'scales' has ", scales->scalar_type(),
                 "; they must match");
  }
  check_ids(op, tenant_ids, h, "h");
}

void gathered_check_id_values(const char* op, const at::Tensor& ids_cpu, int64_t num_tenants) {
  const int64_t* p = ids_cpu.const_data_ptr<int64_t>();
  const int64_t n = ids_cpu.numel();
  for (int64_t i = 0; i < n; ++i) {
    RK_CHECK_ARG(p[i] >= -1 && p[i] < num_tenants, op, "tenant_ids", "has value ", p[i],
                 " at flat position ", i, ", outside [-1, ", num_tenants,
                 ") (-1 = unedited, else a row of 'scales'/'biases')");
  }
}

void gathered_bwd_check(const at::Tensor& grad_out, const c10::optional<at::Tensor>& h,
                        const c10::optional<at::Tensor>& scales, const at::Tensor& tenant_ids,
                        int64_t num_tenants, bool need_scales) {
  constexpr const char* op = kBwdOp;
  red_edit_bwd_check(op, grad_out, h, c10::nullopt, need_scales);
  RK_CHECK_ARG(grad_out.dim() >= 2, op, "grad_out", "must have at least 2 dims, got shape ",
               grad_out.sizes());
  RK_CHECK_ARG(num_tenants >= 0, op, "num_tenants", "must be >= 0, got ", num_tenants);
  check_table(op, scales, "scales", grad_out.size(-1), grad_out);
  if (scales.has_value()) {
    RK_CHECK_ARG(scales->size(0) == num_tenants, op, "scales", "has ", scales->size(0),
                 " tenants (rows) but num_tenants is ", num_tenants);
  }
  check_ids(op, tenant_ids, grad_out, "grad_out");
}

GatheredGrads gathered_bwd_outputs(const at::Tensor& grad_out, int64_t num_tenants, bool need_h,
                                   bool need_scales, bool need_biases) {
  const int64_t d = grad_out.size(-1);
  const auto opts = grad_out.options();
  const auto acc = opts.dtype(grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  GatheredGrads out;
  out.empty_work = grad_out.numel() == 0 || !(need_h || need_scales || need_biases);
  out.grad_h = need_h ? empty_output(grad_out.sizes(), opts) : at::empty({0}, opts);
  const auto sums = [&](bool need) {
    if (!need) return at::empty({0}, acc);
    return out.empty_work ? at::zeros({num_tenants, d}, acc) : at::empty({num_tenants, d}, acc);
  };
  out.sum_gh = sums(need_scales);
  out.sum_g = sums(need_biases);
  return out;
}

int64_t gathered_rows_per_unit(const at::Tensor& h, const at::Tensor& tenant_ids) {
  int64_t t = 1;
  for (int64_t i = tenant_ids.dim(); i + 1 < h.dim(); ++i) t *= h.size(i);
  return t;
}

GatheredPlan gathered_plan(const at::Tensor& ids_cpu, int64_t num_tenants, int64_t rows_per_unit,
                           int64_t rows_per_chunk) {
  const int64_t units = ids_cpu.numel();
  const int64_t K = num_tenants;
  const int64_t* ids = ids_cpu.const_data_ptr<int64_t>();
  // Slot K holds the unedited (-1) units, so they sort after every tenant.
  std::vector<int64_t> count(K + 1, 0);
  for (int64_t u = 0; u < units; ++u) ++count[ids[u] < 0 ? K : ids[u]];
  std::vector<int64_t> first_unit(K + 2, 0), first_chunk(K + 2, 0);
  for (int64_t s = 0; s <= K; ++s) {
    first_unit[s + 1] = first_unit[s] + count[s];
    first_chunk[s + 1] = first_chunk[s] + ceil_div(count[s] * rows_per_unit, rows_per_chunk);
  }
  GatheredPlan plan;
  plan.units = units;
  plan.nchunks = first_chunk[K + 1];
  plan.tenant_chunks = first_chunk[K];
  plan.table = at::empty({units + 3 * plan.nchunks + K + 1}, ids_cpu.options());
  const auto [order, tenant, begin, end, seg] = plan.ptrs(plan.table.mutable_data_ptr<int64_t>());
  std::vector<int64_t> next(first_unit.begin(), first_unit.end() - 1);
  for (int64_t u = 0; u < units; ++u) order[next[ids[u] < 0 ? K : ids[u]]++] = u;  // stable
  for (int64_t s = 0; s <= K; ++s) {
    const int64_t row0 = first_unit[s] * rows_per_unit;
    const int64_t row1 = first_unit[s + 1] * rows_per_unit;
    for (int64_t c = first_chunk[s]; c < first_chunk[s + 1]; ++c) {
      tenant[c] = s == K ? -1 : s;
      begin[c] = row0 + (c - first_chunk[s]) * rows_per_chunk;
      end[c] = std::min(row1, begin[c] + rows_per_chunk);
    }
    if (s < K) seg[s] = first_chunk[s];
  }
  seg[K] = first_chunk[K];
  return plan;
}

at::Tensor gathered_table(const c10::optional<at::Tensor>& p, int64_t d, const at::Tensor& like,
                          double fill, int64_t* tenant_stride) {
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (p.has_value()) {
    *tenant_stride = d;
    return p->to(acc).contiguous();
  }
  *tenant_stride = 0;  // every tenant reads the same ones/zeros row
  return at::full({1, d}, fill, like.options().dtype(acc));
}

// --- CPU kernels ------------------------------------------------------------------------------

// red_edit's row loops, built for the baseline ISA, AVX2 and AVX-512 (see cpu_isa.h); their own
// namespace keeps these instantiations apart from red_edit.cpp's.
namespace gathered_isa {
#define RK_ROW_KERNELS "red_edit/red_edit_cpu_kernels.inc"
#include "common/isa_namespaces.inc"
}  // namespace gathered_isa

namespace {

using namespace gathered_isa;

at::Tensor gathered_red_edit_fwd_cpu(const at::Tensor& h, const c10::optional<at::Tensor>& scales,
                                     const c10::optional<at::Tensor>& biases,
                                     const at::Tensor& tenant_ids) {
  gathered_check(h, scales, biases, tenant_ids);
  const int64_t K = gathered_num_tenants(scales, biases);
  const at::Tensor ids = tenant_ids.contiguous();
  gathered_check_id_values(kFwdOp, ids, K);
  const int64_t d = h.size(-1);
  at::Tensor out = empty_output(h.sizes(), h.options());
  if (out.numel() == 0) return out;
  const int64_t T = gathered_rows_per_unit(h, tenant_ids);
  const at::Tensor rows = as_rows(h);
  int64_t s_ts = 0, b_ts = 0;
  const at::Tensor S = gathered_table(scales, d, h, 1.0, &s_ts);
  const at::Tensor B = gathered_table(biases, d, h, 0.0, &b_ts);
  const at::Tensor ones = red_edit_param(c10::nullopt, d, h, 1.0);
  const at::Tensor zeros = red_edit_param(c10::nullopt, d, h, 0.0);
  const int64_t m = rows.size(0), row_stride = rows.stride(0);
  const int64_t grain = std::max<int64_t>(1, 32768 / d);
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "gathered_red_edit_fwd_cpu", [&] {
        using A = acc_t<scalar_t>;
        const scalar_t* hp = rows.const_data_ptr<scalar_t>();
        const A* sp = S.const_data_ptr<A>();
        const A* bp = B.const_data_ptr<A>();
        const A* one = ones.const_data_ptr<A>();
        const A* zero = zeros.const_data_ptr<A>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
          // Runs of rows within one unit share one tenant's vectors.
          for (int64_t r = r0; r < r1;) {
            const int64_t u = gathered_unit_of_row(r, T);
            const int64_t e = std::min(r1, (u + 1) * T);
            const int64_t t = idp[u];
            RK_ISA_CALL(fwd_rows<scalar_t RK_COMMA A>, hp, row_stride, t < 0 ? one : sp + t * s_ts,
                        t < 0 ? zero : bp + t * b_ts, op, d, r, e);
            r = e;
          }
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gathered_red_edit_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& h,
    const c10::optional<at::Tensor>& scales, const at::Tensor& tenant_ids, int64_t num_tenants,
    bool need_h, bool need_scales, bool need_biases, at::ScalarType param_dtype) {
  gathered_bwd_check(grad_out, h, scales, tenant_ids, num_tenants, need_scales);
  const int64_t K = num_tenants;
  const at::Tensor ids = tenant_ids.contiguous();
  gathered_check_id_values(kBwdOp, ids, K);
  const int64_t d = grad_out.size(-1);
  const auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = grad_out.options();
  GatheredGrads out = gathered_bwd_outputs(grad_out, K, need_h, need_scales, need_biases);
  if (out.empty_work) return out.finish(param_dtype);
  at::Tensor& grad_h = out.grad_h;
  at::Tensor& sum_gh = out.sum_gh;
  at::Tensor& sum_g = out.sum_g;
  const at::Tensor g = as_rows(grad_out);
  const int64_t m = g.size(0);
  const int64_t T = gathered_rows_per_unit(grad_out, tenant_ids);
  const int64_t rows_per_chunk =
      red_edit_rows_per_block(m, 64, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)));
  const GatheredPlan plan = gathered_plan(ids, K, T, rows_per_chunk);
  const auto [order, chunk_tenant, chunk_begin, chunk_end, seg] =
      plan.ptrs(plan.table.const_data_ptr<int64_t>());
  at::Tensor part_gh = at::zeros({need_scales ? plan.tenant_chunks : 0, d}, opts.dtype(acc));
  at::Tensor part_g = at::zeros({need_biases ? plan.tenant_chunks : 0, d}, opts.dtype(acc));
  const at::Tensor hr = need_scales ? as_rows(*h) : at::Tensor();
  int64_t s_ts = 0;
  const at::Tensor S = gathered_table(scales, d, grad_out, 1.0, &s_ts);
  const at::Tensor ones = red_edit_param(c10::nullopt, d, grad_out, 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "gathered_red_edit_bwd_cpu", [&] {
        using A = acc_t<scalar_t>;
        const scalar_t* gp = g.const_data_ptr<scalar_t>();
        const int64_t g_stride = g.stride(0);
        const scalar_t* hp = need_scales ? hr.const_data_ptr<scalar_t>() : nullptr;
        const int64_t h_stride = need_scales ? hr.stride(0) : 0;
        const A* sp = S.const_data_ptr<A>();
        const A* one = ones.const_data_ptr<A>();
        scalar_t* ghp = need_h ? grad_h.mutable_data_ptr<scalar_t>() : nullptr;
        A* pgh = need_scales ? part_gh.mutable_data_ptr<A>() : nullptr;
        A* pg = need_biases ? part_g.mutable_data_ptr<A>() : nullptr;
        dispatch_bool(need_h, [&](auto NH) {
          dispatch_bool(need_scales, [&](auto NS) {
            dispatch_bool(need_biases, [&](auto NB) {
              at::parallel_for(0, plan.nchunks, 1, [&](int64_t c0, int64_t c1) {
                for (int64_t c = c0; c < c1; ++c) {
                  const int64_t t = chunk_tenant[c];
                  if (t < 0 && !NH) continue;  // unedited rows only have a grad_h
                  // Walk the chunk's sorted rows in runs that stay inside one unit (contiguous).
                  for (int64_t p = chunk_begin[c]; p < chunk_end[c];) {
                    const int64_t r0 = gathered_sorted_row(order, p, T);
                    const int64_t len = std::min(chunk_end[c] - p, T - p % T);
                    if (t >= 0) {
                      RK_ISA_CALL(bwd_rows<scalar_t RK_COMMA A RK_COMMA NH RK_COMMA NS RK_COMMA NB>,
                                  gp, g_stride, hp, h_stride, sp + t * s_ts, ghp,
                                  NS ? pgh + c * d : nullptr, NB ? pg + c * d : nullptr, d, r0,
                                  r0 + len);
                    } else if constexpr (NH) {
                      RK_ISA_CALL(
                          bwd_rows<scalar_t RK_COMMA A RK_COMMA true RK_COMMA false RK_COMMA false>,
                          gp, g_stride, nullptr, 0, one, ghp, nullptr, nullptr, d, r0, r0 + len);
                    }
                    p += len;
                  }
                }
              });
            });
          });
        });
        // Second stage: tenant t sums its chunks seg[t] .. seg[t + 1] - 1 in order.
        if (need_scales) segmented_column_sum_cpu<A>(pgh, seg, K, d, sum_gh.mutable_data_ptr<A>());
        if (need_biases) segmented_column_sum_cpu<A>(pg, seg, K, d, sum_g.mutable_data_ptr<A>());
      });
  return out.finish(param_dtype);
}

// gathered_red_edit_bwd's formulas in differentiable ATen ops, for create_graph=True
// (common/autograd.h). Rows of h's [m, d] view; row i has tenant tenant_ids[i / T].
std::tuple<at::Tensor, at::Tensor, at::Tensor> gathered_red_edit_bwd_differentiable(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& scales,
    const at::Tensor& tenant_ids, int64_t num_tenants, bool need_h, bool need_scales,
    bool need_biases, at::ScalarType param_dtype) {
  const int64_t d = grad_out.size(-1);
  const int64_t T = gathered_rows_per_unit(grad_out, tenant_ids);
  const at::Tensor tenant = tenant_ids.reshape({-1, 1}).expand({-1, T}).reshape({-1});  // [m]
  const auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = as_rows(grad_out.to(acc));
  at::Tensor gh, gs, gb;
  if (need_h) {
    gh = g;
    if (scales.defined()) {  // row 0 of the table serves the unedited rows (tenant -1)
      const at::Tensor table = at::cat({at::ones({1, d}, g.options()), scales.to(acc)});
      gh = g * table.index_select(0, tenant + 1);
    }
    gh = gh.reshape(grad_out.sizes()).to(grad_out.scalar_type());
  }
  if (need_scales) {
    gs = segment_sum(g * as_rows(h.to(acc)), tenant, num_tenants).to(param_dtype);
  }
  if (need_biases) gb = segment_sum(g, tenant, num_tenants).to(param_dtype);
  return {gh, gs, gb};
}

// Autograd of gathered_red_edit (common/autograd.h says why it is in C++). Saves h only when the
// scales need a gradient and the scales only when h does, like the custom op in
// red_kernels/ops/gathered_red_edit.py.
class GatheredREDEditFunction : public torch::autograd::Function<GatheredREDEditFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h,
                            const c10::optional<at::Tensor>& scales,
                            const c10::optional<at::Tensor>& biases, const at::Tensor& tenant_ids) {
    at::Tensor out;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto op =
          rk_op<decltype(gathered_red_edit_fwd_cpu)>("red_kernels_C::gathered_red_edit");
      out = op.call(h, scales, biases, tenant_ids);  // checks every argument first
    }
    const at::Tensor& params = scales.has_value() ? *scales : *biases;
    ctx->saved_data["has_scales"] = scales.has_value();
    ctx->saved_data["has_biases"] = biases.has_value();
    ctx->saved_data["num_tenants"] = params.size(0);
    ctx->saved_data["param_dtype"] = static_cast<int64_t>(params.scalar_type());
    const bool scales_train = scales.has_value() && scales->requires_grad();
    ctx->save_for_backward({scales_train ? h : at::Tensor(),
                            h.requires_grad() && scales.has_value() ? *scales : at::Tensor(),
                            tenant_ids});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_scales = ctx->saved_data["has_scales"].toBool();
    const bool has_biases = ctx->saved_data["has_biases"].toBool();
    const bool need_h = ctx->needs_input_grad(0);
    const bool need_scales = needs_grad(ctx, has_scales, 1);
    const bool need_biases = needs_grad(ctx, has_biases, has_scales ? 2 : 1);
    const int64_t num_tenants = ctx->saved_data["num_tenants"].toInt();
    const auto param_dtype = static_cast<at::ScalarType>(ctx->saved_data["param_dtype"].toInt());
    if (create_graph_requested()) {
      auto [gh, gs, gb] =
          gathered_red_edit_bwd_differentiable(grads[0], saved[0], saved[1], saved[2], num_tenants,
                                               need_h, need_scales, need_biases, param_dtype);
      return {gh, gs, gb, at::Tensor()};
    }
    static const auto op =
        rk_op<decltype(gathered_red_edit_bwd_cpu)>("red_kernels_C::gathered_red_edit_bwd");
    auto [gh, gs, gb] =
        op.call(grads[0], saved_or_none(saved[0]), saved_or_none(saved[1]), saved[2], num_tenants,
                need_h, need_scales, need_biases, param_dtype);
    return {take_grad(need_h, gh), take_grad(need_scales, gs), take_grad(need_biases, gb),
            at::Tensor()};
  }
};

at::Tensor gathered_red_edit_autograd(const at::Tensor& h, const c10::optional<at::Tensor>& scales,
                                      const c10::optional<at::Tensor>& biases,
                                      const at::Tensor& tenant_ids) {
  return GatheredREDEditFunction::apply(h, scales, biases, tenant_ids);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(red_kernels_C, m) {
  // Fake (meta) impls for torch.compile and opcheck live in this Python module.
  m.set_python_module("red_kernels.ops.gathered_red_edit");
  m.def("gathered_red_edit(Tensor h, Tensor? scales, Tensor? biases, Tensor tenant_ids) -> Tensor");
  m.def(
      "gathered_red_edit_bwd(Tensor grad_out, Tensor? h, Tensor? scales, Tensor tenant_ids, "
      "int num_tenants, bool need_h, bool need_scales, bool need_biases, ScalarType param_dtype) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(red_kernels_C, CPU, m) {
  m.impl("gathered_red_edit", &gathered_red_edit_fwd_cpu);
  m.impl("gathered_red_edit_bwd", &gathered_red_edit_bwd_cpu);
}

TORCH_LIBRARY_IMPL(red_kernels_C, Autograd, m) {
  m.impl("gathered_red_edit", &gathered_red_edit_autograd);
}

}  // namespace red_kernels
