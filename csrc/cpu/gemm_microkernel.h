// Float32 GEMM y = x w^T on a packed w^T, register-blocked for this ISA (the native
// alternative to the BLAS sgemm_ in sgemm.h; which one runs is packed_gemm.h's policy).
//
//   y[r, j] = sum_k x[r, k] * wt[k, j]        r < rows, col0 <= j < col1
//
// Layout: x rows are ldx floats apart (the NHWC pixels of a channels_last activation),
// y rows ldy apart; wt is w^T packed by pack_wt (below; packed_gemm.cpp calls it) panel
// by panel: the columns go in panels of kNV vectors, and each panel's (cin, width) block
// of w^T is contiguous (width = kNV * lanes, the last one cout's remainder rounded up to
// whole vectors, zero padded past cout), so panel j0 starts at wt + j0 * cin and a micro
// tile streams its operand from consecutive memory. ldw is cout rounded up to whole
// vectors (the packed size is cin * ldw).
//
// Blocking: a micro tile of kMR rows x kNV vectors of columns keeps kMR * kNV accumulators
// in registers over the whole k loop (per k: kNV loads of wt, kMR broadcasts of x, kMR *
// kNV FMAs; AVX-512 12 x 32 = 24 of the 32 registers, AVX2 6 x 16 = 12 of 16). Rows go in
// blocks of about kRowBlockFloats of x (L2-resident) and each block sweeps every column
// panel of wt, so x is read from memory once and wt once per block: as one contiguous
// stream per panel, which the hardware prefetcher follows even where the weight is cold
// (a batch-1 inference reads every weight from L3 or memory; with w^T stored as one
// (cin, ldw) matrix, a panel was cin separate 128-byte pieces ldw floats apart). Each
// output element is one float32 dot product accumulated in k order. The same micro tiles
// run the weight gradient dw (+)= dy^T x (gemm_dtx_native), reducing over pixel rows, and
// a direct conv whose x rows are read through tap offsets (gemm_packed_taps).
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

// The operands of one micro tile of MR rows x NV vectors:
//   y[i, j] (+)= sum_k a[i * a_row + k * a_k] * b[k * ldb + j]      k < count
// or, with tap offsets (a_off), a[i * a_row + a_off[k]] in place of a[i * a_row + k * a_k].
// gemm_packed: a = x (a_row = ldx, a_k = 1), b = the packed wt; gemm_dtx_native: a = dy
// (a_row = 1, a_k = Cout), b = x; gemm_packed_taps: a = input pixels read through the
// offsets of a conv's taps. b's last vector has load_tail valid lanes (lanes when b is zero
// padded, the rest masked to zeros otherwise), y's last vector store_tail.
struct TileArgs {
  const float* a;
  int64_t a_row, a_k;
  const int64_t* a_off;  // tap offsets (Taps kernels only)
  const float* b;
  int64_t ldb;
  float* y;
  int64_t ldy, count;
  int load_tail, store_tail;
  bool accumulate;
};

template <int MR, int NV, bool Taps>
inline void micro_tile(const TileArgs& t) {
  const float* a = t.a;
  const float* b = t.b;
  const int64_t a_row = t.a_row, a_k = t.a_k, ldb = t.ldb;
  const int load_tail = t.load_tail;
  GemmVec acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = GemmVec{};
  }
  for (int64_t k = 0; k < t.count; ++k) {
    const float* brow = b + k * ldb;
    GemmVec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v + 1 < NV; ++v) bv[v] = vload<GemmVec>(brow + v * kGemmLanes);
    bv[NV - 1] = load_tail == kGemmLanes ? vload<GemmVec>(brow + (NV - 1) * kGemmLanes)
                                         : load_part(brow + (NV - 1) * kGemmLanes, load_tail);
    const float* ak = Taps ? a + t.a_off[k] : a + k * a_k;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const GemmVec s = vsplat<GemmVec>(ak[i * a_row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = gemm_fma(s, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* row = t.y + i * t.ldy;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int n = v + 1 < NV ? kGemmLanes : t.store_tail;
      GemmVec out = acc[i][v];
      if (t.accumulate) {
        out += n == kGemmLanes ? vload<GemmVec>(row + v * kGemmLanes)
                               : load_part(row + v * kGemmLanes, n);
      }
      if (n == kGemmLanes) {
        vstore(row + v * kGemmLanes, out);
      } else {
        std::memcpy(row + v * kGemmLanes, &out, sizeof(float) * n);
      }
    }
  }
}

// A micro tile of m < MR rows (the last rows).
template <int NV, bool Taps, int MR = kMR - 1>
inline void short_tile(int64_t m, const TileArgs& t) {
  if constexpr (MR >= 1) {
    if (m == MR) return micro_tile<MR, NV, Taps>(t);
    short_tile<NV, Taps, MR - 1>(m, t);
  }
}

// m rows of one column panel, kMR rows at a time.
template <int NV, bool Taps>
inline void tile_rows(int64_t m, TileArgs t) {
  int64_t r = 0;
  for (; r + kMR <= m; r += kMR) {
    micro_tile<kMR, NV, Taps>(t);
    t.a += kMR * t.a_row;
    t.y += kMR * t.ldy;
  }
  if (r < m) short_tile<NV, Taps>(m - r, t);
}

// m rows of the column panel of `cols` (<= kNV * lanes) columns that t starts at; b is zero
// padded past them or not.
template <bool Taps = false>
inline void panel_rows(int64_t m, TileArgs t, int64_t cols, bool padded_b) {
  const bool two = cols > kGemmLanes;
  t.store_tail = int(two ? cols - kGemmLanes : cols);
  t.load_tail = padded_b ? kGemmLanes : t.store_tail;
  if (two) {
    tile_rows<2, Taps>(m, t);
  } else {
    tile_rows<1, Taps>(m, t);
  }
}

// y[:, col0:col1] of y = x w^T for x (rows, cin); col0 is a multiple of the panel width
// kNV * lanes; single-threaded.
void gemm_packed(const float* x, int64_t ldx, const float* wt, int64_t ldw, float* y,
                 int64_t ldy, int64_t rows, int64_t cin, int64_t col0, int64_t col1) {
  constexpr int64_t panel = kNV * kGemmLanes;
  const int64_t block = std::max<int64_t>(kMR, kRowBlockFloats / std::max<int64_t>(cin, 1) / kMR * kMR);
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t m = std::min(block, rows - r0);
    for (int64_t j = col0; j < col1; j += panel) {
      const int64_t width = std::min(panel, ldw - j);
      const TileArgs t{x + r0 * ldx, ldx, 1, nullptr, wt + j * cin, width, y + r0 * ldy + j,
                       ldy, cin, 0, 0, false};
      panel_rows(m, t, std::min(panel, col1 - j), true);
    }
  }
}

// y[r, j] = sum_t a[r * a_row + off[t]] * wt[t, j] for r < rows, col0 <= j < col1:
// gemm_packed (wt packed the same way, with `taps` rows) whose x rows are read through tap
// offsets instead of stored: a direct conv, row r being an output pixel, a_row the input
// stride between neighbouring output pixels and off[t] the input offset of tap t
// (csrc/cpu/patch_conv.cpp); single-threaded.
void gemm_packed_taps(const float* a, int64_t a_row, const int64_t* off, int64_t taps,
                      const float* wt, int64_t ldw, float* y, int64_t ldy, int64_t rows,
                      int64_t col0, int64_t col1) {
  constexpr int64_t panel = kNV * kGemmLanes;
  for (int64_t j = col0; j < col1; j += panel) {
    const TileArgs t{a, a_row, 0, off, wt + j * taps, std::min(panel, ldw - j), y + j, ldy, taps,
                     0, 0, false};
    panel_rows<true>(rows, t, std::min(panel, col1 - j), true);
  }
}

// dw (cout, cin) (+)= dy^T x for dy (rows, cout) and x (rows, cin), both row-major (the
// weight gradient: rows are the reduction index, x is not padded); single-threaded.
void gemm_dtx_native(const float* dy, const float* x, float* dw, int64_t rows, int64_t cin,
                     int64_t cout, bool accumulate) {
  constexpr int64_t panel = kNV * kGemmLanes;
  for (int64_t j = 0; j < cin; j += panel) {
    const TileArgs t{dy, 1, cout, nullptr, x + j, cin, dw + j, cin, rows, 0, 0, accumulate};
    panel_rows(cout, t, std::min(panel, cin - j), false);
  }
}

// The column padding unit of wt (floats per vector); panels are kNV of them.
int64_t packed_lanes() { return kGemmLanes; }

// w (cout, cin) into gemm_packed's panel layout for ldw = cout rounded up to whole
// vectors: panel j0's block wt[j0 * cin + k * width + o] = w[(j0 + o) * cin + k] for
// o < width, k < cin (the caller zeroes the padding columns), each panel's w^T in 8 x 8
// register transposes (depthwise_planar.h).
void pack_wt(const float* w, int64_t cout, int64_t cin, float* wt, int64_t ldw) {
  constexpr int64_t panel = kNV * kGemmLanes;
  for (int64_t j = 0; j < cout; j += panel) {
    ::effnet::cpu_dw::EFFNET_ISA::transpose_block<float, float>(
        w + j * cin, cin, wt + j * cin, std::min(panel, ldw - j), std::min(panel, cout - j), cin);
  }
}
