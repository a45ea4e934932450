// seq_scale: operator schemas (red_kernels_C namespace), host checks, the backward work plan and
// the CPU kernels.
//
//   seq_scale(x, vec[B, n], seq_index?) -> x * vec[seq]                         (x's dtype)
//     dense:  x [B, T, n], seq_index None          (row (b, t) uses vec[b])
//     packed: x [N, n],    seq_index [N] int64     (row r uses vec[seq_index[r]])
//   seq_scale_bwd(grad_out, x?, vec, seq_index?, need_x, need_vec)
//     -> (grad_x = g * vec[seq], grad_vec[b] = sum over b's rows of g * x)     (vec's dtype)
// seq_scale is differentiable (autograd registered here, for CPU and CUDA); a gradient that is not
// needed comes back from seq_scale_bwd as an empty tensor.
#include "seq_scale/seq_scale.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/alloc.h"
#include "common/autograd.h"
#include "common/checks.h"
#include "common/cpu_isa.h"

namespace red_kernels {

void seq_scale_check(const char* op, const at::Tensor& x, const at::Tensor& vec,
                     const c10::optional<at::Tensor>& seq_index) {
  check_kernel_dtype(op, x, "x");
  check_floating(op, vec, "vec");
  check_same_device(op, x, "x", vec, "vec");
  RK_CHECK_ARG(vec.dim() == 2, op, "vec", "must be [B, n], got shape ", vec.sizes());
  if (seq_index.has_value()) {
    RK_CHECK_ARG(x.dim() == 2, op, "x", "must be [N, n] with seq_index (packed form), got shape ",
                 x.sizes());
    const at::Tensor& idx = *seq_index;
    RK_CHECK_ARG(idx.scalar_type() == at::kLong, op, "seq_index", "must be int64, got ",
                 idx.scalar_type());
    RK_CHECK_ARG(idx.dim() == 1 && idx.size(0) == x.size(0), op, "seq_index", "must have shape [",
                 x.size(0), "] (one entry per row of 'x'), got ", idx.sizes());
    check_same_device(op, x, "x", idx, "seq_index");
  } else {
    RK_CHECK_ARG(x.dim() == 3, op, "x",
                 "must be [B, T, n] (or [N, n] with seq_index, the packed form), got shape ",
                 x.sizes());
    RK_CHECK_ARG(vec.size(0) == x.size(0), op, "vec", "has ", vec.size(0),
                 " rows but 'x' has batch size ", x.size(0));
  }
  RK_CHECK_ARG(vec.size(1) == x.size(-1), op, "vec", "has width ", vec.size(1),
               " but the last dim of 'x' is ", x.size(-1));
}

void seq_scale_bwd_check(const at::Tensor& grad_out, const c10::optional<at::Tensor>& x,
                         const at::Tensor& vec, const c10::optional<at::Tensor>& seq_index,
                         bool need_vec) {
  constexpr const char* op = "seq_scale_bwd";
  seq_scale_check(op, grad_out, vec, seq_index);
  if (!need_vec) return;
  RK_CHECK_ARG(x.has_value(), op, "x", "is required when need_vec is true");
  RK_CHECK_ARG(x->sizes() == grad_out.sizes(), op, "x", "has shape ", x->sizes(),
               " but 'grad_out' has ", grad_out.sizes());
  RK_CHECK_ARG(x->scalar_type() == grad_out.scalar_type(), op, "x", "has dtype ", x->scalar_type(),
               " but 'grad_out' has ", grad_out.scalar_type());
  check_same_device(op, grad_out, "grad_out", *x, "x");
}

// Rows of a backward pass: B * T (dense) or N (packed), well defined when n == 0.
int64_t seq_scale_num_rows(const at::Tensor& x, bool packed) {
  return packed ? x.size(0) : x.size(0) * x.size(1);
}

SeqRows seq_scale_rows(const at::Tensor& x, bool packed) {
  SeqRows rows;
  rows.t = x.size(-1) > 1 && x.stride(-1) != 1 ? x.contiguous() : x;
  if (packed) {
    rows.t_len = std::max<int64_t>(rows.t.size(0), 1);
    rows.s_b = 0;
    rows.s_t = rows.t.stride(0);
  } else {
    rows.t_len = std::max<int64_t>(rows.t.size(1), 1);
    rows.s_b = rows.t.stride(0);
    rows.s_t = rows.t.stride(1);
  }
  return rows;
}

// vec is tiny ([B, n]): convert it once to the accumulation dtype so the kernels are templated
// on x's dtype only (fp32 vectors on bf16/fp16 activations need no second instantiation).
at::Tensor seq_scale_vec_acc(const at::Tensor& vec, const at::Tensor& x) {
  return vec.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

// Host copy of seq_index, validated: every entry in [0, num_seqs). Runs before any kernel reads x
// or vec through the index, so a bad index is an error, never an out-of-bounds read.
at::Tensor seq_index_host(const char* op, const at::Tensor& seq_index, int64_t num_seqs) {
  at::Tensor h = seq_index.to(at::kCPU).contiguous();
  const int64_t* p = h.const_data_ptr<int64_t>();
  for (int64_t r = 0, n = h.numel(); r < n; ++r) {
    RK_CHECK_ARG(p[r] >= 0 && p[r] < num_seqs, op, "seq_index", "entry ", r, " is ", p[r],
                 "; entries must lie in [0, ", num_seqs, ") (the rows of 'vec')");
  }
  return h;
}

SeqScalePlan seq_scale_plan(const c10::optional<at::Tensor>& seq_index, int64_t num_seqs,
                            int64_t seq_len, int64_t rows, int64_t max_chunks, int64_t min_rows) {
  SeqScalePlan plan;
  std::vector<int64_t> seg_off(num_seqs + 1, 0);
  if (seq_index.has_value()) {
    const at::Tensor idx = seq_index_host("seq_scale_bwd", *seq_index, num_seqs);
    const int64_t* p = idx.const_data_ptr<int64_t>();
    bool sorted = true;
    for (int64_t r = 0; r < rows; ++r) {
      ++seg_off[p[r] + 1];
      sorted = sorted && (r == 0 || p[r - 1] <= p[r]);
    }
    for (int64_t b = 0; b < num_seqs; ++b) seg_off[b + 1] += seg_off[b];
    if (!sorted) {
      // Stable counting sort: each sequence's rows keep their token order, so the reduction order
      // (and the bits of grad_vec) is that of the sorted case.
      plan.perm = at::empty({rows}, at::kLong);
      int64_t* perm = plan.perm.mutable_data_ptr<int64_t>();
      std::vector<int64_t> cursor(seg_off.begin(), seg_off.end() - 1);
      for (int64_t r = 0; r < rows; ++r) perm[cursor[p[r]]++] = r;
    }
  } else {
    for (int64_t b = 0; b <= num_seqs; ++b) seg_off[b] = b * seq_len;
  }
  const int64_t chunk = seq_scale_chunk_rows(rows, max_chunks, min_rows);
  plan.chunk_off = at::empty({num_seqs + 1}, at::kLong);
  int64_t* coff = plan.chunk_off.mutable_data_ptr<int64_t>();
  coff[0] = 0;
  for (int64_t b = 0; b < num_seqs; ++b)
    coff[b + 1] = coff[b] + ceil_div(seg_off[b + 1] - seg_off[b], chunk);
  plan.num_chunks = coff[num_seqs];
  plan.chunks = at::empty({plan.num_chunks, 3}, at::kLong);
  int64_t* ch = plan.chunks.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < num_seqs; ++b) {
    for (int64_t k = coff[b]; k < coff[b + 1]; ++k) {
      const int64_t begin = seg_off[b] + (k - coff[b]) * chunk;
      ch[3 * k] = b;
      ch[3 * k + 1] = begin;
      ch[3 * k + 2] = std::min(begin + chunk, seg_off[b + 1]);
    }
  }
  return plan;
}

#define RK_ROW_KERNELS "seq_scale/seq_scale_cpu_kernels.inc"
#include "common/isa_namespaces.inc"

namespace {

// out = src * vec[seq] over all rows, parallel over rows (forward, and grad_x without grad_vec).
void scale_all_rows(const at::Tensor& src, const at::Tensor& vec, const at::Tensor* seq_index,
                    at::Tensor& out) {
  const bool packed = seq_index != nullptr;
  const SeqRows rows = seq_scale_rows(src, packed);
  const at::Tensor v = seq_scale_vec_acc(vec, src);
  const at::Tensor idx = packed ? seq_index->contiguous() : at::Tensor();
  const int64_t n = src.size(-1);
  const int64_t m = src.numel() / n;
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, src.scalar_type(), "seq_scale_cpu", [&] {
        using A = acc_t<scalar_t>;
        const StridedRows<const scalar_t> s = strided<scalar_t>(rows);
        const int64_t* ip = packed ? idx.const_data_ptr<int64_t>() : nullptr;
        const A* vp = v.const_data_ptr<A>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
          RK_ISA_CALL(scale_rows<scalar_t RK_COMMA A>, s, ip, vp, op, n, r0, r1);
        });
      });
}

at::Tensor seq_scale_fwd_cpu(const at::Tensor& x, const at::Tensor& vec,
                             const c10::optional<at::Tensor>& seq_index) {
  seq_scale_check("seq_scale", x, vec, seq_index);
  if (seq_index.has_value()) seq_index_host("seq_scale", *seq_index, vec.size(0));
  at::Tensor out = empty_output(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  scale_all_rows(x, vec, seq_index.has_value() ? &*seq_index : nullptr, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> seq_scale_bwd_cpu(const at::Tensor& grad_out,
                                                     const c10::optional<at::Tensor>& x,
                                                     const at::Tensor& vec,
                                                     const c10::optional<at::Tensor>& seq_index,
                                                     bool need_x, bool need_vec) {
  seq_scale_bwd_check(grad_out, x, vec, seq_index, need_vec);
  const bool packed = seq_index.has_value();
  const int64_t num_seqs = vec.size(0), n = vec.size(1);
  const int64_t m = seq_scale_num_rows(grad_out, packed);
  const auto opts = grad_out.options();
  const auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_x = need_x ? empty_output(grad_out.sizes(), opts) : at::empty({0}, opts);

  if (!need_vec) {
    if (packed) seq_index_host("seq_scale_bwd", *seq_index, num_seqs);
    if (need_x && grad_x.numel() > 0)
      scale_all_rows(grad_out, vec, packed ? &*seq_index : nullptr, grad_x);
    return {grad_x, at::empty({0}, opts.dtype(vec.scalar_type()))};
  }

  const SeqScalePlan plan =
      seq_scale_plan(seq_index, num_seqs, packed ? 0 : grad_out.size(1), m, 64,
                     std::max<int64_t>(1, 8192 / std::max<int64_t>(n, 1)));
  if (plan.num_chunks == 0 || n == 0) {
    return {grad_x, at::zeros({num_seqs, n}, opts.dtype(vec.scalar_type()))};
  }
  // Both buffers are written in full below (no zero fill): each extra parallel region costs a
  // wake-up of the worker threads, which dominates when the machine is busy.
  at::Tensor sum = at::empty({num_seqs, n}, opts.dtype(acc));
  const at::Tensor part = at::empty({plan.num_chunks, n}, opts.dtype(acc));
  const SeqRows g_rows = seq_scale_rows(grad_out, packed);
  const SeqRows x_rows = seq_scale_rows(*x, packed);
  const at::Tensor v = seq_scale_vec_acc(vec, grad_out);
  const int64_t* perm = plan.perm.defined() ? plan.perm.const_data_ptr<int64_t>() : nullptr;
  const int64_t* chunks = plan.chunks.const_data_ptr<int64_t>();
  const int64_t* coff = plan.chunk_off.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "seq_scale_bwd_cpu", [&] {
        using A = acc_t<scalar_t>;
        const StridedRows<const scalar_t> gs = strided<scalar_t>(g_rows);
        const StridedRows<const scalar_t> xs = strided<scalar_t>(x_rows);
        const A* vp = v.const_data_ptr<A>();
        scalar_t* gxp = need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
        A* pp = part.mutable_data_ptr<A>();
        dispatch_bool(need_x, [&](auto NX) {
          at::parallel_for(0, plan.num_chunks, 1, [&](int64_t k0, int64_t k1) {
            for (int64_t k = k0; k < k1; ++k) {
              const int64_t* c = chunks + 3 * k;
              std::fill(pp + k * n, pp + (k + 1) * n, A(0));
              RK_ISA_CALL(bwd_chunk<scalar_t RK_COMMA A RK_COMMA NX>, gs, xs, perm, vp + c[0] * n,
                          gxp, pp + k * n, n, c[1], c[2]);
            }
          });
        });
        // Second stage: each sequence sums its chunks in chunk order (fixed, hence deterministic).
        // It reads K x n partials (K <= 64 + B): inline unless that is large.
        constexpr int64_t kCols = 1024;
        const int64_t col_blocks = ceil_div(n, kCols);
        A* sp = sum.mutable_data_ptr<A>();
        const auto stage2 = [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / col_blocks;
            const int64_t j0 = (i % col_blocks) * kCols, j1 = std::min(n, j0 + kCols);
            std::fill(sp + b * n + j0, sp + b * n + j1, A(0));
            for (int64_t k = coff[b]; k < coff[b + 1]; ++k) {
              for (int64_t j = j0; j < j1; ++j) sp[b * n + j] += pp[k * n + j];
            }
          }
        };
        if (plan.num_chunks * n < (int64_t{1} << 22)) {
          stage2(0, num_seqs * col_blocks);
        } else {
          at::parallel_for(0, num_seqs * col_blocks, 1, stage2);
        }
      });
  return {grad_x, sum.to(vec.scalar_type())};
}

// seq_scale_bwd's formulas in differentiable ATen ops, for create_graph=True (common/autograd.h).
std::tuple<at::Tensor, at::Tensor> seq_scale_bwd_differentiable(const at::Tensor& grad_out,
                                                                const at::Tensor& x,
                                                                const at::Tensor& vec,
                                                                const at::Tensor& seq_index,
                                                                bool need_x, bool need_vec) {
  const at::Tensor g =
      grad_out.to(grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const bool packed = seq_index.defined();
  at::Tensor gx, gv;
  if (need_x) {
    const at::Tensor v = vec.to(g.scalar_type());
    gx = (g * (packed ? v.index_select(0, seq_index) : v.unsqueeze(1))).to(grad_out.scalar_type());
  }
  if (need_vec) {
    const at::Tensor gxs = g * x.to(g.scalar_type());
    gv = (packed ? segment_sum(gxs, seq_index, vec.size(0)) : gxs.sum(1)).to(vec.scalar_type());
  }
  return {gx, gv};
}

// Autograd of seq_scale (common/autograd.h says why it is in C++). Saves x only when vec needs a
// gradient, like the custom op in red_kernels/ops/seq_scale.py.
class SeqScaleFunction : public torch::autograd::Function<SeqScaleFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& vec,
                            const c10::optional<at::Tensor>& seq_index) {
    ctx->save_for_backward(
        {vec.requires_grad() ? x : at::Tensor(), vec, seq_index.value_or(at::Tensor())});
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = rk_op<decltype(seq_scale_fwd_cpu)>("red_kernels_C::seq_scale");
    return op.call(x, vec, seq_index);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_vec = ctx->needs_input_grad(1);
    if (create_graph_requested()) {
      auto [gx, gv] =
          seq_scale_bwd_differentiable(grads[0], saved[0], saved[1], saved[2], need_x, need_vec);
      return {gx, gv, at::Tensor()};
    }
    static const auto op = rk_op<decltype(seq_scale_bwd_cpu)>("red_kernels_C::seq_scale_bwd");
    auto [gx, gv] = op.call(grads[0], saved_or_none(saved[0]), saved[1], saved_or_none(saved[2]),
                            need_x, need_vec);
    return {take_grad(need_x, gx), take_grad(need_vec, gv), at::Tensor()};
  }
};

at::Tensor seq_scale_autograd(const at::Tensor& x, const at::Tensor& vec,
                              const c10::optional<at::Tensor>& seq_index) {
  return SeqScaleFunction::apply(x, vec, seq_index);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(red_kernels_C, m) {
  // Fake (meta) impls for torch.compile and opcheck live in this Python module.
  m.set_python_module("red_kernels.ops.seq_scale");
  m.def("seq_scale(Tensor x, Tensor vec, Tensor? seq_index) -> Tensor");
  m.def(
      "seq_scale_bwd(Tensor grad_out, Tensor? x, Tensor vec, Tensor? seq_index, bool need_x, "
      "bool need_vec) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(red_kernels_C, CPU, m) {
  m.impl("seq_scale", &seq_scale_fwd_cpu);
  m.impl("seq_scale_bwd", &seq_scale_bwd_cpu);
}

TORCH_LIBRARY_IMPL(red_kernels_C, Autograd, m) { m.impl("seq_scale", &seq_scale_autograd); }

}  // namespace red_kernels
