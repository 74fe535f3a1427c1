// The 256-bit body of the int8-activation kernels (4-bit or 8-bit weights x int8 activations).
// quantized.cpp includes it once per instruction set, inside a namespace and a target pragma,
// after defining
//   dot4(w, x) -> __m256i  the 8 int32 partial sums of one 32-value block: w its 16 packed weight
//                          bytes, x its 32 activations in the SPLIT layout (evens, then odds)
//   dot8(w, x) -> __m256i  the same for 32 weight bytes and natural-order activations
// Output row n, activation row m:
//   sum_j s[n, j/SPG] * d[m, j] * idot(q[n, j], qx[m, j]) + sum_g b[n, g] * xs[m, g]
// with idot an exact integer dot product of a 32-value block; xs the exact fp32 sums of x.

static inline __m256 q8_vbias(__m256 acc, const float* b, const float* xs, int G) {
  int g = 0;
  for (; g + 8 <= G; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(b + g), _mm256_loadu_ps(xs + g), acc);
  if (g < G) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32(G - g), idx);
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(b + g, mk), _mm256_maskload_ps(xs + g, mk), acc);
  }
  return acc;
}

static inline float q8_hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// blocks [j0, NB) of output rows [n0, n0+R) for activation row m, added to acc
template <int BITS, int GS, int R>
static SQ_INLINE void q8_blocks256(const Problem& p, const Q8Act& a, int n0, int m, int j0, __m256* acc) {
  constexpr int SPG = GS / 32;
  constexpr int WB = 32 * BITS / 8;
  const int NB = p.K / 32;
  const size_t row_bytes = (size_t)p.K * BITS / 8;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(p.w) + (size_t)n0 * row_bytes;
  const float* s = p.s + (size_t)n0 * p.G;
  const int8_t* xq = a.q + (size_t)m * p.K;
  const float* d = a.d + (size_t)m * NB;
  for (int j = j0; j < NB; ++j) {
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (size_t)j * 32));
    __m256 dj = _mm256_set1_ps(d[j]);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * row_bytes + (size_t)j * WB;
      __m256i dot = BITS == 4 ? dot4(wr, xv) : dot8(wr, xv);
      __m256 sd = _mm256_mul_ps(_mm256_set1_ps(s[(size_t)r * p.G + j / SPG]), dj);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sd, acc[r]);
    }
  }
}

template <int BITS, int GS, int R>
static void q8_block256(const Problem& p, const Q8Act& a, int n0, int m) {
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  q8_blocks256<BITS, GS, R>(p, a, n0, m, 0, acc);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    p.out[(size_t)m * p.N + n0 + r] = q8_hsum(q8_vbias(acc[r], p.b + (size_t)(n0 + r) * p.G, a.xs + (size_t)m * p.G, p.G));
}

template <int BITS, int GS>
static void q8_rows256_bg(const Problem& p, const Q8Act& a, int n0, int n1) {
  constexpr int R = 4;
  int n = n0;
  const RowPrefetch ahead(p, n, n1, R);
  // every activation row for a tile of R weight rows: the tile stays in L1 between rows
  for (; n + R <= n1; n += R) {
    ahead.at(n);
    for (int m = 0; m < p.M; ++m) q8_block256<BITS, GS, R>(p, a, n, m);
  }
  for (; n < n1; ++n)
    for (int m = 0; m < p.M; ++m) q8_block256<BITS, GS, 1>(p, a, n, m);
}

static void q8_rows(const Problem& p, const Q8Act& a, int n0, int n1) {
  if (p.bits == 4) {
    if (p.gs == 32) q8_rows256_bg<4, 32>(p, a, n0, n1);
    else if (p.gs == 64) q8_rows256_bg<4, 64>(p, a, n0, n1);
    else q8_rows256_bg<4, 128>(p, a, n0, n1);
  } else {
    if (p.gs == 32) q8_rows256_bg<8, 32>(p, a, n0, n1);
    else if (p.gs == 64) q8_rows256_bg<8, 64>(p, a, n0, n1);
    else q8_rows256_bg<8, 128>(p, a, n0, n1);
  }
}
