// Shared helpers for every op family: host/device inline marker, accumulation types, small
// integer helpers. Host-only tensor checks live in checks.h so this header stays CUDA-device safe.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RK_HD __host__ __device__ __forceinline__
#else
#define RK_HD inline
#endif

namespace red_kernels {

// Accumulation type: fp64 stays fp64 (gradcheck), everything else accumulates in fp32.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

RK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Turn a run-time flag into a compile-time one: f(std::true_type{}) or f(std::false_type{}), so a
// kernel template can drop the work for a gradient nobody needs.
template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace red_kernels
