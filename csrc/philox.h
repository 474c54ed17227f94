// Philox4x32-10 counter-based RNG + Box-Muller, shared by the CPU and CUDA kernels.
//
// The stream is part of the ops' contract (fpl_fast/ops/reference/philox.py implements the same in plain
// PyTorch): normal number j (0-based) of a call with (seed, offset) comes from counter c = offset + j / 4,
// key = (lo32(seed), hi32(seed)), ctr = (lo32(c), hi32(c), 0, 0); the four 32-bit outputs x0..x3 give
// two Box-Muller pairs (x0, x1) -> (z0, z1), (x2, x3) -> (z2, z3), and j takes z[j % 4].
// The normals are defined by Box-Muller in double, rounded to float (what this header and the reference do):
//   u1 = (x0 + 1) * 2^-32 in (0, 1],  u2 = x1 * 2^-32,  r = sqrt(-2 ln u1),
//   z0 = r cos(2 pi u2),  z1 = r sin(2 pi u2).
// Precision per backend: CUDA and the CPU's double paths (cpu_common.h's fill_normals: dp_lowrank_clip_noise,
// and dp_output_clip_noise in float64) give these floats but for rounding ties. dp_output_clip_noise's CPU
// kernel in float32 / half / bfloat16 runs Box-Muller in float32 (cpu/box_muller_f32.h) in its vector chunks:
// within a few float ulps, |z - z_ref| <= 4e-6 max(1, |z|) as tested (about 2.4e-7 measured), with the same
// tail (max |z| = sqrt(64 ln 2) at x0 = 0); same Philox words, so the same stream up to that rounding.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FPL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FPL_HOST_DEVICE inline
#endif

namespace fpl_fast {

struct PhiloxOut {
  uint32_t x[4];
};

FPL_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

FPL_HOST_DEVICE PhiloxOut philox4x32_10(uint64_t counter, uint64_t seed) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c0, &hi0, &lo0);
    philox_mulhilo(kM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  PhiloxOut out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// Two standard normals from two 32-bit words (see the header comment).
FPL_HOST_DEVICE void box_muller(uint32_t a, uint32_t b, double* z0, double* z1) {
  constexpr double kTwoPow32Inv = 2.3283064365386963e-10;  // 2^-32
  constexpr double kTwoPi = 6.283185307179586;
  const double u1 = (static_cast<double>(a) + 1.0) * kTwoPow32Inv;
  const double u2 = static_cast<double>(b) * kTwoPow32Inv;
  const double r = sqrt(-2.0 * log(u1));
  *z0 = r * cos(kTwoPi * u2);
  *z1 = r * sin(kTwoPi * u2);
}

// Normal number j of the (seed, offset) stream.
FPL_HOST_DEVICE float philox_normal(uint64_t seed, uint64_t offset, uint64_t j) {
  const PhiloxOut o = philox4x32_10(offset + j / 4, seed);
  const int lane = static_cast<int>(j % 4);
  double z0, z1;
  if (lane < 2) {
    box_muller(o.x[0], o.x[1], &z0, &z1);
  } else {
    box_muller(o.x[2], o.x[3], &z0, &z1);
  }
  return static_cast<float>((lane % 2 == 0) ? z0 : z1);
}

// Four consecutive normals j = 4 * q .. 4 * q + 3 (one Philox call).
FPL_HOST_DEVICE void philox_normal4(uint64_t seed, uint64_t offset, uint64_t q, float out[4]) {
  const PhiloxOut o = philox4x32_10(offset + q, seed);
  double z0, z1, z2, z3;
  box_muller(o.x[0], o.x[1], &z0, &z1);
  box_muller(o.x[2], o.x[3], &z2, &z3);
  out[0] = static_cast<float>(z0);
  out[1] = static_cast<float>(z1);
  out[2] = static_cast<float>(z2);
  out[3] = static_cast<float>(z3);
}

}  // namespace fpl_fast
