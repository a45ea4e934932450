// Output allocation for the CPU kernels.
//
// On CPU, writing a freshly allocated multi-MB tensor spends most of its time in 4 KiB page faults
// (measured here: h.clone() of 64 MB takes ~17-22 ms, a copy into already-faulted memory ~3 ms).
// Asking the kernel for transparent huge pages on the new range before its first touch cuts the
// faults 512x. torch does the same for every CPU allocation when THP_MEM_ALLOC_ENABLE=1; here it is
// applied to the large outputs of red_kernels ops only. It is advice: a no-op where THP is
// disabled, off Linux, and for other devices.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace red_kernels {

inline bool huge_page_advice_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("RED_KERNELS_NO_HUGE_PAGES");
    return v == nullptr || v[0] == '\0' || v[0] == '0';
  }();
  return enabled;
}

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  if (!t.is_cpu() || t.nbytes() < 4 * kHuge || !huge_page_advice_enabled()) return;
  const auto begin = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t start = (begin + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t end = (begin + t.nbytes()) & ~(kHuge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// A contiguous output tensor; large CPU outputs are advised onto huge pages before first touch.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(t);
  return t;
}

}  // namespace red_kernels
