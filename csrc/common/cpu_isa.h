// Runtime choice of the CPU instruction set for the hot loops.
//
// The extension is compiled for the baseline x86-64 ISA (SSE2) so it runs everywhere; the row
// kernels (csrc/<op>/<op>_cpu_kernels.inc) are compiled twice more, under
// `#pragma GCC target("avx2,fma,f16c")` (RK_BEGIN_AVX2 / RK_END_AVX2, namespace avx2) and under
// an AVX-512 target (RK_BEGIN_AVX512 / RK_END_AVX512, namespace avx512: F/BW/VL/DQ with FMA and
// F16C, 512-bit vectors preferred), all three by common/isa_namespaces.inc, and RK_ISA_CALL picks
// the widest one the CPU supports.
// RED_KERNELS_CPU_ISA=base|avx2|avx512 forces one (the tests run every one the CPU supports); a
// request the CPU cannot run falls back to the widest it can (cpu_isa_name() says which runs), any
// other value is an error. Python: red_kernels._C.cpu_isa(), cpu_isa_supported(), _set_cpu_isa().
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define RK_HAVE_AVX2_PATH 1
#define RK_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define RK_END_AVX2 _Pragma("GCC pop_options")
// GCC's generic tuning keeps auto-vectorised loops at 256 bits even when AVX-512 is enabled;
// prefer-vector-width=512 lets the memory-bound row loops use zmm registers.
#define RK_HAVE_AVX512_PATH 1
#define RK_BEGIN_AVX512                \
  _Pragma("GCC push_options") _Pragma( \
      "GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512\")")
#define RK_END_AVX512 _Pragma("GCC pop_options")
#else
#define RK_HAVE_AVX2_PATH 0
#define RK_HAVE_AVX512_PATH 0
#endif

namespace red_kernels {

enum class CpuIsa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest row-kernel build this CPU can run.
inline CpuIsa cpu_isa_supported() {
#if RK_HAVE_AVX2_PATH
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    return avx512 ? CpuIsa::kAvx512 : avx2 ? CpuIsa::kAvx2 : CpuIsa::kBase;
  }();
  return isa;
#else
  return CpuIsa::kBase;
#endif
}

// RED_KERNELS_CPU_ISA if set (capped at what the CPU supports), else the widest supported.
// Throws on a value other than base, avx2, avx512 or empty.
inline CpuIsa cpu_isa_from_env() {
  const CpuIsa best = cpu_isa_supported();
  const char* v = std::getenv("RED_KERNELS_CPU_ISA");
  if (v == nullptr || v[0] == '\0') return best;
  CpuIsa want = best;
  if (std::strcmp(v, "base") == 0) {
    want = CpuIsa::kBase;
  } else if (std::strcmp(v, "avx2") == 0) {
    want = CpuIsa::kAvx2;
  } else if (std::strcmp(v, "avx512") == 0) {
    want = CpuIsa::kAvx512;
  } else {
    TORCH_CHECK(false, "red_kernels: RED_KERNELS_CPU_ISA must be base, avx2 or avx512, got '", v,
                "'");
  }
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

// The build the kernels run; -1 until the first call reads the environment. An atomic rather than
// a function-local constant so that set_cpu_isa can switch builds in one process (benchmarks).
inline std::atomic<int>& cpu_isa_slot() {
  static std::atomic<int> slot{-1};
  return slot;
}

inline CpuIsa cpu_isa() {
  int v = cpu_isa_slot().load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(cpu_isa_from_env());
    cpu_isa_slot().store(v, std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(v);
}

// Switch the build the kernels run (capped at what the CPU supports); returns the one now chosen.
inline CpuIsa set_cpu_isa(CpuIsa want) {
  const CpuIsa best = cpu_isa_supported();
  const CpuIsa isa = static_cast<int>(want) < static_cast<int>(best) ? want : best;
  cpu_isa_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return isa;
}

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "base";
  }
}

}  // namespace red_kernels

// Call fn from namespace avx512, avx2 or base (all built from one .inc file) depending on
// cpu_isa(). Template arguments inside fn are separated with RK_COMMA.
#define RK_COMMA ,
#if RK_HAVE_AVX512_PATH
#define RK_ISA_CALL(fn, ...)                                                            \
  (::red_kernels::cpu_isa() == ::red_kernels::CpuIsa::kAvx512 ? avx512::fn(__VA_ARGS__) \
   : ::red_kernels::cpu_isa() == ::red_kernels::CpuIsa::kAvx2 ? avx2::fn(__VA_ARGS__)   \
                                                              : base::fn(__VA_ARGS__))
#else
#define RK_ISA_CALL(fn, ...) base::fn(__VA_ARGS__)
#endif
