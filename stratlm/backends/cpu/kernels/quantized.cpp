// x @ dequantize(w, scales, biases).T for MLX's affine-quantized weights, on the CPU, as an MLX
// Primitive (lazy, in the graph, run by the CPU stream's command encoder).
//
// Few activation rows (decode): the packed weights are read once and converted in registers;
// with s, b the group scale and bias, out[n] = sum_g s*dot(q, x_g) + b*sum(x_g). AVX-512 and
// AVX2+FMA versions are chosen at run time, with a portable fallback. Output rows are split
// over a small persistent thread pool.
// Many rows (prefill): tiles of the weights are dequantized into an fp32 scratch and handed to
// cblas_sgemm, found at run time (OpenBLAS, or stratlm's shim, when stratlm loaded them).
//
// Built and cached at first use by stratlm/core/kernels/__init__.py.
#include <dlfcn.h>
#include <time.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/allocator.h"
#include "mlx/ops.h"
#include "mlx/stream.h"
#include "mlx/transforms.h"
#include "mlx/primitives.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SQ_X86 1
#else
#define SQ_X86 0
#endif

#define SQ_INLINE inline __attribute__((always_inline))

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

struct Problem {
  const float* x;     // M x K activations, row-major
  const uint32_t* w;  // N x K*bits/32 packed weights
  const float* s;     // N x G scales
  const float* b;     // N x G biases
  float* out;         // M x N
  int M, N, K, G, gs, bits;
  // Or the scales and biases as IEEE fp16 (s and b then unused): a GGUF's are fp16, and fp32
  // copies are a sixth of a 4-bit model's bytes a token. The direct float kernels read them;
  // the other paths get fp32 copies (with_fp32_scales).
  const uint16_t* s16 = nullptr;
  const uint16_t* b16 = nullptr;
};

// biases from either form, as the kernels' templates take them
static SQ_INLINE const float* biases_of(const Problem& p, const float*) { return p.b; }
static SQ_INLINE const uint16_t* biases_of(const Problem& p, const uint16_t*) { return p.b16; }

// Activations quantized to int8 per block of 32 (the int8 path): q the values in the kernel's
// layout (Q8Layout), d the block scales (x ~ d * q), xs the exact fp32 sums of x per weight
// group (the bias term), dv the block scales spread over the lanes of the 512-bit kernel.
struct Q8Act {
  const int8_t* q;
  const float* d;
  const float* xs;
  const float* dv;
};
// NATURAL: x's order; SPLIT: each block's 16 even then 16 odd positions (the low and high
// nibbles of 16 packed bytes); PAIR: two blocks j, j+1 as [j even, j+1 even, j odd, j+1 odd]
// (a trailing odd block SPLIT)
enum Q8Layout { NATURAL = 0, SPLIT = 1, PAIR = 2 };

// most activation rows the direct kernel takes per pass over the weights (clamped to the
// ISA's MB_MAX; more rows are done in passes of balanced sizes); a tuning knob
static std::atomic<int> g_pass_rows{16};
static int pass_rows() { return g_pass_rows.load(std::memory_order_relaxed); }

// ---------------------------------------------------------------- prefetching
// A decode step's weights are cold (a model is larger than the caches), and one output row's
// weights, scales and biases are only a few cache lines each: streams too short for the hardware
// prefetcher, so a row loop waits on memory at every row. The loops below ask for the rows
// PREFETCH_BYTES of packed weights ahead of the ones they read (a tuning knob for benchmarks).
static constexpr int PREFETCH_BYTES = 8192;
static std::atomic<bool> g_prefetch{true};

// Toward L2 (prefetcht1), not L1: prefetches into L1 filled its few miss buffers and stalled the
// loops' own loads (measured: docs/benchmarks.md, CPU session 5); a line moves from L2 to L1 in a
// few cycles when the loop reaches it.
static SQ_INLINE void prefetch_span(const void* begin, const void* end) {
  for (const char* a = static_cast<const char*>(begin); a < static_cast<const char*>(end); a += 64)
#if SQ_X86
    asm volatile("prefetcht1 %0" : : "m"(*a));  // (GCC 12 dropped the builtin here, inlined into the ISA loops)
#else
    __builtin_prefetch(a, 0, 2);
#endif
}

// Output rows [n0, n1)'s packed weights, scales and biases, toward L2.
static SQ_INLINE void prefetch_rows(const Problem& p, int n0, int n1) {
  if (n0 >= n1) return;
  const size_t row_bytes = (size_t)p.K * p.bits / 8;
  const char* w = reinterpret_cast<const char*>(p.w);
  prefetch_span(w + n0 * row_bytes, w + n1 * row_bytes);
  if (p.s16 != nullptr) {
    prefetch_span(p.s16 + (size_t)n0 * p.G, p.s16 + (size_t)n1 * p.G);
    prefetch_span(p.b16 + (size_t)n0 * p.G, p.b16 + (size_t)n1 * p.G);
  } else {
    prefetch_span(p.s + (size_t)n0 * p.G, p.s + (size_t)n1 * p.G);
    prefetch_span(p.b + (size_t)n0 * p.G, p.b + (size_t)n1 * p.G);
  }
}

// For a loop over output rows [n, end) in steps of `step` rows: at the start, the first rows
// (a chunk's streams start cold); then at each step, the step's worth of rows `ahead` further on.
struct RowPrefetch {
  const Problem& p;
  int step, end, ahead;
  RowPrefetch(const Problem& problem, int n, int end_row, int step_rows) : p(problem), step(step_rows), end(end_row) {
    const int row_bytes = std::max(1, problem.K * problem.bits / 8);
    ahead = std::max(step, PREFETCH_BYTES / row_bytes / step * step);
    on = g_prefetch.load(std::memory_order_relaxed);
    if (on) prefetch_rows(p, n, std::min(n + ahead, end));
  }
  SQ_INLINE void at(int n) const {
    if (on) prefetch_rows(p, std::min(n + ahead, end), std::min(n + ahead + step, end));
  }
  bool on;
};

// ---------------------------------------------------------------- portable fallback
namespace generic {
static void rows(const Problem& p, const float*, const float*, int n0, int n1) {
  const int KW = p.K * p.bits / 32, per = 32 / p.bits;
  const uint32_t mask = (1u << p.bits) - 1;
  std::vector<float> wrow(p.K);
  for (int n = n0; n < n1; ++n) {
    for (int k = 0; k < p.K; ++k) {
      uint32_t q = (p.w[(size_t)n * KW + k / per] >> (p.bits * (k % per))) & mask;
      size_t g = (size_t)n * p.G + k / p.gs;
      wrow[k] = p.s[g] * (float)q + p.b[g];
    }
    for (int m = 0; m < p.M; ++m) {
      const float* x = p.x + (size_t)m * p.K;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int k = 0; k < p.K; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += wrow[k + j] * x[k + j];
      float t = 0;
      for (int j = 0; j < 8; ++j) t += acc[j];
      p.out[(size_t)m * p.N + n] = t;
    }
  }
}
}  // namespace generic

// ---------------------------------------------------------------- AVX2 + FMA
#if SQ_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif
namespace avx2 {
constexpr int L = 8;
constexpr int NREG = 16;
constexpr int MB_MAX = 4;
using vf = __m256;
static inline vf vzero() { return _mm256_setzero_ps(); }
static SQ_INLINE void in_register(vf& v) { asm volatile("" : "+x"(v)); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vreduce(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// out[i] = the sum of v[i]'s lanes, i < n: a transposing tree, 7 adds for 8 sums
template <int n>
static SQ_INLINE void vreduce_n(const vf* v, float* out) {
  if constexpr (n <= 2) {
    for (int i = 0; i < n; ++i) out[i] = vreduce(v[i]);
  } else {
    vf t[8];
    for (int i = 0; i < 8; ++i) t[i] = i < n ? v[i] : _mm256_setzero_ps();
    vf u[4];
    for (int i = 0; i < 4; ++i)  // u[i]: v[2i] (low half) and v[2i+1] (high), 4 lanes each
      u[i] = _mm256_add_ps(_mm256_permute2f128_ps(t[2 * i], t[2 * i + 1], 0x20),
                           _mm256_permute2f128_ps(t[2 * i], t[2 * i + 1], 0x31));
    vf w0 = _mm256_add_ps(_mm256_shuffle_ps(u[0], u[1], 0x44), _mm256_shuffle_ps(u[0], u[1], 0xEE));
    vf w1 = _mm256_add_ps(_mm256_shuffle_ps(u[2], u[3], 0x44), _mm256_shuffle_ps(u[2], u[3], 0xEE));
    vf r = _mm256_add_ps(_mm256_shuffle_ps(w0, w1, 0x88), _mm256_shuffle_ps(w0, w1, 0xDD));
    alignas(32) float buf[8];  // lane 4h + j holds the sum of v[2j + h]
    _mm256_store_ps(buf, r);
    for (int i = 0; i < n; ++i) out[i] = buf[(i & 1) * 4 + (i >> 1)];
  }
}
static inline vf vbias(vf acc, const float* b, const float* xs, int G) {
  int g = 0;
  for (; g + L <= G; g += L) acc = _mm256_fmadd_ps(_mm256_loadu_ps(b + g), _mm256_loadu_ps(xs + g), acc);
  if (g < G) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(G - g), idx);
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(b + g, m), _mm256_maskload_ps(xs + g, m), acc);
  }
  return acc;
}
// the same sums with fp16 biases (exact in fp32: the same products, the same order)
static inline vf vbias(vf acc, const uint16_t* b, const float* xs, int G) {
  int g = 0;
  for (; g + L <= G; g += L)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + g))), _mm256_loadu_ps(xs + g), acc);
  if (g < G) {
    alignas(16) uint16_t tail[L] = {};
    std::memcpy(tail, b + g, (size_t)(G - g) * sizeof(uint16_t));
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(G - g), idx);
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tail))), _mm256_maskload_ps(xs + g, m), acc);
  }
  return acc;
}
static inline void halves(const uint16_t* h, float* out, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(h[i]);
}
template <int BITS>
static inline vf unpack(const uint32_t* w);
template <>
inline vf unpack<4>(const uint32_t* w) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w[0]), shifts), _mm256_set1_epi32(15));
  return _mm256_cvtepi32_ps(q);
}
template <>
inline vf unpack<8>(const uint32_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)w)));
}
#include "quantized_kernel.h"

// natural-order dequantization of rows [n0, n1) into dst (n1-n0) x K, for the GEMM path
static void dequant_rows(const Problem& p, int n0, int n1, float* dst) {
  const int KW = p.K * p.bits / 32;
  const int gs = p.gs;
  for (int n = n0; n < n1; ++n) {
    const uint32_t* w = p.w + (size_t)n * KW;
    float* d = dst + (size_t)(n - n0) * p.K;
    for (int g = 0; g < p.G; ++g) {
      vf s = vset1(p.s[(size_t)n * p.G + g]), b = vset1(p.b[(size_t)n * p.G + g]);
      for (int k = g * gs; k < (g + 1) * gs; k += 8) {
        vf q = p.bits == 4 ? unpack<4>(w + k / 8) : unpack<8>(w + k / 4);
        _mm256_storeu_ps(d + k, _mm256_fmadd_ps(s, q, b));
      }
    }
  }
}

// int8 path: maddubs (u8 x s8 -> pairs summed to int16: 15 * 127 * 2 fits) then madd
static SQ_INLINE __m256i dot4(const uint8_t* wp, __m256i x) {
  __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp));
  __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(w, 4), w), _mm256_set1_epi8(0x0F));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(wv, x), _mm256_set1_epi16(1));
}
// 8-bit weights go to 255 * 127 * 2, past int16: widen both to int16 and madd
static SQ_INLINE __m256i dot8(const uint8_t* wp, __m256i x) {
  __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  __m256i lo = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(w)), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(x)));
  __m256i hi = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(w, 1)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(x, 1)));
  return _mm256_add_epi32(lo, hi);
}
#include "q8_kernel.h"
}  // namespace avx2
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c"))), \
                             apply_to = function)
#endif
namespace avx512 {
constexpr int L = 16;
constexpr int NREG = 32;
constexpr int MB_MAX = 9;
using vf = __m512;
static inline vf vzero() { return _mm512_setzero_ps(); }
static SQ_INLINE void in_register(vf& v) { asm volatile("" : "+v"(v)); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vreduce(vf a) { return _mm512_reduce_add_ps(a); }
// out[i] = the sum of v[i]'s lanes, i < n: a transposing tree, 15 adds for 16 sums
template <int n>
static SQ_INLINE void vreduce_n(const vf* v, float* out) {
  if constexpr (n <= 2) {
    for (int i = 0; i < n; ++i) out[i] = vreduce(v[i]);
  } else {
    vf t[16];
    for (int i = 0; i < 16; ++i) t[i] = i < n ? v[i] : _mm512_setzero_ps();
    vf u[8], w[4], y[2];
    for (int i = 0; i < 8; ++i)  // u[i]: v[2i] (256-bit half 0), v[2i+1] (half 1), 8 lanes each
      u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)  // w[i]: 128-bit block c holds v[4i + c], 4 lanes
      w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)  // y[i], block c: v[8i + c] x2, v[8i + 4 + c] x2
      y[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44),
                           _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
    vf r = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
    alignas(64) float buf[16];  // lane 4c + j holds the sum of v[4j + c]
    _mm512_store_ps(buf, r);
    for (int i = 0; i < n; ++i) out[i] = buf[(i & 3) * 4 + (i >> 2)];
  }
}
static inline vf vbias(vf acc, const float* b, const float* xs, int G) {
  int g = 0;
  for (; g + L <= G; g += L) acc = _mm512_fmadd_ps(_mm512_loadu_ps(b + g), _mm512_loadu_ps(xs + g), acc);
  if (g < G) {
    __mmask16 m = (__mmask16)((1u << (G - g)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, b + g), _mm512_maskz_loadu_ps(m, xs + g), acc);
  }
  return acc;
}
// the same sums with fp16 biases (exact in fp32: the same products, the same order)
static inline vf vbias(vf acc, const uint16_t* b, const float* xs, int G) {
  int g = 0;
  for (; g + L <= G; g += L)
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + g))), _mm512_loadu_ps(xs + g), acc);
  if (g < G) {
    __mmask16 m = (__mmask16)((1u << (G - g)) - 1);
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, b + g)), _mm512_maskz_loadu_ps(m, xs + g), acc);
  }
  return acc;
}
static inline void halves(const uint16_t* h, float* out, int n) {
  int i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)));
  }
}
template <int BITS>
static inline vf unpack(const uint32_t* w);
// 4 bits: two packed words broadcast to every 64-bit lane (w0 w1 w0 w1 ...); lane l keeps
// nibble l/2 of word l%2 in place (no shift): q * 16^(l/2). The x lane it meets is
// x[8*(l%2) + l/2] * 16^-(l/2) (prepare_x4), and the product is exactly q * x.
template <>
inline vf unpack<4>(const uint32_t* w) {
  const __m512i mask = _mm512_setr_epi32(0xF, 0xF, 0xF0, 0xF0, 0xF00, 0xF00, 0xF000, 0xF000, 0xF0000, 0xF0000,
                                         0xF00000, 0xF00000, 0xF000000, 0xF000000, (int)0xF0000000u,
                                         (int)0xF0000000u);
  long long pair;
  std::memcpy(&pair, w, sizeof pair);
  return _mm512_cvtepu32_ps(_mm512_and_si512(_mm512_set1_epi64(pair), mask));
}
template <>
inline vf unpack<8>(const uint32_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w)));
}
#include "quantized_kernel.h"

// natural-order dequantization of rows [n0, n1) into dst (n1-n0) x K, for the GEMM path
static void dequant_rows(const Problem& p, int n0, int n1, float* dst) {
  const int KW = p.K * p.bits / 32;
  const int gs = p.gs;
  const __m512i shifts4 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i pick4 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int n = n0; n < n1; ++n) {
    const uint32_t* w = p.w + (size_t)n * KW;
    float* d = dst + (size_t)(n - n0) * p.K;
    for (int g = 0; g < p.G; ++g) {
      vf s = vset1(p.s[(size_t)n * p.G + g]), b = vset1(p.b[(size_t)n * p.G + g]);
      for (int k = g * gs; k < (g + 1) * gs; k += 16) {
        __m512i qi;
        if (p.bits == 4) {
          __m512i pair = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i*)(w + k / 8)));
          qi = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(pick4, pair), shifts4), low4);
        } else {
          qi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + k / 4)));
        }
        _mm512_storeu_ps(d + k, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(qi), b));
      }
    }
  }
}
}  // namespace avx512
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-VNNI (256-bit, VEX)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avxvnni"))), apply_to = function)
#endif
namespace avxvnni {
// vpdpbusd: u8 x s8, four products summed into int32 (no int16 step, 8-bit weights fit too)
static SQ_INLINE __m256i dot4(const uint8_t* wp, __m256i x) {
  __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp));
  __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(w, 4), w), _mm256_set1_epi8(0x0F));
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wv, x);
}
static SQ_INLINE __m256i dot8(const uint8_t* wp, __m256i x) {
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp)), x);
}
#include "q8_kernel.h"
}  // namespace avxvnni
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-512 VNNI
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))), \
                             apply_to = function)
#endif
namespace avx512vnni {
static SQ_INLINE __m256i dot4(const uint8_t* wp, __m256i x) {
  __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp));
  __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(w, 4), w), _mm256_set1_epi8(0x0F));
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, x);
}
static SQ_INLINE __m256i dot8(const uint8_t* wp, __m256i x) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp)), x);
}
#include "q8_kernel.h"

static inline __m512 q8z_vbias(__m512 acc, const float* b, const float* xs, int G) {
  int g = 0;
  for (; g + 16 <= G; g += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(b + g), _mm512_loadu_ps(xs + g), acc);
  if (g < G) {
    __mmask16 mk = (__mmask16)((1u << (G - g)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, b + g), _mm512_maskz_loadu_ps(mk, xs + g), acc);
  }
  return acc;
}

// Two blocks per 512-bit step (PAIR layout for 4 bits, NATURAL for 8): int32 lane i sums
// bytes 4i..4i+3; a.dv holds each lane's block scale, idx picks each lane's weight scale.
template <int BITS, int GS, int R>
static void q8z_block(const Problem& p, const Q8Act& a, int n0, int m) {
  constexpr int SPG = GS / 32;
  constexpr int WB = 32 * BITS / 8;
  const int NB = p.K / 32, NP = NB / 2;
  const size_t row_bytes = (size_t)p.K * BITS / 8;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(p.w) + (size_t)n0 * row_bytes;
  const float* s = p.s + (size_t)n0 * p.G;
  const int8_t* xq = a.q + (size_t)m * p.K;
  const float* dv = a.dv + (size_t)m * NP * 16;
  const __m512i idx = BITS == 4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1)
                                : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int jp = 0; jp < NP; ++jp) {
    __m512i xv = _mm512_loadu_si512(xq + (size_t)jp * 64);
    __m512 dvv = _mm512_loadu_ps(dv + (size_t)jp * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * row_bytes + (size_t)jp * 2 * WB;
      __m512i wv;
      if constexpr (BITS == 4) {
        __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
        wv = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(y), _mm256_srli_epi16(y, 4), 1), low);
      } else {
        wv = _mm512_loadu_si512(wr);
      }
      __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
      const float* sr = s + (size_t)r * p.G;
      __m512 sv;
      if constexpr (GS == 32) {
        sv = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sr + 2 * jp)))));
      } else {
        sv = _mm512_set1_ps(sr[2 * jp / SPG]);  // both blocks of a pair share the group
      }
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dvv), sv, acc[r]);
    }
  }
  __m256 tail[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) tail[r] = _mm256_setzero_ps();
  if (NB % 2) q8_blocks256<BITS, GS, R>(p, a, n0, m, 2 * NP, tail);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    __m512 t = q8z_vbias(acc[r], p.b + (size_t)(n0 + r) * p.G, a.xs + (size_t)m * p.G, p.G);
    p.out[(size_t)m * p.N + n0 + r] = _mm512_reduce_add_ps(t) + q8_hsum(tail[r]);
  }
}

template <int BITS, int GS>
static void q8z_rows_bg(const Problem& p, const Q8Act& a, int n0, int n1) {
  constexpr int R = 4;
  int n = n0;
  const RowPrefetch ahead(p, n, n1, R);
  for (; n + R <= n1; n += R) {
    ahead.at(n);
    for (int m = 0; m < p.M; ++m) q8z_block<BITS, GS, R>(p, a, n, m);
  }
  for (; n < n1; ++n)
    for (int m = 0; m < p.M; ++m) q8z_block<BITS, GS, 1>(p, a, n, m);
}

static void q8z_rows(const Problem& p, const Q8Act& a, int n0, int n1) {
  if (p.bits == 4) {
    if (p.gs == 32) q8z_rows_bg<4, 32>(p, a, n0, n1);
    else if (p.gs == 64) q8z_rows_bg<4, 64>(p, a, n0, n1);
    else q8z_rows_bg<4, 128>(p, a, n0, n1);
  } else {
    if (p.gs == 32) q8z_rows_bg<8, 32>(p, a, n0, n1);
    else if (p.gs == 64) q8z_rows_bg<8, 64>(p, a, n0, n1);
    else q8z_rows_bg<8, 128>(p, a, n0, n1);
  }
}
}  // namespace avx512vnni
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#endif  // SQ_X86

static void dequant_rows_generic(const Problem& p, int n0, int n1, float* dst) {
  const int KW = p.K * p.bits / 32, per = 32 / p.bits;
  const uint32_t mask = (1u << p.bits) - 1;
  for (int n = n0; n < n1; ++n)
    for (int k = 0; k < p.K; ++k) {
      uint32_t q = (p.w[(size_t)n * KW + k / per] >> (p.bits * (k % per))) & mask;
      size_t g = (size_t)n * p.G + k / p.gs;
      dst[(size_t)(n - n0) * p.K + k] = p.s[g] * (float)q + p.b[g];
    }
}

// ---------------------------------------------------------------- ISA choice
// The float kernels use AVX-512 or AVX2; the int8 path uses AVX-512 VNNI (512-bit), AVX-VNNI
// (256-bit), or AVX2's maddubs. Chosen at run time from CPUID; set_isa forces a lesser one.
enum Isa { GENERIC = 0, AVX2 = 1, AVXVNNI = 2, AVX512 = 3, AVX512VNNI = 4, N_ISA = 5 };
static const char* const ISA_NAMES[N_ISA] = {"generic", "avx2", "avxvnni", "avx512", "avx512vnni"};

static bool cpu_has(int isa) {
#if SQ_X86
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  switch (isa) {
    case GENERIC: return true;
    case AVX2: return avx2;
    case AVXVNNI: return avx2 && __builtin_cpu_supports("avxvnni");
    case AVX512: return avx512;
    case AVX512VNNI: return avx512 && __builtin_cpu_supports("avx512vnni");
  }
  return false;
#else
  return isa == GENERIC;
#endif
}
static int detect_isa() {
  for (int isa = N_ISA - 1; isa > 0; --isa)
    if (cpu_has(isa)) return isa;
  return GENERIC;
}
static const int g_best_isa = detect_isa();
static std::atomic<int> g_isa{g_best_isa};
static const char* isa_name(int isa) { return ISA_NAMES[isa]; }
// which float kernels an ISA setting runs
static int float_isa(int isa) { return isa >= AVX512 ? AVX512 : isa >= AVX2 ? AVX2 : GENERIC; }

// the exact fp32 path (default) or int8 activations (STRATLM_KERNELS_EXACT=0, set_exact(false)):
// int8 rounding makes a row's result depend on its batch, so batch = solo needs the exact path
static bool env_exact() {
  const char* e = std::getenv("STRATLM_KERNELS_EXACT");
  if (e == nullptr) return true;
  std::string v(e);
  for (auto& c : v) c = (char)std::tolower((unsigned char)c);
  return !(v == "0" || v == "off" || v == "false" || v == "no");
}
static std::atomic<bool> g_exact{env_exact()};

// ---------------------------------------------------------------- thread pool
// A job is a number of chunks that the caller and the workers claim one at a time from one
// atomic word holding (generation, next chunk, chunk count), so a worker that is late or not
// scheduled at all (an oversubscribed machine) costs nothing: the caller takes the chunks it
// leaves, and waits only for chunks a worker has claimed. Workers spin briefly after a job
// (the next matmul of a decode step follows within microseconds), then sleep. One job at a
// time; a caller that finds the pool busy (another stream) runs its chunks itself.
class Pool {
 public:
  explicit Pool(int workers) : n_(workers) {
    for (int i = 0; i < n_; ++i) threads_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int size() const { return n_ + 1; }
  // Runs fn(0..chunks-1) in any order over the pool.
  void run(int chunks, const std::function<void(int)>& fn) {
    if (chunks <= 1 || chunks >= (1 << 20) || !busy_.try_lock()) {
      for (int i = 0; i < chunks; ++i) fn(i);
      return;
    }
    job_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & 0xFFFFFF;
    {
      std::lock_guard<std::mutex> lk(mu_);
      word_.store(pack(gen_, 0, chunks), std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    int mine = 0;
    for (int i; (i = claim(gen_)) >= 0; ++mine) fn(i);
    done_.fetch_add(mine, std::memory_order_acq_rel);
    for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 4096) pause();
      else std::this_thread::yield();
    }
    busy_.unlock();
  }

 private:
  static uint64_t pack(uint64_t gen, uint64_t next, uint64_t count) { return gen << 40 | count << 20 | next; }
  static inline void pause() {
#if SQ_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
  // the next chunk of generation gen, or -1 when none is left
  int claim(uint64_t gen) {
    uint64_t v = word_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t next = v & 0xFFFFF, count = (v >> 20) & 0xFFFFF;
      if ((v >> 40) != gen || next >= count) return -1;
      if (word_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire))
        return (int)next;
    }
  }
  void loop() {
    uint64_t seen = word_.load() >> 40;
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      uint64_t gen;
      for (int spins = 0; (gen = word_.load(std::memory_order_acquire) >> 40) == seen && !stop_.load(); ) {
        pause();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - t0 > spin_) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1);
          cv_.wait(lk, [&] { return (word_.load(std::memory_order_acquire) >> 40) != seen || stop_.load(); });
          sleepers_.fetch_sub(1);
        }
      }
      if (stop_.load()) return;
      seen = gen;
      int mine = 0;
      for (int i; (i = claim(gen)) >= 0; ++mine) (*job_)(i);
      if (mine) done_.fetch_add(mine, std::memory_order_acq_rel);
    }
  }
  int n_;
  std::vector<std::thread> threads_;
  std::mutex mu_, busy_;
  std::condition_variable cv_;
  std::atomic<uint64_t> word_{0};
  std::atomic<int> done_{0}, sleepers_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int)>* job_ = nullptr;
  uint64_t gen_ = 0;
  std::chrono::microseconds spin_{100};
};

static int default_threads() {
  if (const char* e = std::getenv("STRATLM_KERNEL_THREADS")) {
    int v = std::atoi(e);
    if (v > 0) return v;
  }
  // Every hardware thread of a small machine (on 2 vCPUs a second thread decodes ~25% faster
  // since the decode step became one op a block: docs/benchmarks.md); half of a larger one's,
  // at most 8, as SMT siblings share the FMA units these loops keep busy.
  unsigned hc = std::max(1u, std::thread::hardware_concurrency());
  return hc <= 2 ? (int)hc : (int)std::clamp(hc / 2, 2u, 8u);
}
static std::atomic<int> g_threads{default_threads()};
static std::mutex g_pool_mu;
static Pool* g_pool = nullptr;  // leaked at exit on purpose: joining threads in atexit can hang

static Pool* pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  int want = g_threads.load();
  if (want <= 1) return nullptr;
  if (g_pool == nullptr || g_pool->size() != want) {
    delete g_pool;
    g_pool = new Pool(want - 1);
  }
  return g_pool;
}

// ---------------------------------------------------------------- GEMM path
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                         int);
static sgemm_fn find_sgemm() { return (sgemm_fn)dlsym(RTLD_DEFAULT, "cblas_sgemm"); }
static std::atomic<int> g_chunks_per_thread{2};
static std::atomic<int> g_gemm_min_rows{0};  // a tuning knob; 0: gemm_min_rows() picks

// M at or above which the GEMM path (dequantized tiles, sgemm) is used. The direct kernels keep
// each weight tile in L1 for every row: AVX-512's (9 rows a pass) keep up with the GEMM path to
// ~128 rows, AVX2's (4 rows a pass) to ~48 (measured on SmolLM2's shapes, docs/benchmarks.md).
static int gemm_min_rows() {
  const int knob = g_gemm_min_rows.load(std::memory_order_relaxed);
  if (knob > 0) return knob;
  return float_isa(g_isa.load(std::memory_order_relaxed)) == AVX512 ? 128 : 48;
}

// ---------------------------------------------------------------- driver
// Output rows of one or more problems as one pool job: each problem's rows in chunks of whole
// 24-row blocks (every block height divides 24), g_chunks_per_thread per thread, when there is
// enough work; one job for several products of the same input (q/k/v, gate/up) waits once
// instead of per product. Few long chunks stream the weights best (each chunk's rows start cold);
// more than one per thread lets the others take over from a late worker. A tuning knob.
static void run_chunks(const Problem* ps, int n, const std::function<void(int, int, int)>& rows) {
  double work = 0;
  for (int j = 0; j < n; ++j) work += (double)ps[j].M * ps[j].N * ps[j].K;
  Pool* pl = work >= 64.0 * 1024 ? pool() : nullptr;
  struct Chunk { int j, n0, n1; };
  std::vector<Chunk> chunks;
  for (int j = 0; j < n; ++j) {
    const int N = ps[j].N;
    int chunk = pl ? std::max(48, (N / (g_chunks_per_thread.load(std::memory_order_relaxed) * pl->size()) + 23) / 24 * 24) : N;
    for (int n0 = 0; n0 < N; n0 += chunk) chunks.push_back({j, n0, std::min(N, n0 + chunk)});
  }
  if (pl == nullptr || chunks.size() <= 1) {
    for (auto& c : chunks) rows(c.j, c.n0, c.n1);
    return;
  }
  pl->run((int)chunks.size(), [&](int i) { rows(chunks[i].j, chunks[i].n0, chunks[i].n1); });
}

// fp16 -> fp32, n values (F16C where the CPU has it)
#if SQ_X86
__attribute__((target("avx,f16c"))) static void halves_f16c(const uint16_t* h, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(h[i]);
}
#endif
static float half_to_float(uint16_t h) {
  const int exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  const float v = exp == 0 ? std::ldexp((float)man, -24)  // zero, subnormal
                  : exp == 31 ? (man ? NAN : INFINITY)
                              : std::ldexp((float)(man | 0x400), exp - 25);
  return (h & 0x8000) ? -v : v;
}
static void halves_to_floats(const uint16_t* h, float* out, size_t n) {
#if SQ_X86
  static const bool f16c = __builtin_cpu_supports("f16c");
  if (f16c) return halves_f16c(h, out, n);
#endif
  for (size_t i = 0; i < n; ++i) out[i] = half_to_float(h[i]);
}

// fp32 copies of a problem's fp16 scales and biases, for the paths that read fp32 only (int8
// activations, the GEMM path, the portable kernel)
struct Fp32Scales {
  std::vector<float> s, b;
  Problem of(const Problem& p) {
    if (p.s16 == nullptr) return p;
    const size_t n = (size_t)p.N * p.G;
    s.resize(n);
    b.resize(n);
    halves_to_floats(p.s16, s.data(), n);
    halves_to_floats(p.b16, b.data(), n);
    Problem q = p;
    q.s = s.data();
    q.b = b.data();
    q.s16 = q.b16 = nullptr;
    return q;
  }
};

// x as the direct kernels read it: per-group sums, and the rows in the kernel's lane order
struct DirectInput {
  std::vector<float> xs, xbuf;
  const float* xk = nullptr;
};

static void prepare_direct(const Problem& p, int isa, DirectInput& in) {
  in.xs.resize((size_t)p.M * p.G);
  for (int m = 0; m < p.M; ++m)
    for (int g = 0; g < p.G; ++g) {
      const float* xg = p.x + (size_t)m * p.K + (size_t)g * p.gs;
      float t = 0;
      for (int i = 0; i < p.gs; ++i) t += xg[i];
      in.xs[(size_t)m * p.G + g] = t;
    }
  // x for the kernel, 64-byte aligned (a vector load that straddles two cache lines costs two;
  // K is a multiple of 16, so every row is aligned too)
  auto aligned = [&]() {
    in.xbuf.resize((size_t)p.M * p.K + 16);
    return (float*)(((uintptr_t)in.xbuf.data() + 63) & ~(uintptr_t)63);
  };
  in.xk = p.x;
  if (isa == AVX512 && p.bits == 4) {
    float* xp = aligned();
    float scale[16];  // 16^-(l/2): exact powers of two
    for (int l = 0; l < 16; ++l) scale[l] = std::ldexp(1.0f, -4 * (l >> 1));
    for (size_t base = 0; base < (size_t)p.M * p.K; base += 16)
      for (int l = 0; l < 16; ++l) xp[base + l] = p.x[base + 8 * (l & 1) + (l >> 1)] * scale[l];
    in.xk = xp;
  } else if (isa != GENERIC && p.M > 1 && ((uintptr_t)p.x & 63) != 0) {
    float* xp = aligned();
    std::memcpy(xp, p.x, (size_t)p.M * p.K * sizeof(float));
    in.xk = xp;
  }
}

static void direct_rows(const Problem& p, int isa, const DirectInput& in, int n0, int n1) {
#if SQ_X86
  if (isa == AVX512) return avx512::rows(p, in.xk, in.xs.data(), n0, n1);
  if (isa == AVX2) return avx2::rows(p, in.xk, in.xs.data(), n0, n1);
#endif
  generic::rows(p, in.xk, in.xs.data(), n0, n1);
}

static void run_direct(const Problem* ps_in, int n) {
  int isa = float_isa(g_isa.load(std::memory_order_relaxed));
  std::vector<Fp32Scales> fp32(isa == GENERIC ? n : 0);
  std::vector<Problem> converted(ps_in, ps_in + n);
  for (int j = 0; j < (int)fp32.size(); ++j) converted[j] = fp32[j].of(ps_in[j]);
  const Problem* ps = converted.data();
  std::vector<DirectInput> in(n);
  for (int j = 0; j < n; ++j) prepare_direct(ps[j], isa, in[j]);
  run_chunks(ps, n, [&](int j, int n0, int n1) { direct_rows(ps[j], isa, in[j], n0, n1); });
}

static void run_gemm(const Problem& p_in, sgemm_fn sgemm) {
  int isa = float_isa(g_isa.load(std::memory_order_relaxed));
  Fp32Scales fp32;
  const Problem p = fp32.of(p_in);
  // tiles of up to 4 MB of fp32 weights (one tile for a whole layer matrix of a small model),
  // a multiple of 16 rows; the scratch is kept per thread between calls
  int tile = std::max(16, (int)((1 << 20) / std::max(1, p.K)) / 16 * 16);
  tile = std::min(tile, (p.N + 15) / 16 * 16);
  thread_local std::unique_ptr<float[]> scratch_buf;
  thread_local size_t scratch_size = 0;
  if (scratch_size < (size_t)tile * p.K) {
    scratch_buf.reset(new float[(size_t)tile * p.K]);
    scratch_size = (size_t)tile * p.K;
  }
  float* scratch = scratch_buf.get();
  Pool* pl = pool();
  for (int n0 = 0; n0 < p.N; n0 += tile) {
    int n1 = std::min(p.N, n0 + tile);
    auto deq = [&](int a, int b) {
#if SQ_X86
      if (isa == AVX512) return avx512::dequant_rows(p, a, b, scratch + (size_t)(a - n0) * p.K);
      if (isa == AVX2) return avx2::dequant_rows(p, a, b, scratch + (size_t)(a - n0) * p.K);
#endif
      dequant_rows_generic(p, a, b, scratch + (size_t)(a - n0) * p.K);
    };
    if (pl == nullptr) {
      deq(n0, n1);
    } else {
      int chunk = 32;
      pl->run((n1 - n0 + chunk - 1) / chunk, [&](int i) { deq(n0 + i * chunk, std::min(n1, n0 + (i + 1) * chunk)); });
    }
    // out[:, n0:n1] = x (M x K) @ scratch (rows x K)^T
    sgemm(101, 111, 112, p.M, n1 - n0, p.K, 1.0f, p.x, p.K, scratch, p.K, 0.0f, p.out + n0, p.N);
  }
}

// ---------------------------------------------------------------- int8 path
// Each activation row is quantized once per call, per block of 32: d = max|x| / 127, q =
// round-to-nearest-even(x / d) (as x * (1 / d), in fp32). Per block the weight-activation dot
// product is then exact in int32; only d (rounding x by at most d / 2) differs from the fp32
// path, so |y_int8 - y_exact| <= sum_j d_j / 2 * sum_{k in block j} |w_k| (plus fp32 rounding).
static Q8Layout q8_layout(int isa, int bits) {
  if (bits == 8 || isa == GENERIC) return NATURAL;
  return isa == AVX512VNNI ? PAIR : SPLIT;
}

// where element i of block j of a row goes in the kernel's order
static inline size_t q8_offset(Q8Layout layout, int NB, int j, int i) {
  if (layout == NATURAL) return (size_t)j * 32 + i;
  if (layout == PAIR && j < NB / 2 * 2) return (size_t)(j / 2) * 64 + (i & 1) * 32 + (j & 1) * 16 + i / 2;
  return (size_t)j * 32 + (i & 1) * 16 + i / 2;
}

// block_sums (optional): each block's sum of q, for the biases' term
static void quantize_q8(const float* x, int M, int K, Q8Layout layout, int8_t* q, float* d, int32_t* block_sums = nullptr) {
  const int NB = K / 32;
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) {
      const float* xb = x + (size_t)m * K + (size_t)j * 32;
      float amax = 0;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
      float dj = amax / 127.0f;
      float id = dj != 0.0f ? 1.0f / dj : 0.0f;
      d[(size_t)m * NB + j] = dj;
      int8_t* qb = q + (size_t)m * K;
      int32_t sum = 0;
      for (int i = 0; i < 32; ++i) {
        // round half to even by adding and removing 1.5 * 2^23 (exact for |v| < 2^22; strict IEEE
        // keeps the compiler from folding it): nearbyint is a library call per element without
        // SSE4.1, which the baseline ISA this function compiles for lacks
        constexpr float magic = 12582912.0f;
        float v = (xb[i] * id + magic) - magic;
        int8_t qi = (int8_t)std::clamp(v, -127.0f, 127.0f);
        qb[q8_offset(layout, NB, j, i)] = qi;
        sum += qi;
      }
      if (block_sums) block_sums[(size_t)m * NB + j] = sum;
    }
}

// the integer math in plain C++: the reference the vector kernels are tested against
static void q8_rows_generic(const Problem& p, const Q8Act& a, int n0, int n1) {
  const int KW = p.K * p.bits / 32, per = 32 / p.bits, NB = p.K / 32, SPG = p.gs / 32;
  const uint32_t mask = (1u << p.bits) - 1;
  for (int n = n0; n < n1; ++n)
    for (int m = 0; m < p.M; ++m) {
      float acc = 0;
      for (int j = 0; j < NB; ++j) {
        int32_t idot = 0;
        for (int i = 0; i < 32; ++i) {
          int k = j * 32 + i;
          int32_t qw = (int32_t)((p.w[(size_t)n * KW + k / per] >> (p.bits * (k % per))) & mask);
          idot += qw * (int32_t)a.q[(size_t)m * p.K + k];
        }
        acc += p.s[(size_t)n * p.G + j / SPG] * a.d[(size_t)m * NB + j] * (float)idot;
      }
      for (int g = 0; g < p.G; ++g) acc += p.b[(size_t)n * p.G + g] * a.xs[(size_t)m * p.G + g];
      p.out[(size_t)m * p.N + n] = acc;
    }
}

// per group the sum of the int8-rounded activations, d_j * sum(q): the weights' affine biases then
// meet the same rounded x as their scales, so the product is dequant(w) . round(x) however it is
// computed (the GEMM path below rounds x the same way: a row's result does not depend on how many
// rows share the call, and batch = solo holds in int8 mode too)
static void rounded_group_sums(const Problem& p, const int32_t* block_sums, const float* d, float* xs) {
  const int NB = p.K / 32, SPG = p.gs / 32;
  for (int m = 0; m < p.M; ++m)
    for (int g = 0; g < p.G; ++g) {
      float t = 0;
      for (int j = g * SPG; j < (g + 1) * SPG; ++j) t += d[(size_t)m * NB + j] * (float)block_sums[(size_t)m * NB + j];
      xs[(size_t)m * p.G + g] = t;
    }
}

// x as the int8 kernels read it: the rows quantized per block of 32 in the kernel's layout
struct Q8Input {
  std::vector<int8_t> qbuf;
  std::vector<float> d, xs, dv;
  std::vector<int32_t> sums;
  Q8Act a{};
};

static void prepare_q8(const Problem& p, int isa, Q8Input& in) {
  const int NB = p.K / 32, NP = NB / 2;
  Q8Layout layout = q8_layout(isa, p.bits);
  in.qbuf.resize((size_t)p.M * p.K + 64);
  in.d.resize((size_t)p.M * NB);
  in.xs.resize((size_t)p.M * p.G);
  in.sums.resize((size_t)p.M * NB);
  int8_t* q = (int8_t*)(((uintptr_t)in.qbuf.data() + 63) & ~(uintptr_t)63);
  quantize_q8(p.x, p.M, p.K, layout, q, in.d.data(), in.sums.data());
  rounded_group_sums(p, in.sums.data(), in.d.data(), in.xs.data());
  if (isa == AVX512VNNI) {  // each lane's block scale, per pair of blocks
    in.dv.resize((size_t)p.M * NP * 16);
    for (int m = 0; m < p.M; ++m)
      for (int jp = 0; jp < NP; ++jp)
        for (int l = 0; l < 16; ++l) {
          int second = p.bits == 4 ? (l >> 2) & 1 : l >> 3;
          in.dv[((size_t)m * NP + jp) * 16 + l] = in.d[(size_t)m * NB + 2 * jp + second];
        }
  }
  in.a = Q8Act{q, in.d.data(), in.xs.data(), in.dv.data()};
}

static void q8_rows_of(const Problem& p, int isa, const Q8Act& a, int n0, int n1) {
#if SQ_X86
  if (isa == AVX512VNNI) return avx512vnni::q8z_rows(p, a, n0, n1);
  if (isa == AVXVNNI) return avxvnni::q8_rows(p, a, n0, n1);
  if (isa == AVX2 || isa == AVX512) return avx2::q8_rows(p, a, n0, n1);
#endif
  q8_rows_generic(p, a, n0, n1);
}

static void run_q8(const Problem* ps_in, int n) {
  int isa = g_isa.load(std::memory_order_relaxed);
  std::vector<Fp32Scales> fp32(n);
  std::vector<Problem> converted(n);
  for (int j = 0; j < n; ++j) converted[j] = fp32[j].of(ps_in[j]);
  const Problem* ps = converted.data();
  std::vector<Q8Input> in(n);
  for (int j = 0; j < n; ++j) prepare_q8(ps[j], isa, in[j]);
  run_chunks(ps, n, [&](int j, int n0, int n1) { q8_rows_of(ps[j], isa, in[j].a, n0, n1); });
}

// x rounded as the int8 path rounds it (per row and block of 32), back in fp32, for the GEMM path
static void round_like_q8(const Problem& p, float* out) {
  const int NB = p.K / 32;
  std::vector<int8_t> q((size_t)p.M * p.K);
  std::vector<float> d((size_t)p.M * NB);
  quantize_q8(p.x, p.M, p.K, NATURAL, q.data(), d.data());
  for (size_t i = 0; i < (size_t)p.M * p.K; ++i) out[i] = d[i / 32] * (float)q[i];
}

static void compute(const Problem& p) {
  if (p.M <= 0 || p.N <= 0) return;
  bool exact = g_exact.load(std::memory_order_relaxed);
  if (p.M >= gemm_min_rows()) {
    static sgemm_fn sgemm = find_sgemm();
    if (sgemm && exact) return run_gemm(p, sgemm);
    if (sgemm) {
      std::vector<float> rounded((size_t)p.M * p.K);
      round_like_q8(p, rounded.data());
      Problem q = p;
      q.x = rounded.data();
      return run_gemm(q, sgemm);
    }
  }
  if (!exact) return run_q8(&p, 1);
  run_direct(&p, 1);
}

// Several products (each as compute would do it) with their output rows in one pool job: the
// same results as one compute call each.
static void compute_many(const Problem* ps, int n) {
  const int gemm_from = gemm_min_rows();
  bool direct = true;
  for (int j = 0; j < n; ++j) direct = direct && ps[j].M > 0 && ps[j].N > 0 && ps[j].M < gemm_from;
  if (!direct) {
    for (int j = 0; j < n; ++j) compute(ps[j]);
    return;
  }
  if (!g_exact.load(std::memory_order_relaxed)) return run_q8(ps, n);
  run_direct(ps, n);
}

// A view of an array's data; non-contiguous or broadcast inputs are gathered row-major.
struct View {
  const void* ptr;
  mx::Shape shape;
  mx::Strides strides;
  bool contiguous;
  size_t size, itemsize;
  static View of(const mx::array& a) {
    return View{a.data<void>(), a.shape(), a.strides(), a.flags().row_contiguous, a.size(), a.itemsize()};
  }
  const void* data(std::vector<uint32_t>& tmp) const {
    if (contiguous) return ptr;
    tmp.resize((size * itemsize + 3) / 4);
    const char* src = static_cast<const char*>(ptr);
    char* dst = reinterpret_cast<char*>(tmp.data());
    int nd = (int)shape.size();
    std::vector<int64_t> idx(nd, 0);
    for (size_t i = 0; i < size; ++i) {
      int64_t off = 0;
      for (int d = 0; d < nd; ++d) off += idx[d] * strides[d];
      std::memcpy(dst + i * itemsize, src + off * itemsize, itemsize);
      for (int d = nd - 1; d >= 0; --d) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
    return tmp.data();
  }
};

// ---------------------------------------------------------------- the Primitive
mx::array qmm(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
              int group_size, int bits);

class StratlmQuantizedMatmul : public mx::UnaryPrimitive {
 public:
  StratlmQuantizedMatmul(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), gs_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto &x = inputs[0], &w = inputs[1], &s = inputs[2], &b = inputs[3];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(out);
    int K = x.shape(-1), N = w.shape(0);
    int M = K == 0 ? 0 : (int)(x.size() / K);
    enc.dispatch([xv = View::of(x), wv = View::of(w), sv = View::of(s), bv = View::of(b),
                  outp = out.data<float>(), M, N, K, gs = gs_, bits = bits_]() {
      std::vector<uint32_t> tx, tw, ts, tb;
      const void *sp = sv.data(ts), *bp = bv.data(tb);
      const bool half = sv.itemsize == 2;
      Problem p{static_cast<const float*>(xv.data(tx)),
                static_cast<const uint32_t*>(wv.data(tw)),
                half ? nullptr : static_cast<const float*>(sp),
                half ? nullptr : static_cast<const float*>(bp),
                outp,
                M,
                N,
                K,
                K / gs,
                gs,
                bits};
      if (half) {
        p.s16 = static_cast<const uint16_t*>(sp);
        p.b16 = static_cast<const uint16_t*>(bp);
      }
      compute(p);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("stratlm quantized_matmul runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    std::vector<mx::array> grads;
    for (int a : argnums) {
      if (a != 0) throw std::invalid_argument("stratlm quantized_matmul: no gradient for the quantized weights");
      grads.push_back(mx::quantized_matmul(cotangents[0], primals[1], primals[2], primals[3], /*transpose=*/false,
                                           gs_, bits_, "affine", stream()));
    }
    return grads;
  }
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override {
    for (int a : argnums)
      if (a != 0) throw std::invalid_argument("stratlm quantized_matmul: no gradient for the quantized weights");
    return {qmm(tangents[0], primals[1], primals[2], primals[3], gs_, bits_)};
  }
  const char* name() const override { return "StratlmQuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const StratlmQuantizedMatmul&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }

 private:
  int gs_, bits_;
};

mx::array qmm(const mx::array& x_in, const mx::array& w, const mx::array& scales_in, const mx::array& biases_in,
              int group_size, int bits) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("quantized_matmul: bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("quantized_matmul: group_size must be 32, 64 or 128");
  if (w.dtype() != mx::uint32 || w.ndim() != 2) throw std::invalid_argument("quantized_matmul: w must be 2-D uint32");
  if (x_in.ndim() < 1) throw std::invalid_argument("quantized_matmul: x must have at least one dimension");
  int N = w.shape(0);
  int K = w.shape(1) * 32 / bits;
  if (x_in.shape(-1) != K)
    throw std::invalid_argument("quantized_matmul: x's last dimension " + std::to_string(x_in.shape(-1)) +
                                " does not match the weights' " + std::to_string(K));
  mx::Shape sshape{N, K / group_size};
  if (scales_in.shape() != sshape || biases_in.shape() != sshape)
    throw std::invalid_argument("quantized_matmul: scales and biases must have shape (N, K/group_size)");
  auto cpu = mx::default_stream(mx::Device::cpu);
  mx::Dtype dt = x_in.dtype();
  auto f32 = [&](const mx::array& a) { return a.dtype() == mx::float32 ? a : mx::astype(a, mx::float32, cpu); };
  // fp16 scales and biases are read as they are (exact in fp32); other dtypes are made fp32
  const bool half = scales_in.dtype() == mx::float16 && biases_in.dtype() == mx::float16;
  mx::array x = f32(x_in), scales = half ? scales_in : f32(scales_in), biases = half ? biases_in : f32(biases_in);
  auto shape = x.shape();
  shape.back() = N;
  mx::array out(std::move(shape), mx::float32,
                std::make_shared<StratlmQuantizedMatmul>(cpu, group_size, bits), {x, w, scales, biases});
  if (dt != mx::float32 && mx::issubdtype(dt, mx::floating)) out = mx::astype(out, dt, cpu);
  return out;
}

#include "decode_block.h"

}  // namespace

NB_MODULE(_stratlm_quantized, m) {
  m.doc() = "stratlm's CPU quantized matmul for MLX";
  m.def("quantized_matmul", &qmm, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::kw_only(),
        nb::arg("group_size"), nb::arg("bits"),
        "x @ dequantize(w, scales, biases, group_size, bits).T, lazily, on the CPU");
  nb::class_<BlockWeightsHandle>(m, "BlockWeights", "a decoder block's weights as decode_block holds them (block_weights)");
  m.def("block_weights", &block_weights, nb::arg("arrays"), nb::kw_only(), nb::arg("eps_in"), nb::arg("eps_post"),
        nb::arg("group_sizes"), nb::arg("bits"),
        "a block's norm weights and (w, scales, biases) of q, k, v, o, gate, up, down, checked and evaluated once");
  m.def("decode_block", &decode_block, nb::arg("inputs"), nb::arg("weights"), nb::kw_only(), nb::arg("scale"),
        nb::arg("rope_scale"), nb::arg("n_heads"), nb::arg("n_kv_heads"), nb::arg("write_at"),
        "a decoder block for a few new positions as one lazy op (decode_block.h): [out, keys, values]");
  m.def("decode_block_storage_copies", [] { return g_block_storage_copies.load(); },
        "how many times decode_block copied a cache storage it could not reuse in place");
  m.def("isa", [] { return std::string(isa_name(g_isa.load())); }, "instruction set in use");
  m.def("best_isa", [] { return std::string(isa_name(g_best_isa)); }, "best instruction set this CPU supports");
  m.def(
      "isas",
      [] {
        std::vector<std::string> out;
        for (int i = 0; i < N_ISA; ++i)
          if (cpu_has(i)) out.push_back(ISA_NAMES[i]);
        return out;
      },
      "every instruction set setting this CPU supports");
  m.def(
      "set_isa",
      [](const std::string& name) {
        int want = -1;
        for (int i = 0; i < N_ISA; ++i)
          if (name == ISA_NAMES[i]) want = i;
        if (want < 0) throw std::invalid_argument("isa must be one of generic, avx2, avxvnni, avx512, avx512vnni");
        if (!cpu_has(want)) throw std::invalid_argument("this CPU does not support " + name);
        g_isa.store(want);
      },
      nb::arg("name"));
  m.def("exact", [] { return g_exact.load(); }, "fp32 activations (exact) rather than int8 per block of 32");
  m.def("set_exact", [](bool on) { g_exact.store(on); }, nb::arg("on"));
  m.def(
      "quantize_activations",
      [](const mx::array& x, int layout) {
        // x (M, K) float32 -> (int8 values in the layout as bytes, block scales): for tests
        mx::eval({x});
        int K = x.shape(-1), M = (int)(x.size() / K);
        if (K % 32) throw std::invalid_argument("K must be a multiple of 32");
        std::string q((size_t)M * K, '\0');
        std::vector<float> d((size_t)M * (K / 32));
        quantize_q8(x.data<float>(), M, K, (Q8Layout)layout, reinterpret_cast<int8_t*>(q.data()), d.data());
        return std::make_pair(nb::bytes(q.data(), q.size()), d);
      },
      nb::arg("x"), nb::arg("layout") = 0);
  m.def("threads", [] { return g_threads.load(); });
  m.def("set_threads", [](int n) { g_threads.store(std::max(1, n)); }, nb::arg("n"));
  m.def("pass_rows", [] { return g_pass_rows.load(); }, "most activation rows per pass of the direct kernel");
  m.def("chunks_per_thread", [] { return g_chunks_per_thread.load(); }, "row chunks per thread of a product");
  m.def("set_chunks_per_thread", [](int n) { g_chunks_per_thread.store(std::max(1, n)); }, nb::arg("n"));
  m.def("prefetch", [] { return g_prefetch.load(); }, "whether the row loops prefetch the rows ahead");
  m.def("set_prefetch", [](bool on) { g_prefetch.store(on); }, nb::arg("on"));
  m.def("parallel_attention", [] { return g_parallel_attention.load(); }, "whether a block's attention heads use the pool");
  m.def("set_parallel_attention", [](bool on) { g_parallel_attention.store(on); }, nb::arg("on"));
  m.def("set_pass_rows", [](int n) { g_pass_rows.store(std::max(2, n)); }, nb::arg("n"));
  m.def("gemm_min_rows", [] { return gemm_min_rows(); }, "rows from which a product takes the GEMM path");
  m.def("set_gemm_min_rows", [](int n) { g_gemm_min_rows.store(std::max(0, n)); }, nb::arg("n"),
        "rows from which a product takes the GEMM path; 0: by the instruction set");
  m.def("has_sgemm", [] { return find_sgemm() != nullptr; });
  m.def(
      "time_products",
      [](const std::vector<mx::array>& xs, const std::vector<mx::array>& ws, const std::vector<mx::array>& scales,
         const std::vector<mx::array>& biases, const std::vector<int>& group_sizes, const std::vector<int>& bits,
         int reps) {
        // seconds of the fastest of reps passes over every product in turn (no graph: the kernels
        // alone), for tuning; the scales and biases fp32 or fp16 as quantized_matmul takes them
        const size_t n = xs.size();
        if (ws.size() != n || scales.size() != n || biases.size() != n || group_sizes.size() != n || bits.size() != n)
          throw std::invalid_argument("time_products: one w, scales, biases, group size and bit width per x");
        std::vector<mx::array> all;
        for (size_t i = 0; i < n; ++i) all.insert(all.end(), {xs[i], ws[i], scales[i], biases[i]});
        mx::eval(all);
        std::vector<std::vector<float>> outs(n);
        std::vector<Problem> ps(n);
        for (size_t i = 0; i < n; ++i) {
          const auto &x = xs[i], &w = ws[i], &s = scales[i], &b = biases[i];
          if (!x.flags().row_contiguous || x.dtype() != mx::float32 || !w.flags().row_contiguous)
            throw std::invalid_argument("time_products: x float32 and x, w contiguous");
          int K = x.shape(-1), N = w.shape(0), M = (int)(x.size() / K);
          outs[i].resize((size_t)M * N);
          const bool half = s.dtype() == mx::float16;
          ps[i] = Problem{x.data<float>(), w.data<uint32_t>(), half ? nullptr : s.data<float>(),
                          half ? nullptr : b.data<float>(), outs[i].data(), M, N, K, K / group_sizes[i], group_sizes[i],
                          bits[i]};
          if (half) {
            ps[i].s16 = s.data<uint16_t>();
            ps[i].b16 = b.data<uint16_t>();
          }
        }
        double best = 1e30;
        for (int r = 0; r < reps; ++r) {
          auto t0 = std::chrono::steady_clock::now();
          for (auto& p : ps) compute(p);
          best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        return best;
      },
      nb::arg("xs"), nb::arg("ws"), nb::arg("scales"), nb::arg("biases"), nb::arg("group_sizes"), nb::arg("bits"),
      nb::arg("reps"));
  m.def(
      "time_kernel",
      [](const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
         int bits, int reps, bool cpu_time) {
        // seconds per call of the computation alone (no graph), for tuning; inputs contiguous float32
        mx::eval({x, w, scales, biases});
        int K = x.shape(-1), N = w.shape(0), M = (int)(x.size() / K);
        std::vector<float> out((size_t)M * N);
        Problem p{x.data<float>(), w.data<uint32_t>(), scales.data<float>(), biases.data<float>(), out.data(),
                  M, N, K, K / group_size, group_size, bits};
        compute(p);
        double best = 1e30;
        auto now = [cpu_time] {
          timespec ts;
          clock_gettime(cpu_time ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
          return ts.tv_sec + 1e-9 * ts.tv_nsec;
        };
        for (int r = 0; r < reps; ++r) {
          double t0 = now();
          compute(p);
          best = std::min(best, now() - t0);
        }
        return best;
      },
      nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::arg("group_size"), nb::arg("bits"),
      nb::arg("reps"), nb::arg("cpu_time") = false);
}
