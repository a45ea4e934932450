// Runtime choice of the CPU instruction set for the hot loops.
//
// The extension is compiled for the baseline x86-64 ISA (SSE2) so it runs everywhere; the row
// kernels are compiled a second time under `#pragma GCC target("avx2,fma,f16c")` (see
// RK_BEGIN_AVX2 / RK_END_AVX2) and chosen at run time when the CPU has those extensions. Set
// RED_KERNELS_CPU_ISA=base to force the baseline path (the tests run both).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define RK_HAVE_AVX2_PATH 1
#define RK_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define RK_END_AVX2 _Pragma("GCC pop_options")
#else
#define RK_HAVE_AVX2_PATH 0
#endif

// Call fn from namespace avx2 or base (both built from one .inc file) depending on the CPU.
// Template arguments inside fn are separated with RK_COMMA.
#define RK_COMMA ,
#if RK_HAVE_AVX2_PATH
#define RK_ISA_CALL(fn, ...) \
  (::red_kernels::cpu_use_avx2() ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define RK_ISA_CALL(fn, ...) base::fn(__VA_ARGS__)
#endif

namespace red_kernels {

inline bool cpu_use_avx2() {
#if RK_HAVE_AVX2_PATH
  static const bool use = [] {
    const char* isa = std::getenv("RED_KERNELS_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "base") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return use;
#else
  return false;
#endif
}

}  // namespace red_kernels
