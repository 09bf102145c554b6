// Float32 GEMM y = x w^T on a packed w^T, register-blocked for this ISA (the native
// alternative to the BLAS sgemm_ in sgemm.h; which one runs is packed_gemm.h's policy).
//
//   y[r, j] = sum_k x[r, k] * wt[k, j]        r < rows, col0 <= j < col1
//
// Layout: x rows are ldx floats apart (the NHWC pixels of a channels_last activation),
// y rows ldy apart; wt is w^T packed by pack_wt (below; packed_gemm.cpp calls it) panel
// by panel: the columns go in panels of kNV vectors, and each panel's (cin, width) block
// of w^T is contiguous (width = kNV * lanes, the last one cout's remainder rounded up to
// the padding unit packed_unit(), zero padded past cout), so panel j0 starts at
// wt + j0 * cin and a micro tile streams its operand from consecutive memory. ldw is cout
// rounded up to that unit (the packed size is cin * ldw).
//
// Blocking: a micro tile of kMR rows x kNV vectors of columns keeps kMR * kNV accumulators
// in registers over the whole k loop (per k: kNV loads of wt, kMR broadcasts of x, kMR *
// kNV FMAs; AVX-512 12 x 32 = 24 of the 32 registers, AVX2 6 x 16 = 12 of 16). On AVX-512
// a panel's last 8 or fewer columns take a half vector (8 floats, a 256-bit register)
// instead of a full one: this project's AMD EPYC (Zen 5) machine issues 256-bit FMAs at
// twice the rate of 512-bit ones (7.3 against 3.7 per ns in a register-only loop; Zen 4
// splits 512-bit ops the same way), so a 24-column panel (B0's 24-channel projections,
// the input gradient of its 24-channel expands) costs 3/4 of a 32-column one instead of
// all of it; where both widths issue at one rate the instruction count is that of a
// masked full vector. Rows go in
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
// Half vectors: AVX-512 only (an AVX2 half would be 4 floats, no faster per float).
inline constexpr bool kHalfVectors = kVecBytes == 64;
inline constexpr int kHalfLanes = kGemmLanes / 2;
using HalfVec = Vec<float, kHalfLanes>;
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
  } else if constexpr (sizeof(V) == 32 && kVecBytes >= 32) {
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
  } else if constexpr (sizeof(V) == 32 && kVecBytes == 64) {
    return reinterpret_cast<V>(_mm256_maskz_loadu_ps(__mmask8((1u << n) - 1), p));
  }
#endif
  V v{};
  std::memcpy(&v, p, sizeof(float) * n);
  return v;
}

// The low half of a full vector (no instruction on x86: the same register).
template <class V = GemmVec>
inline HalfVec low_half(V v) {
#ifdef EFFNET_CPU_X86
  if constexpr (sizeof(V) == 64 && kVecBytes == 64) {
    return reinterpret_cast<HalfVec>(_mm512_castps512_ps256(reinterpret_cast<__m512>(v)));
  }
#endif
  HalfVec h;
  std::memcpy(&h, &v, sizeof(h));
  return h;
}

// Stores the first n floats of v at p.
template <class V>
inline void store_part(float* p, V v, int n) {
  if (n == kCount<V>) {
    vstore(p, v);
  } else {
    std::memcpy(p, &v, sizeof(float) * n);
  }
}

// The operands of one micro tile of MR rows x NV vectors:
//   y[i, j] (+)= sum_k a[i * a_row + k * a_k] * b[k * ldb + j]      k < count
// or, with tap offsets (a_off), a[i * a_row + a_off[k]] in place of a[i * a_row + k * a_k].
// gemm_packed: a = x (a_row = ldx, a_k = 1), b = the packed wt; gemm_dtx_native: a = dy
// (a_row = 1, a_k = Cout), b = x; gemm_packed_taps: a = input pixels read through the
// offsets of a conv's taps. b's last vector (full or half) has load_tail valid lanes (all
// when b is zero padded, the rest masked to zeros otherwise), y's last vector store_tail.
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

// One micro tile: MR rows x (NV full vectors, then a half vector if HALF) of columns.
template <int MR, int NV, bool HALF, bool Taps>
inline void micro_tile(const TileArgs& t) {
  constexpr int NA = NV > 0 ? NV : 1;  // array sizes (NV = 0: a half vector only)
  const float* a = t.a;
  const float* b = t.b;
  const int64_t a_row = t.a_row, a_k = t.a_k, ldb = t.ldb;
  const int load_tail = t.load_tail;
  GemmVec acc[MR][NA];
  HalfVec hacc[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = GemmVec{};
    if constexpr (HALF) hacc[i] = HalfVec{};
  }
  for (int64_t k = 0; k < t.count; ++k) {
    const float* brow = b + k * ldb;
    GemmVec bv[NA];
    HalfVec hv{};
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const bool tail = !HALF && v + 1 == NV && load_tail != kGemmLanes;
      bv[v] = tail ? load_part(brow + v * kGemmLanes, load_tail)
                   : vload<GemmVec>(brow + v * kGemmLanes);
    }
    if constexpr (HALF) {
      hv = load_tail == kHalfLanes ? vload<HalfVec>(brow + NV * kGemmLanes)
                                   : load_part<HalfVec>(brow + NV * kGemmLanes, load_tail);
    }
    const float* ak = Taps ? a + t.a_off[k] : a + k * a_k;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const GemmVec s = vsplat<GemmVec>(ak[i * a_row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = gemm_fma(s, bv[v], acc[i][v]);
      if constexpr (HALF) hacc[i] = gemm_fma(low_half(s), hv, hacc[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* row = t.y + i * t.ldy;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int n = HALF || v + 1 < NV ? kGemmLanes : t.store_tail;
      GemmVec out = acc[i][v];
      if (t.accumulate) {
        out += n == kGemmLanes ? vload<GemmVec>(row + v * kGemmLanes)
                               : load_part(row + v * kGemmLanes, n);
      }
      store_part(row + v * kGemmLanes, out, n);
    }
    if constexpr (HALF) {
      HalfVec out = hacc[i];
      if (t.accumulate) out += load_part<HalfVec>(row + NV * kGemmLanes, t.store_tail);
      store_part(row + NV * kGemmLanes, out, t.store_tail);
    }
  }
}

// A micro tile of m < MR rows (the last rows).
template <int NV, bool HALF, bool Taps, int MR = kMR - 1>
inline void short_tile(int64_t m, const TileArgs& t) {
  if constexpr (MR >= 1) {
    if (m == MR) return micro_tile<MR, NV, HALF, Taps>(t);
    short_tile<NV, HALF, Taps, MR - 1>(m, t);
  }
}

// m rows of one column panel, kMR rows at a time.
template <int NV, bool HALF, bool Taps>
inline void tile_rows(int64_t m, TileArgs t) {
  int64_t r = 0;
  for (; r + kMR <= m; r += kMR) {
    micro_tile<kMR, NV, HALF, Taps>(t);
    t.a += kMR * t.a_row;
    t.y += kMR * t.ldy;
  }
  if (r < m) short_tile<NV, HALF, Taps>(m - r, t);
}

// m rows of the column panel of `cols` (<= kNV * lanes) columns that t starts at; b is zero
// padded past them (to packed_unit()) or not. The columns go in full vectors, the last 8 or
// fewer in a half vector where the ISA has them (and half_vectors() is on).
template <bool Taps = false>
inline void panel_rows(int64_t m, TileArgs t, int64_t cols, bool padded_b) {
  static_assert(kNV == 2, "the column split below covers panels of two vectors");
  const int rem = int(cols % kGemmLanes);
  const bool short_last = kHalfVectors && rem > 0 && rem <= kHalfLanes;
  const bool half = short_last && half_vectors();
  const int full = int(cols / kGemmLanes) + (rem > 0 && !half ? 1 : 0);
  t.store_tail = rem == 0 ? kGemmLanes : rem;
  // A padded b holds whole vectors, except past a short last vector: only a half one.
  t.load_tail = half ? (padded_b ? kHalfLanes : rem)
                     : padded_b && !short_last ? kGemmLanes : t.store_tail;
  if constexpr (kHalfVectors) {
    if (half) return full == 0 ? tile_rows<0, true, Taps>(m, t) : tile_rows<1, true, Taps>(m, t);
  }
  if (full == 2) {
    tile_rows<2, false, Taps>(m, t);
  } else {
    tile_rows<1, false, Taps>(m, t);
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

// dw (cout, cin) (+)= dy^T x for dy (rows, cout; its rows ld_dy apart, so a column block
// of a wider dy) and x (rows, cin), both row-major (the weight gradient: rows are the
// reduction index, x is not padded); single-threaded. Each dw element is one FMA chain
// over the rows in order, whatever block of dw a call covers.
void gemm_dtx_native(const float* dy, int64_t ld_dy, const float* x, float* dw, int64_t rows,
                     int64_t cin, int64_t cout, bool accumulate) {
  constexpr int64_t panel = kNV * kGemmLanes;
  for (int64_t j = 0; j < cin; j += panel) {
    const TileArgs t{dy, 1, ld_dy, nullptr, x + j, cin, dw + j, cin, rows, 0, 0, accumulate};
    panel_rows(cout, t, std::min(panel, cin - j), false);
  }
}

// Columns per panel of wt (kNV vectors), and its padding unit: a half vector where the ISA
// has them (a panel's last 8 or fewer columns are read as one), else a vector.
int64_t packed_panel() { return kNV * kGemmLanes; }
int64_t packed_unit() { return kHalfVectors ? kHalfLanes : kGemmLanes; }

// w (cout, cin) into gemm_packed's panel layout for ldw = cout rounded up to
// packed_unit(): panel j0's block wt[j0 * cin + k * width + o] = w[(j0 + o) * cin + k] for
// o < width, k < cin (the caller zeroes the padding columns), each panel's w^T in 8 x 8
// register transposes (depthwise_planar.h).
void pack_wt(const float* w, int64_t cout, int64_t cin, float* wt, int64_t ldw) {
  constexpr int64_t panel = kNV * kGemmLanes;
  for (int64_t j = 0; j < cout; j += panel) {
    ::effnet::cpu_dw::EFFNET_ISA::transpose_block<float, float>(
        w + j * cin, cin, wt + j * cin, std::min(panel, ldw - j), std::min(panel, cout - j), cin);
  }
}
