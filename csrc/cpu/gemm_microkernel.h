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
