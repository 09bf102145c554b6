// Float32 GEMM y = x w^T on a packed w^T, register-blocked for this ISA (the native
// alternative to the BLAS sgemm_ in sgemm.h; which one runs is packed_gemm.h's policy).
//
//   y[r, j] = sum_k x[r, k] * wt[k, j]        r < rows, col0 <= j < col1
//
// Layout: x rows are ldx floats apart (the NHWC pixels of a channels_last activation),
// y rows ldy apart; wt is w^T packed by pack_wt (below; packed_gemm.cpp calls it): (cin,
// ldw) row-major with ldw = cout rounded up to whole vectors and zero padding past cout,
// so every vector load of a wt row is in bounds.
//
// Blocking: a micro tile of kMR rows x kNV vectors of columns keeps kMR * kNV accumulators
// in registers over the whole k loop (per k: kNV loads of wt, kMR broadcasts of x, kMR *
// kNV FMAs; AVX-512 12 x 32 = 24 of the 32 registers, AVX2 6 x 16 = 12 of 16). Rows go in
// blocks of about kRowBlockFloats of x (L2-resident) and each block sweeps every column
// panel of wt, so x is read from memory once and wt from L2/L3 once per block. Each
// output element is one float32 dot product accumulated in k order, as BLAS does.
//
// No include guard on purpose: included once per ISA by isa_kernels.inc, after
// vec_math.h, inside namespace effnet::cpu_gemm::<isa>.

inline constexpr int kGemmLanes = kLanes<float>;
using GemmVec = Vec<float, kGemmLanes>;
// Vectors per column panel and rows per micro tile.
inline constexpr int kNV = 2;
inline constexpr int kMR = kVecBytes >= 64 ? 12 : 6;
// x floats per row block: 256 KiB.
inline constexpr int64_t kRowBlockFloats = int64_t(1) << 16;

// a * b + c in one rounding (an explicit FMA instruction where the ISA has one).
template <class V>
inline V gemm_fma(V a, V b, V c) {
#ifdef EFFNET_CPU_X86
  if constexpr (sizeof(V) == 64 && kVecBytes == 64) {
    return reinterpret_cast<V>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a),
                                               reinterpret_cast<__m512>(b),
                                               reinterpret_cast<__m512>(c)));
  } else if constexpr (sizeof(V) == 32 && kVecBytes == 32) {
    return reinterpret_cast<V>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a),
                                               reinterpret_cast<__m256>(b),
                                               reinterpret_cast<__m256>(c)));
  }
#endif
  return a * b + c;
}

// MR rows x NV vectors of y; the last vector keeps its first `tail` lanes (tail <= lanes).
template <int MR, int NV>
inline void micro_tile(const float* x, int64_t ldx, const float* wt, int64_t ldw, float* y,
                       int64_t ldy, int64_t cin, int tail) {
  GemmVec acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = GemmVec{};
  }
  for (int64_t k = 0; k < cin; ++k) {
    GemmVec b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = vload<GemmVec>(wt + k * ldw + v * kGemmLanes);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const GemmVec a = vsplat<GemmVec>(x[i * ldx + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = gemm_fma(a, b[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* row = y + i * ldy;
#pragma GCC unroll 4
    for (int v = 0; v + 1 < NV; ++v) vstore(row + v * kGemmLanes, acc[i][v]);
    if (tail == kGemmLanes) {
      vstore(row + (NV - 1) * kGemmLanes, acc[i][NV - 1]);
    } else {
      std::memcpy(row + (NV - 1) * kGemmLanes, &acc[i][NV - 1], sizeof(float) * tail);
    }
  }
}

// A micro tile of m < MR rows (the last rows of a block).
template <int NV, int MR = kMR - 1>
inline void short_tile(int64_t m, const float* x, int64_t ldx, const float* wt, int64_t ldw,
                       float* y, int64_t ldy, int64_t cin, int tail) {
  if constexpr (MR >= 1) {
    if (m == MR) return micro_tile<MR, NV>(x, ldx, wt, ldw, y, ldy, cin, tail);
    short_tile<NV, MR - 1>(m, x, ldx, wt, ldw, y, ldy, cin, tail);
  }
}

template <int NV>
inline void panel_rows(const float* x, int64_t ldx, const float* wt, int64_t ldw, float* y,
                       int64_t ldy, int64_t rows, int64_t cin, int tail) {
  int64_t r = 0;
  for (; r + kMR <= rows; r += kMR) {
    micro_tile<kMR, NV>(x + r * ldx, ldx, wt, ldw, y + r * ldy, ldy, cin, tail);
  }
  if (r < rows) short_tile<NV>(rows - r, x + r * ldx, ldx, wt, ldw, y + r * ldy, ldy, cin, tail);
}

// y[:, col0:col1] of y = x w^T for x (rows, cin); col0 is a multiple of the panel width
// kNV * lanes (or col1 == ldw's last panel start); single-threaded.
void gemm_packed(const float* x, int64_t ldx, const float* wt, int64_t ldw, float* y,
                 int64_t ldy, int64_t rows, int64_t cin, int64_t col0, int64_t col1) {
  constexpr int64_t panel = kNV * kGemmLanes;
  const int64_t block = std::max<int64_t>(kMR, kRowBlockFloats / std::max<int64_t>(cin, 1) / kMR * kMR);
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t m = std::min(block, rows - r0);
    for (int64_t j = col0; j < col1; j += panel) {
      const int64_t cols = std::min(panel, col1 - j);
      const float* xb = x + r0 * ldx;
      float* yb = y + r0 * ldy + j;
      if (cols > kGemmLanes) {
        panel_rows<2>(xb, ldx, wt + j, ldw, yb, ldy, m, cin, int(cols - kGemmLanes));
      } else {
        panel_rows<1>(xb, ldx, wt + j, ldw, yb, ldy, m, cin, int(cols));
      }
    }
  }
}

// The column padding unit of wt (floats per vector); panels are kNV of them.
int64_t packed_lanes() { return kGemmLanes; }

// wt[k * ldw + o] = w[o * cin + k] for o < cout, k < cin (ldw >= cout; the caller zeroes
// the padding columns): w^T in 8 x 8 register transposes (depthwise_planar.h).
void pack_wt(const float* w, int64_t cout, int64_t cin, float* wt, int64_t ldw) {
  ::effnet::cpu_dw::EFFNET_ISA::transpose_block<float, float>(w, cin, wt, ldw, cout, cin);
}

// The first n (< lanes) floats at p into a vector, zeros after them.
template <class V = GemmVec>
inline V load_part(const float* p, int n) {
#ifdef EFFNET_CPU_X86
  if constexpr (sizeof(V) == 64 && kVecBytes == 64) {
    return reinterpret_cast<V>(_mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p));
  }
#endif
  V v{};
  std::memcpy(&v, p, sizeof(float) * n);
  return v;
}

// The weight gradient's product, y (+)= a^T b over `count` rows: a (count, M) rows lda
// apart, b (count, N) rows ldb apart, y (M, N) rows ldy apart; here row p of a and b is
// the reduction index, so a micro tile broadcasts MR consecutive values of a's row p and
// loads NV vectors of b's row p (the last one `tail` lanes wide, masked: b has no
// padding). Each output is one float32 sum in p order.
template <int MR, int NV>
inline void micro_tile_tn(const float* a, int64_t lda, const float* b, int64_t ldb, float* y,
                          int64_t ldy, int64_t count, int tail, bool accumulate) {
  GemmVec acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = GemmVec{};
  }
  for (int64_t p = 0; p < count; ++p) {
    GemmVec bv[NV];
    const float* brow = b + p * ldb;
#pragma GCC unroll 4
    for (int v = 0; v + 1 < NV; ++v) bv[v] = vload<GemmVec>(brow + v * kGemmLanes);
    bv[NV - 1] = tail == kGemmLanes ? vload<GemmVec>(brow + (NV - 1) * kGemmLanes)
                                    : load_part(brow + (NV - 1) * kGemmLanes, tail);
    const float* arow = a + p * lda;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const GemmVec s = vsplat<GemmVec>(arow[i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = gemm_fma(s, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* row = y + i * ldy;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int n = v + 1 < NV ? kGemmLanes : tail;
      GemmVec out = acc[i][v];
      if (accumulate) out += n == kGemmLanes ? vload<GemmVec>(row + v * kGemmLanes)
                                              : load_part(row + v * kGemmLanes, n);
      if (n == kGemmLanes) {
        vstore(row + v * kGemmLanes, out);
      } else {
        std::memcpy(row + v * kGemmLanes, &out, sizeof(float) * n);
      }
    }
  }
}

template <int NV, int MR = kMR - 1>
inline void short_tile_tn(int64_t m, const float* a, int64_t lda, const float* b, int64_t ldb,
                          float* y, int64_t ldy, int64_t count, int tail, bool accumulate) {
  if constexpr (MR >= 1) {
    if (m == MR) return micro_tile_tn<MR, NV>(a, lda, b, ldb, y, ldy, count, tail, accumulate);
    short_tile_tn<NV, MR - 1>(m, a, lda, b, ldb, y, ldy, count, tail, accumulate);
  }
}

// dw (cout, cin) (+)= dy^T x for dy (rows, cout) and x (rows, cin), both row-major;
// single-threaded.
void gemm_dtx_native(const float* dy, const float* x, float* dw, int64_t rows, int64_t cin,
                     int64_t cout, bool accumulate) {
  constexpr int64_t panel = kNV * kGemmLanes;
  for (int64_t j = 0; j < cin; j += panel) {
    const int64_t cols = std::min(panel, cin - j);
    const int nv = cols > kGemmLanes ? 2 : 1;
    const int tail = int(cols - (nv - 1) * kGemmLanes);
    for (int64_t o = 0; o < cout; o += kMR) {
      const int64_t m = std::min<int64_t>(kMR, cout - o);
      float* yt = dw + o * cin + j;
      if (m == kMR) {
        if (nv == 2) micro_tile_tn<kMR, 2>(dy + o, cout, x + j, cin, yt, cin, rows, tail, accumulate);
        else micro_tile_tn<kMR, 1>(dy + o, cout, x + j, cin, yt, cin, rows, tail, accumulate);
      } else if (nv == 2) {
        short_tile_tn<2>(m, dy + o, cout, x + j, cin, yt, cin, rows, tail, accumulate);
      } else {
        short_tile_tn<1>(m, dy + o, cout, x + j, cin, yt, cin, rows, tail, accumulate);
      }
    }
  }
}
