// torch's CPU standard normal (torch.randn / normal_ on a contiguous float32 tensor of >= 16 values, with
// a generator from torch.Generator().manual_seed(seed)), value for value, ~3x faster.
//
// torch draws one uniform per value from its mt19937 (ATen/core/MT19937RNGEngine.h; u = (y & (2^24 - 1))
// * 2^-24, ATen/core/TransformationHelper.h), all of them first, then applies Box-Muller to each whole
// 16-value chunk (pairs 8 apart: ATen/native/cpu/DistributionTemplates.h, NormalFill16<float> on AVX2,
// with log256_ps and sincos256_ps of ATen/native/cpu/avx_mathfun.h); when n % 16 != 0 it draws 16 more
// uniforms into the last 16 values and transforms them. Here the generator is the same mt19937 with the
// state regenerated in vectorizable loops and no call per value, the uniforms of a piece are transformed
// while in L1, and the transform is ATen's own (the header is included from torch, not copied), compiled
// with the flags of torch's AVX2 kernels. adre_ray/smoothing/torch_cpu_normal.py loads it only after a
// check that it gives torch's values on this machine.
#include <ATen/native/cpu/avx_mathfun.h>
#include <stdint.h>

namespace {
constexpr int N = 624, M = 397;
constexpr uint32_t MATRIX_A = 0x9908b0dfu, UMASK = 0x80000000u, LMASK = 0x7fffffffu;

struct Mt19937 {
  uint32_t state[N];
  int32_t next;  // index in state of the next output; N: regenerate first
};

inline uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & UMASK) | (v & LMASK)) >> 1) ^ ((v & 1u) ? MATRIX_A : 0u);
}

void regenerate(uint32_t* __restrict p) {
  for (int i = 0; i < N - M; ++i) p[i] = p[i + M] ^ twist(p[i], p[i + 1]);
  for (int i = N - M; i < N - 1; ++i) p[i] = p[i + M - N] ^ twist(p[i], p[i + 1]);
  p[N - 1] = p[M - 1] ^ twist(p[N - 1], p[0]);
}

// The generator's next `count` outputs as torch's uniform floats in [0, 1).
void uniforms(Mt19937* g, float* __restrict out, int64_t count) {
  while (count > 0) {
    if (g->next == N) {
      regenerate(g->state);
      g->next = 0;
    }
    const int64_t take = N - g->next < count ? N - g->next : count;
    const uint32_t* __restrict s = g->state + g->next;
    for (int64_t i = 0; i < take; ++i) {
      uint32_t y = s[i];
      y ^= (y >> 11);
      y ^= (y << 7) & 0x9d2c5680u;
      y ^= (y << 15) & 0xefc60000u;
      y ^= (y >> 18);
      out[i] = (float)(y & 0xffffffu) * (1.0f / 16777216.0f);
    }
    g->next += (int32_t)take;
    out += take;
    count -= take;
  }
}

// NormalFill16<float> (AVX2) with mean 0 and std 1: d[j], d[j + 8] <- r cos t, r sin t for
// r = sqrt(-2 log(1 - d[j])), t = 2 pi d[j + 8], j < 8.
inline void box_muller16(float* d) {
  const __m256 two_pi = _mm256_set1_ps(2.0f * 3.14159265358979323846);
  const __m256 one = _mm256_set1_ps(1.0f), minus_two = _mm256_set1_ps(-2.0f);
  const __m256 mean = _mm256_set1_ps(0.0f), stdv = _mm256_set1_ps(1.0f);
  const __m256 u1 = _mm256_sub_ps(one, _mm256_loadu_ps(d));
  const __m256 u2 = _mm256_loadu_ps(d + 8);
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, log256_ps(u1)));
  const __m256 theta = _mm256_mul_ps(two_pi, u2);
  __m256 sin_theta, cos_theta;
  sincos256_ps(theta, &sin_theta, &cos_theta);
  _mm256_storeu_ps(d, _mm256_fmadd_ps(_mm256_mul_ps(radius, cos_theta), stdv, mean));
  _mm256_storeu_ps(d + 8, _mm256_fmadd_ps(_mm256_mul_ps(radius, sin_theta), stdv, mean));
}

constexpr int64_t PIECE = 1024;  // values drawn, then transformed while still in L1
}  // namespace

extern "C" {
int64_t adre_mt19937_bytes() { return sizeof(Mt19937); }

// torch's mt19937_engine(seed): only the low 32 bits of the seed enter the state.
void adre_mt19937_seed(Mt19937* g, uint64_t seed) {
  g->state[0] = (uint32_t)(seed & 0xffffffffu);
  for (int j = 1; j < N; ++j) g->state[j] = 1812433253u * (g->state[j - 1] ^ (g->state[j - 1] >> 30)) + j;
  g->next = N;
}

// out[0, n) <- torch.randn(n) from the generator's current position; 1 (nothing drawn) if n < 16.
int adre_normal_fill(Mt19937* g, float* out, int64_t n) {
  if (n < 16) return 1;
  const int64_t whole = n / 16 * 16;
  for (int64_t done = 0; done < whole;) {
    const int64_t piece = whole - done < PIECE ? whole - done : PIECE;
    uniforms(g, out + done, piece);
    for (int64_t i = 0; i < piece; i += 16) box_muller16(out + done + i);
    done += piece;
  }
  if (n > whole) {  // torch drew these uniforms too, then overwrites the last 16 values with fresh ones
    uniforms(g, out + whole, n - whole);
    uniforms(g, out + n - 16, 16);
    box_muller16(out + n - 16);
  }
  return 0;
}
}
