// para_vector_gen (plain and multi-tenant): operator schemas (red_kernels_C namespace), the host
// checks shared with the CUDA entry points, the CPU kernels, and the op's autograd.
//
//   para_vector_gen(h[B,T,d], pool_index[B], w_down, w_up, b_up, tenant_ids[B]?, activation)
//       -> out[B, n]                                                          (weights' dtype)
//   para_vector_gen_bwd(grad_out[B,n], h, pool_index, w_down, w_up, b_up, tenant_ids?, activation,
//                       need_h, need_w) -> (grad_h[B,T,d], grad_w_down, grad_w_up, grad_b_up)
// Weights: [d, r], [r, n], [n] without tenant ids (one generator); [K, d, r], [K, r, n], [K, n]
// with them. para_vector_gen is differentiable (autograd registered here, for CPU and CUDA); a
// gradient that is not needed comes back empty from para_vector_gen_bwd.
#include "para/para_vector_gen.h"

#include <ATen/Parallel.h>
#include <ATen/TensorIndexing.h>
#include <ATen/ops/add.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/erf.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/alloc.h"
#include "common/autograd.h"
#include "common/checks.h"
#include "common/cpu_isa.h"

#if RK_HAVE_AVX2_PATH
#include <immintrin.h>
#endif

namespace red_kernels {

namespace {

// min and max of a non-empty int64 index tensor, read on the host: a loop over the values on CPU
// (no tensor op); on CUDA aminmax, then both values in one copy (one sync).
std::pair<int64_t, int64_t> index_range(const at::Tensor& idx) {
  if (idx.is_cpu()) {
    const at::Tensor c = idx.contiguous();
    const int64_t* v = c.const_data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(v, v + c.numel());
    return {*lo, *hi};
  }
  const auto [lo, hi] = at::aminmax(idx);
  const at::Tensor both = at::stack({lo, hi}).to(at::kCPU);
  return {both.const_data_ptr<int64_t>()[0], both.const_data_ptr<int64_t>()[1]};
}

void check_index_tensor(const char* op, const at::Tensor& idx, const char* name, int64_t batch,
                        const at::Tensor& h) {
  RK_CHECK_ARG(idx.scalar_type() == at::kLong, op, name, "must be int64, got ", idx.scalar_type());
  RK_CHECK_ARG(idx.dim() == 1 && idx.size(0) == batch, op, name, "must have shape [", batch,
               "] (one per sequence of 'h'), got ", idx.sizes());
  check_same_device(op, h, "h", idx, name);
}

}  // namespace

const char* para_op_name(bool gathered, bool backward) {
  if (gathered) return backward ? "gathered_para_vector_gen_bwd" : "gathered_para_vector_gen";
  return backward ? "para_vector_gen_bwd" : "para_vector_gen";
}

ParaInputs para_prepare(const char* op, const at::Tensor& h, const at::Tensor& pool_index,
                        const at::Tensor& w_down, const at::Tensor& w_up, const at::Tensor& b_up,
                        const c10::optional<at::Tensor>& tenant_ids, int64_t activation) {
  RK_CHECK_ARG(h.dim() == 3, op, "h", "must be [B, T, d], got shape ", h.sizes());
  check_kernel_dtype(op, h, "h");
  const int64_t batch = h.size(0), t = h.size(1), d = h.size(2);
  check_index_tensor(op, pool_index, "pool_index", batch, h);
  const bool plain = !tenant_ids.has_value();
  const int64_t lead = plain ? 0 : 1;
  RK_CHECK_ARG(w_down.dim() == 2 + lead, op, "w_down", "must be ", plain ? "[d, r]" : "[K, d, r]",
               plain ? " (one generator without 'tenant_ids')" : "", ", got shape ",
               w_down.sizes());
  RK_CHECK_ARG(w_up.dim() == 2 + lead, op, "w_up", "must be ",
               plain ? "[r, n_out]" : "[K, r, n_out]", ", got shape ", w_up.sizes());
  RK_CHECK_ARG(b_up.dim() == 1 + lead, op, "b_up", "must be ", plain ? "[n_out]" : "[K, n_out]",
               ", got shape ", b_up.sizes());
  // From here on the gathered form: the plain op is the one-generator case.
  const at::Tensor wd = plain ? w_down.unsqueeze(0) : w_down;
  const at::Tensor wu = plain ? w_up.unsqueeze(0) : w_up;
  const at::Tensor bu = plain ? b_up.unsqueeze(0) : b_up;
  const int64_t k = wd.size(0), r = wd.size(2), n = wu.size(2);
  RK_CHECK_ARG(wd.size(1) == d, op, "w_down", "has input size ", wd.size(1),
               " but the last dim of 'h' is ", d);
  RK_CHECK_ARG(r >= 1 && r <= kParaMaxRank, op, "w_down", "has rank ", r,
               ", outside the supported 1..", kParaMaxRank);
  RK_CHECK_ARG(wu.size(0) == k && wu.size(1) == r, op, "w_up", "has shape ", w_up.sizes(),
               ", which does not match 'w_down' ", w_down.sizes(), " (expected ",
               plain ? "[r, n_out]" : "[K, r, n_out]", ")");
  RK_CHECK_ARG(bu.size(0) == k && bu.size(1) == n, op, "b_up", "has shape ", b_up.sizes(),
               ", which does not match 'w_up' ", w_up.sizes(), " (expected ",
               plain ? "[n_out]" : "[K, n_out]", ")");
  for (const auto& [w, name] : {std::pair<const at::Tensor&, const char*>{w_down, "w_down"},
                                {w_up, "w_up"},
                                {b_up, "b_up"}}) {
    check_kernel_dtype(op, w, name);
    check_same_device(op, h, "h", w, name);
    RK_CHECK_ARG(w.scalar_type() == w_down.scalar_type(), op, name, "has dtype ", w.scalar_type(),
                 " but 'w_down' has ", w_down.scalar_type(),
                 "; the generator's weights must share one dtype");
  }
  RK_CHECK_ARG(activation >= 0 && activation <= kSilu, op, "activation",
               "has unknown activation code ", activation);
  if (batch > 0) {
    const auto [lo, hi] = index_range(pool_index);
    RK_CHECK_ARG(lo >= 0 && hi < t, op, "pool_index", "values must lie in [0, ", t,
                 ") (the sequence length of 'h'), got min ", lo, " and max ", hi);
  }
  ParaInputs in{pool_index.contiguous(), wd.contiguous(), wu.contiguous(), bu.contiguous(),
                c10::nullopt};
  if (!plain) {
    check_index_tensor(op, *tenant_ids, "tenant_ids", batch, h);
    if (batch > 0) {
      const auto [lo, hi] = index_range(*tenant_ids);
      RK_CHECK_ARG(lo >= -1 && hi < k, op, "tenant_ids", "values must lie in [-1, ", k,
                   ") (-1 = no generator; K = w_down.size(0)), got min ", lo, " and max ", hi);
    }
    in.tenant_ids = tenant_ids->contiguous();
  }
  return in;
}

std::tuple<at::Tensor, at::Tensor> para_segments(const c10::optional<at::Tensor>& tenant_ids,
                                                 int64_t batch, int64_t num_tenants,
                                                 const at::Tensor& like) {
  const auto opts = like.options().dtype(at::kLong);
  if (!tenant_ids.has_value()) {
    at::Tensor offsets = at::zeros({2}, opts);
    offsets.narrow(0, 1, 1).fill_(batch);
    return {at::arange(batch, opts), offsets};
  }
  const at::Tensor ids = tenant_ids->contiguous();
  // Stable sort keeps batch order inside each tenant: the order of every weight-gradient sum.
  const at::Tensor rows = at::argsort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  // Integer scatter-add is exact, so the counts are deterministic; no host sync is needed.
  at::Tensor counts = at::zeros({num_tenants + 1}, opts);
  counts.scatter_add_(0, at::add(ids, 1), at::ones_like(ids));
  // offsets[k] = number of rows with id < k, for k = 0..K (counts[0] is tenant -1).
  const at::Tensor offsets = at::cumsum(counts, 0);
  return {rows, offsets};
}

namespace {

constexpr int64_t kColBlock = 512;  // output columns per task (w_up block stays in L1/L2)
constexpr int64_t kRowBlock = 256;  // rows of w_down per task in its gradient

// The avx512 build keeps the AVX2 register tiles (intrinsics, under RK_ROW_AVX2) as they are:
// AVX-512 implies AVX2, and the rest of the loops are auto-vectorised at 512 bits.
#define RK_ROW_KERNELS "para/para_vector_gen_cpu_kernels.inc"
#include "common/isa_namespaces.inc"

// Rows of the batch grouped by tenant on the host (CPU ids), with para_segments' meaning: a
// stable counting sort, so tenant k owns rows[offsets[k] .. offsets[k + 1]) in batch order and the
// rows of tenant -1 come first. No tensor is allocated: this runs on every call.
struct HostSegments {
  std::vector<int64_t> rows, offsets;  // offsets: K + 1 entries
};

HostSegments host_segments(const int64_t* ids, int64_t batch, int64_t num_tenants) {
  HostSegments s{std::vector<int64_t>(batch), std::vector<int64_t>(num_tenants + 1, 0)};
  if (ids == nullptr) {  // the plain op: one generator owns every row
    for (int64_t b = 0; b < batch; ++b) s.rows[b] = b;
    s.offsets[1] = batch;
    return s;
  }
  // Slot id + 1 counts the rows of tenant id; the running sum makes offsets[j] = #rows with id < j
  // (offsets[0] = the rows of tenant -1).
  for (int64_t b = 0; b < batch; ++b) ++s.offsets[ids[b] + 1];
  for (int64_t j = 1; j <= num_tenants; ++j) s.offsets[j] += s.offsets[j - 1];
  std::vector<int64_t> next(num_tenants + 1, 0);  // next free place of each slot
  for (int64_t j = 1; j <= num_tenants; ++j) next[j] = s.offsets[j - 1];
  for (int64_t b = 0; b < batch; ++b) s.rows[next[ids[b] + 1]++] = b;
  return s;
}

// Groups of at most kGroup rows of one tenant, as flat (tenant, first index into rows, count)
// triples, in tenant order: the units of the CPU register-blocked projections.
std::vector<int64_t> row_groups(const std::vector<int64_t>& offsets, int64_t num_tenants) {
  constexpr int64_t group = base::kGroup;  // rows per register-blocked group
  std::vector<int64_t> groups;
  for (int64_t k = 0; k < num_tenants; ++k) {
    for (int64_t s = offsets[k]; s < offsets[k + 1]; s += group) {
      groups.insert(groups.end(), {k, s, std::min(group, offsets[k + 1] - s)});
    }
  }
  return groups;
}

HostSegments cpu_segments(const ParaInputs& in, int64_t batch) {
  return host_segments(
      in.tenant_ids.has_value() ? in.tenant_ids->const_data_ptr<int64_t>() : nullptr, batch,
      in.w_down.size(0));
}

at::Tensor para_fwd_cpu(const at::Tensor& h, const at::Tensor& pool_index, const at::Tensor& w_down,
                        const at::Tensor& w_up, const at::Tensor& b_up,
                        const c10::optional<at::Tensor>& tenant_ids, int64_t activation) {
  const ParaInputs in = para_prepare(para_op_name(tenant_ids.has_value(), false), h, pool_index,
                                     w_down, w_up, b_up, tenant_ids, activation);
  const int64_t batch = h.size(0), n = in.w_up.size(2), r = in.w_down.size(2);
  at::Tensor out =
      at::empty({batch, n}, w_up.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const HostSegments seg = cpu_segments(in, batch);
  const std::vector<int64_t> groups = row_groups(seg.offsets, in.w_down.size(0));
  const int64_t ngroups = static_cast<int64_t>(groups.size() / 3);
  const int64_t* rows = seg.rows.data();
  const int64_t no_tenant_rows = seg.offsets[0];
  para_dispatch(h.scalar_type(), w_up.scalar_type(), [&](auto* tp, auto* wp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using W = std::remove_pointer_t<decltype(wp)>;
    using A = para_acc_t<T, W>;
    const auto p = para_args<T, W>(h, in, activation);
    std::vector<A> z(batch * r), a(batch * r);
    // Stage 1 (each group's reduction over d) then stage 2 (columns of the up projection): each
    // w_up tile is read once per group of rows.
    at::parallel_for(0, ngroups, 1, [&](int64_t q0, int64_t q1) {
      RK_ISA_CALL(groups_bottleneck<T RK_COMMA W RK_COMMA A>, p, rows, groups.data(), q0, q1,
                  z.data(), a.data());
    });
    W* op = out.mutable_data_ptr<W>();
    at::parallel_for(0, ceil_div(n, kColBlock), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t blk = c0; blk < c1; ++blk) {
        const int64_t j0 = blk * kColBlock, j1 = std::min(n, j0 + kColBlock);
        RK_ISA_CALL(fwd_columns<T RK_COMMA W RK_COMMA A>, p, rows, no_tenant_rows, groups.data(),
                    ngroups, a.data(), op, j0, j1);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> para_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& pool_index,
    const at::Tensor& w_down, const at::Tensor& w_up, const at::Tensor& b_up,
    const c10::optional<at::Tensor>& tenant_ids, int64_t activation, bool need_h, bool need_w) {
  const char* op = para_op_name(tenant_ids.has_value(), true);
  const ParaInputs in = para_prepare(op, h, pool_index, w_down, w_up, b_up, tenant_ids, activation);
  const int64_t batch = h.size(0), t = h.size(1), d = h.size(2);
  const int64_t k_count = in.w_down.size(0), r = in.w_down.size(2), n = in.w_up.size(2);
  para_check_grad_out(op, grad_out, h, w_up, batch, n);
  const at::Tensor g = grad_out.contiguous();
  const auto wopts = w_up.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_h = need_h ? empty_output(h.sizes(), h.options()) : at::empty({0}, h.options());
  at::Tensor gwd = at::empty(need_w ? w_down.sizes() : at::IntArrayRef{0}, wopts);
  at::Tensor gwu = at::empty(need_w ? w_up.sizes() : at::IntArrayRef{0}, wopts);
  at::Tensor gbu = at::empty(need_w ? b_up.sizes() : at::IntArrayRef{0}, wopts);
  if (need_w && batch == 0) {
    gwd.zero_();
    gwu.zero_();
    gbu.zero_();
  }
  if (batch == 0 || !(need_h || need_w)) return {grad_h, gwd, gwu, gbu};

  const HostSegments seg = cpu_segments(in, batch);
  const std::vector<int64_t> groups = row_groups(seg.offsets, k_count);
  const int64_t* rows = seg.rows.data();
  const int64_t* offsets = seg.offsets.data();
  para_dispatch(h.scalar_type(), w_up.scalar_type(), [&](auto* tp, auto* wp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using W = std::remove_pointer_t<decltype(wp)>;
    using A = para_acc_t<T, W>;
    const auto p = para_args<T, W>(h, in, activation);
    const W* gp = g.const_data_ptr<W>();
    std::vector<A> z(batch * r), a(batch * r), gz(batch * r);
    // Row stage: z, a = act(z) per group of rows, then gz = (g @ w_up^T) * act'(z) per row.
    at::parallel_for(0, static_cast<int64_t>(groups.size() / 3), 1, [&](int64_t q0, int64_t q1) {
      RK_ISA_CALL(groups_bottleneck<T RK_COMMA W RK_COMMA A>, p, rows, groups.data(), q0, q1,
                  z.data(), a.data());
    });
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      RK_ISA_CALL(rows_grad_z<T RK_COMMA W RK_COMMA A>, p, gp, z.data(), b0, b1, gz.data());
    });
    if (need_h) {
      // Dense grad_h in one pass: zeros, except the B pooled rows (no separate memset pass).
      T* ghp = grad_h.mutable_data_ptr<T>();
      const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1));
      at::parallel_for(0, batch * t, grain, [&](int64_t q0, int64_t q1) {
        RK_ISA_CALL(grad_h_rows<T RK_COMMA W RK_COMMA A>, p, gz.data(), ghp, q0, q1);
      });
    }
    if (need_w) {
      W* gwu_p = gwu.mutable_data_ptr<W>();
      W* gbu_p = gbu.mutable_data_ptr<W>();
      W* gwd_p = gwd.mutable_data_ptr<W>();
      // Tenant stage: every output element sums its tenant's rows in batch order (deterministic
      // whatever the thread count); absent tenants get zeros.
      const int64_t ncb = ceil_div(n, kColBlock), nrb = ceil_div(d, kRowBlock);
      at::parallel_for(0, k_count * (ncb + nrb), 1, [&](int64_t t0, int64_t t1) {
        std::vector<A> acc(std::max((r + 1) * kColBlock, kRowBlock * r));
        for (int64_t task = t0; task < t1; ++task) {
          const int64_t k = task / (ncb + nrb), blk = task % (ncb + nrb);
          const int64_t s0 = offsets[k], s1 = offsets[k + 1];
          if (blk < ncb) {
            const int64_t j0 = blk * kColBlock, j1 = std::min(n, j0 + kColBlock);
            RK_ISA_CALL(grad_w_up_block<T RK_COMMA W RK_COMMA A>, p, gp, a.data(), rows, s0, s1, k,
                        j0, j1, gwu_p, gbu_p, acc.data());
          } else {
            const int64_t i0 = (blk - ncb) * kRowBlock, i1 = std::min(d, i0 + kRowBlock);
            RK_ISA_CALL(grad_w_down_block<T RK_COMMA W RK_COMMA A>, p, gz.data(), rows, s0, s1, k,
                        i0, i1, gwd_p, acc.data());
          }
        }
      });
    }
  });
  return {grad_h, gwd, gwu, gbu};
}

// The activation and the gradient through it (act_forward / act_backward of activations.h) in
// differentiable ATen ops, for the create_graph backward below.
at::Tensor act_forward_aten(int64_t act, const at::Tensor& z) {
  if (act == kGelu) return at::gelu(z);
  if (act == kGeluTanh) return at::gelu(z, "tanh");
  if (act == kRelu) return at::relu(z);
  return at::silu(z);
}

at::Tensor act_backward_aten(int64_t act, const at::Tensor& z, const at::Tensor& g) {
  if (act == kRelu) return at::where(z <= 0, at::zeros_like(g), g);
  if (act == kSilu) {
    const at::Tensor s = at::sigmoid(z);
    return g * (s * (1 + z * (1 - s)));
  }
  if (act == kGelu) {
    constexpr double kInvSqrt2 = 0.70710678118654752440, kInvSqrt2Pi = 0.39894228040143267794;
    return g * (0.5 * (1 + at::erf(z * kInvSqrt2)) + z * kInvSqrt2Pi * at::exp(-0.5 * z * z));
  }
  constexpr double kSqrt2OverPi = 0.79788456080286535588, kCoef = 0.044715;  // kGeluTanh
  const at::Tensor t = at::tanh(kSqrt2OverPi * (z + kCoef * z * z * z));
  return g * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * kSqrt2OverPi * (1 + 3 * kCoef * z * z));
}

// para_vector_gen_bwd's formulas (para_vector_gen.h) in differentiable ATen ops, for
// create_graph=True (common/autograd.h). Gathered form throughout (the plain op is K = 1); only
// rows with a generator enter, so rows of tenant -1 read no weights and keep zero gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> para_bwd_differentiable(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& pool_index,
    const at::Tensor& w_down, const at::Tensor& w_up, const at::Tensor& b_up,
    const at::Tensor& tenant_ids, int64_t activation, bool need_h, bool need_w) {
  const bool plain = !tenant_ids.defined();
  const auto acc = h.scalar_type() == at::kDouble || w_up.scalar_type() == at::kDouble ? at::kDouble
                                                                                       : at::kFloat;
  const at::Tensor wd = (plain ? w_down.unsqueeze(0) : w_down).to(acc);  // [K, d, r]
  const at::Tensor wu = (plain ? w_up.unsqueeze(0) : w_up).to(acc);      // [K, r, n]
  const at::Tensor rows = plain ? at::arange(h.size(0), pool_index.options())
                                : at::nonzero(tenant_ids >= 0).squeeze(1);  // [M]
  const at::Tensor k = plain ? at::zeros_like(rows) : tenant_ids.index_select(0, rows);
  const at::Tensor pos = pool_index.index_select(0, rows);
  const at::Tensor wd_b = wd.index_select(0, k), wu_b = wu.index_select(0, k);
  const at::Tensor x = h.index({rows, pos}).to(acc);              // [M, d] pooled rows
  const at::Tensor z = at::bmm(x.unsqueeze(1), wd_b).squeeze(1);  // [M, r]
  const at::Tensor g = grad_out.index_select(0, rows).to(acc);    // [M, n]
  const at::Tensor gz = act_backward_aten(activation, z, at::bmm(wu_b, g.unsqueeze(2)).squeeze(2));
  at::Tensor gh, gwd, gwu, gbu;
  if (need_h) {
    gh = at::zeros(h.sizes(), h.options().dtype(acc));
    gh.index_put_({rows, pos}, at::bmm(wd_b, gz.unsqueeze(2)).squeeze(2));
    gh = gh.to(h.scalar_type());
  }
  if (need_w) {
    // Each tenant's sum over its rows, in the weight's shape and dtype.
    const auto per_tenant = [&](const at::Tensor& per_row, const at::Tensor& like) {
      return segment_sum(per_row.flatten(1), k, wd.size(0))
          .reshape(like.sizes())
          .to(like.scalar_type());
    };
    gwd = per_tenant(x.unsqueeze(2) * gz.unsqueeze(1), w_down);
    gwu = per_tenant(act_forward_aten(activation, z).unsqueeze(2) * g.unsqueeze(1), w_up);
    gbu = per_tenant(g, b_up);
  }
  return {gh, gwd, gwu, gbu};
}

// Autograd of para_vector_gen (common/autograd.h says why it is in C++); the kernels below it
// are the CPU or CUDA ones.
class ParaVectorGenFunction : public torch::autograd::Function<ParaVectorGenFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& pool_index,
                            const at::Tensor& w_down, const at::Tensor& w_up,
                            const at::Tensor& b_up, const c10::optional<at::Tensor>& tenant_ids,
                            int64_t activation) {
    ctx->saved_data["activation"] = activation;
    ctx->save_for_backward({h, pool_index, w_down, w_up, b_up, tenant_ids.value_or(at::Tensor())});
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = rk_op<decltype(para_fwd_cpu)>("red_kernels_C::para_vector_gen");
    return op.call(h, pool_index, w_down, w_up, b_up, tenant_ids, activation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // Edges follow the tensor arguments: h 0, pool_index 1, w_down 2, w_up 3, b_up 4.
    const bool need_h = ctx->needs_input_grad(0);
    const bool need_w =
        ctx->needs_input_grad(2) || ctx->needs_input_grad(3) || ctx->needs_input_grad(4);
    if (create_graph_requested()) {
      auto [gh, gwd, gwu, gbu] =
          para_bwd_differentiable(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                  saved[5], ctx->saved_data["activation"].toInt(), need_h, need_w);
      const auto need = [&](size_t i, at::Tensor& t) {
        return ctx->needs_input_grad(i) ? t : at::Tensor();
      };
      return {gh,           at::Tensor(), need(2, gwd), need(3, gwu),
              need(4, gbu), at::Tensor(), at::Tensor()};
    }
    static const auto op = rk_op<decltype(para_bwd_cpu)>("red_kernels_C::para_vector_gen_bwd");
    auto [gh, gwd, gwu, gbu] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved_or_none(saved[5]),
                ctx->saved_data["activation"].toInt(), need_h, need_w);
    return {take_grad(need_h, gh),
            at::Tensor(),
            take_grad(ctx->needs_input_grad(2), gwd),
            take_grad(ctx->needs_input_grad(3), gwu),
            take_grad(ctx->needs_input_grad(4), gbu),
            at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor para_fwd_autograd(const at::Tensor& h, const at::Tensor& pool_index,
                             const at::Tensor& w_down, const at::Tensor& w_up,
                             const at::Tensor& b_up, const c10::optional<at::Tensor>& tenant_ids,
                             int64_t activation) {
  return ParaVectorGenFunction::apply(h, pool_index, w_down, w_up, b_up, tenant_ids, activation);
}

}  // namespace

void para_check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& h,
                         const at::Tensor& w_up, int64_t batch, int64_t n) {
  RK_CHECK_ARG(grad_out.dim() == 2 && grad_out.size(0) == batch && grad_out.size(1) == n, op,
               "grad_out", "must have shape [", batch, ", ", n, "], got ", grad_out.sizes());
  RK_CHECK_ARG(grad_out.scalar_type() == w_up.scalar_type(), op, "grad_out", "has dtype ",
               grad_out.scalar_type(), " but the weights have ", w_up.scalar_type());
  check_same_device(op, h, "h", grad_out, "grad_out");
}

TORCH_LIBRARY_FRAGMENT(red_kernels_C, m) {
  // Fake (meta) impls for torch.compile and opcheck live in this Python module.
  m.set_python_module("red_kernels.ops.para_vector_gen");
  m.def(
      "para_vector_gen(Tensor h, Tensor pool_index, Tensor w_down, Tensor w_up, Tensor b_up, "
      "Tensor? tenant_ids, int activation) -> Tensor");
  m.def(
      "para_vector_gen_bwd(Tensor grad_out, Tensor h, Tensor pool_index, Tensor w_down, "
      "Tensor w_up, Tensor b_up, Tensor? tenant_ids, int activation, bool need_h, bool need_w) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(red_kernels_C, CPU, m) {
  m.impl("para_vector_gen", &para_fwd_cpu);
  m.impl("para_vector_gen_bwd", &para_bwd_cpu);
}

TORCH_LIBRARY_IMPL(red_kernels_C, Autograd, m) { m.impl("para_vector_gen", &para_fwd_autograd); }

}  // namespace red_kernels
