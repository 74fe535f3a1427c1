// The ISA-independent body of the quantized matrix-vector kernels. quantized.cpp includes it
// once per instruction set, inside a namespace and a target pragma, after defining:
//   L               lanes of a float vector
//   vf              the float vector type
//   vzero, vload, vset1, vmul, vfma, vreduce(v) -> float
//   vbias(acc, b, xs, G)   acc + sum_g b[g] * xs[g] spread over lanes (masked tail)
//   unpack<BITS>(w) the L quantized values starting at packed word w, as floats, in the lane
//                   order of prepare_x (x is permuted/scaled once per call to match it)
//   prepare_x<BITS>(x, xp, K)
// The output row n, for an activation row x, is
//   sum_g s[n,g] * dot(q[n,g,:], x[g,:]) + b[n,g] * sum(x[g,:])
// so the packed weights are read once and converted once for up to MB activation rows.

// Output rows [n0, n0+R) for activation rows [m0, m0+MB).
template <int BITS, int R, int MB, int GS>
static void block(const Problem& p, const float* xp, const float* xs, int n0, int m0) {
  constexpr int V = GS / L;                // vectors per group
  constexpr int WPV = L * BITS / 32;       // packed words per vector
  constexpr int WPG = GS * BITS / 32;      // packed words per group
  const int KW = p.K * BITS / 32;
  const int G = p.G;
  const int K = p.K;
  vf tot[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) tot[r][m] = vzero();
  const uint32_t* w = p.w + (size_t)n0 * KW;
  const float* s = p.s + (size_t)n0 * G;
  const float* x = xp + (size_t)m0 * K;
  for (int g = 0; g < G; ++g) {
    const uint32_t* wg = w + (size_t)g * WPG;
    const float* xg = x + (size_t)g * GS;
    if constexpr (MB == 1) {
      // one activation row: the scale multiplies a whole group's partial dot product
      vf acc[R];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        vf xv = vload(xg + v * L);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          vf q = unpack<BITS>(wg + (size_t)r * KW + v * WPV);
          acc[r] = v == 0 ? vmul(q, xv) : vfma(q, xv, acc[r]);
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) tot[r][0] = vfma(vset1(s[(size_t)r * G + g]), acc[r], tot[r][0]);
    } else {
      // several rows: scale the converted weights once, then one FMA per row
      vf sr[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) sr[r] = vset1(s[(size_t)r * G + g]);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        vf xv[MB];
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) xv[m] = vload(xg + (size_t)m * K + v * L);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          vf q = vmul(unpack<BITS>(wg + (size_t)r * KW + v * WPV), sr[r]);
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m) tot[r][m] = vfma(q, xv[m], tot[r][m]);
        }
      }
    }
  }
  const float* b = p.b + (size_t)n0 * G;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
      p.out[(size_t)(m0 + m) * p.N + n0 + r] =
          vreduce(vbias(tot[r][m], b + (size_t)r * G, xs + (size_t)(m0 + m) * G, G));
}

template <int BITS, int R, int GS>
static void rows_r(const Problem& p, const float* xp, const float* xs, int n0) {
  int m0 = 0;
  if constexpr (R == 1) {  // the last N % 4 rows
    for (; m0 < p.M; ++m0) block<BITS, 1, 1, GS>(p, xp, xs, n0, m0);
    return;
  }
  for (; p.M - m0 >= 4; m0 += 4) block<BITS, R, 4, GS>(p, xp, xs, n0, m0);
  switch (p.M - m0) {
    case 3: block<BITS, R, 3, GS>(p, xp, xs, n0, m0); break;
    case 2: block<BITS, R, 2, GS>(p, xp, xs, n0, m0); break;
    case 1: block<BITS, R, 1, GS>(p, xp, xs, n0, m0); break;
    default: break;
  }
}

template <int BITS, int GS>
static void rows_bg(const Problem& p, const float* xp, const float* xs, int n_begin, int n_end) {
  constexpr int R = 4;
  int n = n_begin;
  for (; n + R <= n_end; n += R) rows_r<BITS, R, GS>(p, xp, xs, n);
  for (; n < n_end; ++n) rows_r<BITS, 1, GS>(p, xp, xs, n);
}

// Output rows [n_begin, n_end) for all activation rows.
static void rows(const Problem& p, const float* xp, const float* xs, int n_begin, int n_end) {
  if (p.bits == 4) {
    if (p.gs == 32) rows_bg<4, 32>(p, xp, xs, n_begin, n_end);
    else if (p.gs == 64) rows_bg<4, 64>(p, xp, xs, n_begin, n_end);
    else rows_bg<4, 128>(p, xp, xs, n_begin, n_end);
  } else {
    if (p.gs == 32) rows_bg<8, 32>(p, xp, xs, n_begin, n_end);
    else if (p.gs == 64) rows_bg<8, 64>(p, xp, xs, n_begin, n_end);
    else rows_bg<8, 128>(p, xp, xs, n_begin, n_end);
  }
}
