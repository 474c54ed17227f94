// Chooses the CPU kernels' instruction-set level once, at load (see cpu_isa.h for the rules).
#include "cpu_isa.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace fpl_fast {
namespace cpu {
namespace {

#if FPL_CPU_MULTI_ISA
// The best level this CPU runs: all of x86-64-v4 (resp. v3), which is what the variants are compiled for.
CpuIsa best_supported() {
  __builtin_cpu_init();
#if !defined(__clang__) && __GNUC__ >= 12
  if (__builtin_cpu_supports("x86-64-v4")) return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return CpuIsa::kAvx2;
#else
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  if (v4) return CpuIsa::kAvx512;
  if (v3) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kDefault;
}
#endif

}  // namespace

CpuIsa choose_cpu_isa() {
#if FPL_CPU_MULTI_ISA
  const CpuIsa best = best_supported();
  const char* var = "FPL_FAST_CPU_ISA";
  const char* value = std::getenv(var);
  if (value == nullptr || *value == '\0') {
    var = "ATEN_CPU_CAPABILITY";
    value = std::getenv(var);
  }
  if (value == nullptr || *value == '\0') return best;
  CpuIsa want;
  if (std::strcmp(value, "avx512") == 0) {
    want = CpuIsa::kAvx512;
  } else if (std::strcmp(value, "avx2") == 0) {
    want = CpuIsa::kAvx2;
  } else if (std::strcmp(value, "default") == 0) {
    want = CpuIsa::kDefault;
  } else {
    std::fprintf(stderr,
                 "fpl_fast: %s=\"%s\" is not a CPU ISA level (allowed: avx512, avx2, default); using %s, the "
                 "best this CPU supports\n",
                 var, value, cpu_isa_name(best));
    return best;
  }
  return static_cast<int>(want) <= static_cast<int>(best) ? want : best;
#else
  return CpuIsa::kDefault;
#endif
}

namespace {
// Decide (and warn, if need be) when the library loads, not at the first kernel call.
[[maybe_unused]] const CpuIsa kChosenAtLoad = cpu_isa();
}  // namespace

}  // namespace cpu
}  // namespace fpl_fast
