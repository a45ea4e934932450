// red_edit: operator schemas (red_kernels_C namespace), the CPU kernels and the op's autograd.
//
//   red_edit(h[..., d], scale[d]?, bias[d]?) -> h * scale + bias           (h's dtype)
//   red_edit_bwd(grad_out, h?, scale?, need_h, need_scale, need_bias, param_dtype)
//     -> (grad_h = g * scale, grad_scale = sum_rows g * h, grad_bias = sum_rows g)
// red_edit is differentiable (autograd registered here, for CPU and CUDA); a gradient that is not
// needed comes back from red_edit_bwd as an empty tensor.
#include "red_edit/red_edit.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "common/alloc.h"
#include "common/autograd.h"
#include "common/checks.h"
#include "common/column_sum_cpu.h"
#include "common/cpu_isa.h"

namespace red_kernels {

// Parameters are tiny ([d]): convert them once to the accumulation dtype so the kernels are
// templated on h's dtype only. A missing scale/bias becomes ones/zeros (one extra FMA operand
// costs nothing in a memory-bound loop and keeps one kernel for all four ablations).
at::Tensor red_edit_param(const c10::optional<at::Tensor>& p, int64_t d, const at::Tensor& like,
                          double fill) {
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (p.has_value()) return p->to(acc).contiguous();
  const auto opts = like.options().dtype(acc);
  return fill == 0.0 ? at::zeros({d}, opts) : at::ones({d}, opts);
}

void red_edit_check(const at::Tensor& h, const c10::optional<at::Tensor>& scale,
                    const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "red_edit";
  RK_CHECK_ARG(h.dim() >= 1, op, "h", "must have at least 1 dim [..., d], got a scalar");
  check_kernel_dtype(op, h, "h");
  const int64_t d = h.size(-1);
  check_vector(op, scale, "scale", d, h);
  check_vector(op, bias, "bias", d, h);
  if (scale.has_value() && bias.has_value()) {
    RK_CHECK_ARG(scale->scalar_type() == bias->scalar_type(), op, "bias", "has dtype ",
                 bias->scalar_type(), " but 'scale' has ", scale->scalar_type(),
                 "; they must match");
  }
}

void red_edit_bwd_check(const char* op, const at::Tensor& grad_out,
                        const c10::optional<at::Tensor>& h, const c10::optional<at::Tensor>& scale,
                        bool need_scale) {
  RK_CHECK_ARG(grad_out.dim() >= 1, op, "grad_out", "must have at least 1 dim");
  check_kernel_dtype(op, grad_out, "grad_out");
  RK_CHECK_ARG(!need_scale || h.has_value(), op, "h", "is required when need_scale is true");
  if (h.has_value()) {
    RK_CHECK_ARG(h->sizes() == grad_out.sizes(), op, "h", "has shape ", h->sizes(),
                 " but 'grad_out' has ", grad_out.sizes());
    RK_CHECK_ARG(h->scalar_type() == grad_out.scalar_type(), op, "h", "has dtype ",
                 h->scalar_type(), " but 'grad_out' has ", grad_out.scalar_type());
    check_same_device(op, grad_out, "grad_out", *h, "h");
  }
  check_vector(op, scale, "scale", grad_out.size(-1), grad_out);
}

#define RK_ROW_KERNELS "red_edit/red_edit_cpu_kernels.inc"
#include "common/isa_namespaces.inc"

namespace {

at::Tensor red_edit_fwd_cpu(const at::Tensor& h, const c10::optional<at::Tensor>& scale,
                            const c10::optional<at::Tensor>& bias) {
  red_edit_check(h, scale, bias);
  const int64_t d = h.size(-1);
  at::Tensor out = empty_output(h.sizes(), h.options());
  if (out.numel() == 0) return out;
  const at::Tensor rows = as_rows(h);
  const at::Tensor s = red_edit_param(scale, d, h, 1.0);
  const at::Tensor b = red_edit_param(bias, d, h, 0.0);
  const int64_t m = rows.size(0), row_stride = rows.stride(0);
  const int64_t grain = std::max<int64_t>(1, 32768 / d);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "red_edit_fwd_cpu", [&] {
        using A = acc_t<scalar_t>;
        const scalar_t* hp = rows.const_data_ptr<scalar_t>();
        const A* sp = s.const_data_ptr<A>();
        const A* bp = b.const_data_ptr<A>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
          RK_ISA_CALL(fwd_rows<scalar_t RK_COMMA A>, hp, row_stride, sp, bp, op, d, r0, r1);
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> red_edit_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& h,
    const c10::optional<at::Tensor>& scale, bool need_h, bool need_scale, bool need_bias,
    at::ScalarType param_dtype) {
  red_edit_bwd_check("red_edit_bwd", grad_out, h, scale, need_scale);
  const int64_t d = grad_out.size(-1);

  const auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = grad_out.options();
  at::Tensor grad_h = need_h ? empty_output(grad_out.sizes(), opts) : at::empty({0}, opts);
  const at::Tensor g = as_rows(grad_out);
  const int64_t m = g.size(0);
  // Column partial sums, one row per block of rows, then an in-order reduction over blocks.
  const int64_t rows_per_block =
      red_edit_rows_per_block(m, 64, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)));
  const int64_t nblocks = m == 0 ? 0 : ceil_div(m, rows_per_block);
  // Each block zeroes its own partial rows inside the parallel region: a separate at::zeros would
  // be one more OpenMP region, which costs a lot when the machine is oversubscribed.
  at::Tensor part_gh = at::empty({need_scale ? nblocks : 0, d}, opts.dtype(acc));
  at::Tensor part_g = at::empty({need_bias ? nblocks : 0, d}, opts.dtype(acc));
  at::Tensor sum_gh = at::zeros({need_scale ? d : 0}, opts.dtype(acc));
  at::Tensor sum_g = at::zeros({need_bias ? d : 0}, opts.dtype(acc));

  if (m > 0 && d > 0 && (need_h || need_scale || need_bias)) {
    const at::Tensor hr = need_scale ? as_rows(*h) : at::Tensor();
    const at::Tensor s = red_edit_param(scale, d, grad_out, 1.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad_out.scalar_type(), "red_edit_bwd_cpu", [&] {
          using A = acc_t<scalar_t>;
          const scalar_t* gp = g.const_data_ptr<scalar_t>();
          const int64_t g_stride = g.stride(0);
          const scalar_t* hp = need_scale ? hr.const_data_ptr<scalar_t>() : nullptr;
          const int64_t h_stride = need_scale ? hr.stride(0) : 0;
          const A* sp = s.const_data_ptr<A>();
          scalar_t* ghp = need_h ? grad_h.mutable_data_ptr<scalar_t>() : nullptr;
          A* pgh = need_scale ? part_gh.mutable_data_ptr<A>() : nullptr;
          A* pg = need_bias ? part_g.mutable_data_ptr<A>() : nullptr;
          dispatch_bool(need_h, [&](auto NH) {
            dispatch_bool(need_scale, [&](auto NS) {
              dispatch_bool(need_bias, [&](auto NB) {
                at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
                  for (int64_t blk = b0; blk < b1; ++blk) {
                    const int64_t r0 = blk * rows_per_block;
                    const int64_t r1 = std::min(m, r0 + rows_per_block);
                    A* acc_gh = NS ? pgh + blk * d : nullptr;
                    A* acc_g = NB ? pg + blk * d : nullptr;
                    if (NS) std::fill(acc_gh, acc_gh + d, A(0));
                    if (NB) std::fill(acc_g, acc_g + d, A(0));
                    RK_ISA_CALL(bwd_rows<scalar_t RK_COMMA A RK_COMMA NH RK_COMMA NS RK_COMMA NB>,
                                gp, g_stride, hp, h_stride, sp, ghp, acc_gh, acc_g, d, r0, r1);
                  }
                });
              });
            });
          });
          // Second stage: fixed-order sum over blocks, parallel over columns.
          const int64_t seg[2] = {0, nblocks};
          if (need_scale) segmented_column_sum_cpu<A>(pgh, seg, 1, d, sum_gh.mutable_data_ptr<A>());
          if (need_bias) segmented_column_sum_cpu<A>(pg, seg, 1, d, sum_g.mutable_data_ptr<A>());
        });
  }
  return {grad_h, sum_gh.to(param_dtype), sum_g.to(param_dtype)};
}

// red_edit_bwd's formulas in differentiable ATen ops, for create_graph=True (common/autograd.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> red_edit_bwd_differentiable(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& scale, bool need_h,
    bool need_scale, bool need_bias, at::ScalarType param_dtype) {
  const at::Tensor g =
      grad_out.to(grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor gh, gs, gb;
  if (need_h) gh = (scale.defined() ? g * scale.to(g.scalar_type()) : g).to(grad_out.scalar_type());
  if (need_scale) gs = sum_leading(g * h.to(g.scalar_type())).to(param_dtype);
  if (need_bias) gb = sum_leading(g).to(param_dtype);
  return {gh, gs, gb};
}

// Autograd of red_edit (common/autograd.h says why it is in C++). Saves h only when scale needs a
// gradient and scale only when h does, like the custom op in red_kernels/ops/red_edit.py.
class REDEditFunction : public torch::autograd::Function<REDEditFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h,
                            const c10::optional<at::Tensor>& scale,
                            const c10::optional<at::Tensor>& bias) {
    const bool scale_trains = scale.has_value() && scale->requires_grad();
    ctx->saved_data["has_scale"] = scale.has_value();
    ctx->saved_data["has_bias"] = bias.has_value();
    const at::ScalarType param_dtype = scale.has_value()  ? scale->scalar_type()
                                       : bias.has_value() ? bias->scalar_type()
                                                          : h.scalar_type();
    ctx->saved_data["param_dtype"] = static_cast<int64_t>(param_dtype);
    ctx->save_for_backward({scale_trains ? h : at::Tensor(),
                            h.requires_grad() && scale.has_value() ? *scale : at::Tensor()});
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = rk_op<decltype(red_edit_fwd_cpu)>("red_kernels_C::red_edit");
    return op.call(h, scale, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_scale = ctx->saved_data["has_scale"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_h = ctx->needs_input_grad(0);
    const bool need_scale = needs_grad(ctx, has_scale, 1);
    const bool need_bias = needs_grad(ctx, has_bias, has_scale ? 2 : 1);
    const auto param_dtype = static_cast<at::ScalarType>(ctx->saved_data["param_dtype"].toInt());
    if (create_graph_requested()) {
      auto [gh, gs, gb] = red_edit_bwd_differentiable(grads[0], saved[0], saved[1], need_h,
                                                      need_scale, need_bias, param_dtype);
      return {gh, gs, gb};
    }
    static const auto op = rk_op<decltype(red_edit_bwd_cpu)>("red_kernels_C::red_edit_bwd");
    auto [gh, gs, gb] = op.call(grads[0], saved_or_none(saved[0]), saved_or_none(saved[1]), need_h,
                                need_scale, need_bias, param_dtype);
    return {take_grad(need_h, gh), take_grad(need_scale, gs), take_grad(need_bias, gb)};
  }
};

at::Tensor red_edit_autograd(const at::Tensor& h, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& bias) {
  return REDEditFunction::apply(h, scale, bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(red_kernels_C, m) {
  // Fake (meta) impls for torch.compile and opcheck live in this Python module.
  m.set_python_module("red_kernels.ops.red_edit");
  m.def("red_edit(Tensor h, Tensor? scale, Tensor? bias) -> Tensor");
  m.def(
      "red_edit_bwd(Tensor grad_out, Tensor? h, Tensor? scale, bool need_h, bool need_scale, "
      "bool need_bias, ScalarType param_dtype) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(red_kernels_C, CPU, m) {
  m.impl("red_edit", &red_edit_fwd_cpu);
  m.impl("red_edit_bwd", &red_edit_bwd_cpu);
}

TORCH_LIBRARY_IMPL(red_kernels_C, Autograd, m) { m.impl("red_edit", &red_edit_autograd); }

}  // namespace red_kernels
