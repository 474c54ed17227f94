// The instruction-set level of the CPU kernels' hot loops, chosen once when the library loads.
//
// x86-64 with GCC or Clang: the loops in cpu_common.h are compiled three times (arch=x86-64-v4 "avx512",
// arch=x86-64-v3 "avx2", and the baseline "default") and every call dispatches on cpu_isa(). The level is
// FPL_FAST_CPU_ISA (avx512 | avx2 | default), else ATEN_CPU_CAPABILITY (the same names, so one variable
// steers torch too), else the best the CPU supports; a request above what the CPU supports is clamped down
// to the best it does, and an unknown value warns once on stderr and takes the best supported. Elsewhere,
// or with FPL_FAST_NO_CLONES defined, the loops are compiled once and the level is always "default".
#pragma once

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(FPL_FAST_NO_CLONES)
#define FPL_CPU_MULTI_ISA 1
#else
#define FPL_CPU_MULTI_ISA 0
#endif

namespace fpl_fast {
namespace cpu {

enum class CpuIsa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// Reads the environment and the CPU; warns on an unknown value. Called once, by cpu_isa() (cpu_isa.cpp).
CpuIsa choose_cpu_isa();

// The level in use (fixed for the life of the process).
inline CpuIsa cpu_isa() {
  static const CpuIsa level = choose_cpu_isa();
  return level;
}

// "avx512", "avx2" or "default".
inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace cpu
}  // namespace fpl_fast
