// The ISA-independent body of the quantized matrix-vector kernels. quantized.cpp includes it
// once per instruction set, inside a namespace and a target pragma, after defining:
//   L               lanes of a float vector
//   vf              the float vector type
//   in_register(v)  keeps v in a register (the compiler would fold its load into every use)
//   vzero, vload, vset1, vmul, vfma, vreduce(v) -> float
//   NREG, MB_MAX    vector registers; most activation rows per pass over the weights (block_m)
//   vreduce_n<n>(v, out)  out[i] = sum of the lanes of v[i], i < n <= L
//   vbias(acc, b, xs, G)   acc + sum_g b[g] * xs[g] spread over lanes (masked tail), b fp32 or fp16
//   halves(h, out, n)  out[i] = fp16 h[i] as fp32, i < n
//   unpack<BITS>(w) the L quantized values starting at packed word w, as floats, in the lane
//                   order of prepare_x (x is permuted/scaled once per call to match it)
//   prepare_x<BITS>(x, xp, K)
// The output row n, for an activation row x, is
//   sum_g s[n,g] * dot(q[n,g,:], x[g,:]) + b[n,g] * sum(x[g,:])
// so the packed weights are read once and converted once for up to MB_MAX activation rows.

// The scales of output rows [n, n + rows) as fp32 (row stride G): fp32 ones where they are, fp16
// ones converted into buf first, once per tile of rows. The group loops below then take each
// scale as a broadcast memory operand (one fused load), not a conversion and a broadcast per group
// and row: with fp16 scales that was four of a group's ten vector instructions.
template <class SB>
static SQ_INLINE const float* row_scales(const Problem& p, int n, int rows, float* buf) {
  if constexpr (std::is_same_v<SB, float>) {
    return p.s + (size_t)n * p.G;
  } else {
    halves(p.s16 + (size_t)n * p.G, buf, rows * p.G);
    return buf;
  }
}

// Output rows [n0, n0+R) for the one activation row m0: the scale multiplies a whole group's
// partial dot product. (Several rows go through block_m below.) SB: the biases' type; s: the
// rows' scales from row n0 (row_scales).
template <int BITS, int R, int GS, class SB>
static void block(const Problem& p, const float* xp, const float* xs, const float* s, int n0, int m0) {
  constexpr int V = GS / L;                // vectors per group
  constexpr int WPV = L * BITS / 32;       // packed words per vector
  constexpr int WPG = GS * BITS / 32;      // packed words per group
  const int KW = p.K * BITS / 32;
  const int G = p.G;
  const int K = p.K;
  vf tot[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) tot[r] = vzero();
  const uint32_t* w = p.w + (size_t)n0 * KW;
  const float* x = xp + (size_t)m0 * K;
  for (int g = 0; g < G; ++g) {
    const uint32_t* wg = w + (size_t)g * WPG;
    const float* xg = x + (size_t)g * GS;
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
    for (int r = 0; r < R; ++r) tot[r] = vfma(vset1(s[(size_t)r * G + g]), acc[r], tot[r]);
  }
  const SB* b = biases_of(p, (const SB*)nullptr) + (size_t)n0 * G;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) p.out[(size_t)m0 * p.N + n0 + r] = vreduce(vbias(tot[r], b + (size_t)r * G, xs + (size_t)m0 * G, G));
}

// Several activation rows (MB >= 2): R weight rows x MB activation rows of accumulators in
// registers. Each weight vector is unpacked and scaled once, each x vector loaded once per
// vector step and used for the R rows; the bias term and the horizontal sums are done at the
// end, the sums L at a time (vreduce_n).
template <int MB>
constexpr int rows_for() {
  // accumulators R*MB, weights R, one x vector and ~2 constants in NREG registers
  // (one of 1, 2, 3, 4, 6, 8: they divide the tiles of rows_bg)
  int r = (NREG - 3) / (MB + 1);
  return r >= 8 ? 8 : r >= 6 ? 6 : r >= 4 ? 4 : r < 1 ? 1 : r;
}

// out[i] = the sum of v[i]'s lanes, i < n, L at a time
template <int n>
static SQ_INLINE void reduce_all(const vf* v, float* out) {
  if constexpr (n > L) {
    vreduce_n<L>(v, out);
    reduce_all<n - L>(v + L, out + L);
  } else {
    vreduce_n<n>(v, out);
  }
}

template <int BITS, int R, int MB, int GS, class SB>
static void block_m(const Problem& p, const float* xp, const float* xs, const float* s, int n0, int m0) {
  constexpr int V = GS / L;
  constexpr int WPV = L * BITS / 32;
  constexpr int WPG = GS * BITS / 32;
  const int KW = p.K * BITS / 32;
  const int G = p.G;
  const int K = p.K;
  vf tot[R * MB];
#pragma GCC unroll 64
  for (int i = 0; i < R * MB; ++i) tot[i] = vzero();
  const uint32_t* w = p.w + (size_t)n0 * KW;
  const float* x = xp + (size_t)m0 * K;
  for (int g = 0; g < G; ++g) {
    const uint32_t* wg = w + (size_t)g * WPG;
    const float* xg = x + (size_t)g * GS;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      vf q[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) q[r] = vmul(unpack<BITS>(wg + (size_t)r * KW + v * WPV), vset1(s[(size_t)r * G + g]));
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        vf xv = vload(xg + (size_t)m * K + v * L);
        in_register(xv);  // one load for the R rows, not a memory operand of each FMA
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) tot[r * MB + m] = vfma(q[r], xv, tot[r * MB + m]);
      }
    }
  }
  const SB* b = biases_of(p, (const SB*)nullptr) + (size_t)n0 * G;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
      tot[r * MB + m] = vbias(tot[r * MB + m], b + (size_t)r * G, xs + (size_t)(m0 + m) * G, G);
  float sums[(R * MB + L - 1) / L * L];
  reduce_all<R * MB>(tot, sums);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) p.out[(size_t)(m0 + m) * p.N + n0 + r] = sums[r * MB + m];
}

// rows [n0, n1) for activation rows [m0, m0+MB); s: the scales from row n0
template <int BITS, int MB, int GS, class SB>
static void pass_m(const Problem& p, const float* xp, const float* xs, const float* s, int n0, int n1, int m0) {
  constexpr int R = rows_for<MB>();
  int n = n0;
  for (; n + R <= n1; n += R) block_m<BITS, R, MB, GS, SB>(p, xp, xs, s + (size_t)(n - n0) * p.G, n, m0);
  for (; n < n1; ++n)  // the last N % R rows (none for the usual model widths): one x row at a time
    for (int m = m0; m < m0 + MB; ++m) block<BITS, 1, GS, SB>(p, xp, xs, s + (size_t)(n - n0) * p.G, n, m);
}

template <int BITS, int GS, class SB, int MB = 2>
static void pass_dispatch(const Problem& p, const float* xp, const float* xs, const float* s, int n0, int n1, int m0,
                          int mb) {
  if constexpr (MB <= MB_MAX) {
    if (mb == MB) return pass_m<BITS, MB, GS, SB>(p, xp, xs, s, n0, n1, m0);
    return pass_dispatch<BITS, GS, SB, MB + 1>(p, xp, xs, s, n0, n1, m0, mb);
  }
}

template <int BITS, int GS, class SB>
static void rows_bg(const Problem& p, const float* xp, const float* xs, int n_begin, int n_end) {
  constexpr int R = 4, TILE = 48;
  thread_local std::vector<float> scale_buf;  // fp16 scales of a tile of rows, as fp32
  if constexpr (!std::is_same_v<SB, float>)
    if (scale_buf.size() < (size_t)TILE * p.G) scale_buf.resize((size_t)TILE * p.G);
  float* buf = scale_buf.data();
  if (p.M == 1) {
    int n = n_begin;
    const RowPrefetch ahead(p, n, n_end, R);
    for (; n + R <= n_end; n += R) {
      ahead.at(n);
      block<BITS, R, GS, SB>(p, xp, xs, row_scales<SB>(p, n, R, buf), n, 0);
    }
    for (; n < n_end; ++n) block<BITS, 1, GS, SB>(p, xp, xs, row_scales<SB>(p, n, 1, buf), n, 0);
    return;
  }
  // passes of at most max_pass rows, of balanced sizes; each tile of output rows is done for
  // every pass while its weights are in L1
  int max_pass = std::clamp(pass_rows(), 2, MB_MAX);
  int passes = (p.M + max_pass - 1) / max_pass;
  const RowPrefetch ahead(p, n_begin, n_end, TILE);
  for (int t = n_begin; t < n_end; t += TILE) {
    ahead.at(t);
    int t1 = std::min(n_end, t + TILE);
    const float* s = row_scales<SB>(p, t, t1 - t, buf);
    for (int i = 0, m0 = 0; i < passes; ++i) {
      int mb = (p.M - m0) / (passes - i);
      if (mb == 1) {
        for (int n = t; n < t1; ++n) block<BITS, 1, GS, SB>(p, xp, xs, s + (size_t)(n - t) * p.G, n, m0);
      } else {
        pass_dispatch<BITS, GS, SB>(p, xp, xs, s, t, t1, m0, mb);
      }
      m0 += mb;
    }
  }
}

template <class SB>
static void rows_sb(const Problem& p, const float* xp, const float* xs, int n_begin, int n_end) {
  if (p.bits == 4) {
    if (p.gs == 32) rows_bg<4, 32, SB>(p, xp, xs, n_begin, n_end);
    else if (p.gs == 64) rows_bg<4, 64, SB>(p, xp, xs, n_begin, n_end);
    else rows_bg<4, 128, SB>(p, xp, xs, n_begin, n_end);
  } else {
    if (p.gs == 32) rows_bg<8, 32, SB>(p, xp, xs, n_begin, n_end);
    else if (p.gs == 64) rows_bg<8, 64, SB>(p, xp, xs, n_begin, n_end);
    else rows_bg<8, 128, SB>(p, xp, xs, n_begin, n_end);
  }
}

// Output rows [n_begin, n_end) for all activation rows.
static void rows(const Problem& p, const float* xp, const float* xs, int n_begin, int n_end) {
  if (p.s16 != nullptr) rows_sb<uint16_t>(p, xp, xs, n_begin, n_end);
  else rows_sb<float>(p, xp, xs, n_begin, n_end);
}
