// Row access of the fused depthwise conv + BN + activation's CPU kernels, channels_last:
// the input rows a conv reads (RowSource, zero margins, the zero row), the pixel tiles
// and 8-pixel blocks the row kernels sweep, the block's window of input vectors
// (ColumnRun / ColumnList), the conv of one block (conv_pixels) and the software prefetch.
//
// No include guard on purpose: depthwise_kernels.h includes it once per ISA, inside that
// ISA's namespace (see depthwise_kernels.h's header for the layout and the work units).

// Runs f.template operator()<K>() for the runtime kernel size k in {1, 3, 5, 7}.
template <class F>
inline void with_kernel_size(int64_t k, F&& f) {
  switch (k) {
    case 1: return f.template operator()<1>();
    case 3: return f.template operator()<3>();
    case 5: return f.template operator()<5>();
    default: return f.template operator()<7>();
  }
}

// v[i] = act(v[i]) for i < n contiguous values. The passes apply the activation to a
// whole pixel tile after its conv instead of inside the conv's per-pixel callback: the
// tap loop keeps its K * K weight vectors in registers, and the activation's long
// dependency chains of independent vectors overlap (measured 8-20% faster, B0 shapes).
template <typename A>
inline void act_in_place(A* v, int64_t n, int64_t act) {
  auto body = [&]<int ACT>() {
    for_channel_vectors<A>(n, [&](int64_t i, auto proto) {
      using V = decltype(proto);
      vstore(v + i, act_forward(vload<V>(v + i), ACT));
    });
  };
  if (act != 0) with_act_code(act, body);
}

// dst[i] = src[i] converted from storage type X to A (or back), i < n.
template <typename X, typename A>
inline void load_row(const X* src, A* dst, int64_t n) {
  for_channel_vectors<A>(n, [&](int64_t i, auto proto) {
    vstore(dst + i, load_as<decltype(proto)>(src + i));
  });
}

template <typename A, typename X>
inline void store_row(const A* src, X* dst, int64_t n) {
  for_channel_vectors<A>(n, [&](int64_t i, auto proto) {
    store_as(dst + i, vload<decltype(proto)>(src + i));
  });
}

// Output pixels per block of the conv and dx loops: eight accumulators are eight
// independent FMA chains (two FMA ports times four cycles of latency), and only one
// kernel row of weights (K vectors) is live at a time, so nothing spills.
constexpr int kBlock = 8;

// Whether the conv passes read x through zero-padded row copies: every block of output
// pixels then reads its whole window without border tests. Worth the copy for 5x5 and 7x7
// kernels and for narrow rows, where border blocks are most of the work; wide rows of a
// 3x3 conv (memory-bound, two border blocks in many) and unit kernels read float storage
// in place (measured on B0's layers: the copy costs more than the border blocks there).
inline bool padded_rows(const Geo& g) { return g.K >= 5 || (g.K == 3 && g.W <= 32); }

// Columns [-pl, W + right_pad) of a padded row: enough for the last block of kBlock
// output pixels (blocks start at multiples of kBlock, see for_pixel_tiles) to read its
// whole window.
inline int64_t row_right_pad(const Geo& g) {
  const int64_t last_col = (((g.OW - 1) / kBlock) * kBlock + kBlock - 1) * g.S - g.pl + g.K - 1;
  return std::max<int64_t>(0, last_col + 1 - g.W);
}

// The columns [lo, hi) that RowSource's rows can be read at.
struct ColumnRange {
  int64_t lo, hi;
};

inline ColumnRange readable_columns(const Geo& g) {
  if (padded_rows(g)) return {-g.pl, g.W + row_right_pad(g)};
  return {0, g.W};
}

// `rows` rows of `stride` values of A, each zero in [0, lead) and [lead + width, stride);
// the middle [lead, lead + width), which row(r) points at, is left uninitialized for the
// owner to write before reading (only the margins are cleared: zeroing whole caches cost
// about 4 % of a single-thread forward on B0's 1152x7x7 and 672x14x14 k5 layers).
template <typename A>
class MarginRows {
 public:
  MarginRows(int64_t rows, int64_t stride, int64_t lead, int64_t width)
      : stride_(stride), lead_(lead), data_(new A[rows * stride]) {
    for (int64_t r = 0; r < rows; ++r) {
      A* row = data_.get() + r * stride;
      std::fill(row, row + lead, A(0));
      std::fill(row + lead + width, row + stride, A(0));
    }
  }
  A* row(int64_t r) { return data_.get() + r * stride_ + lead_; }

 private:
  int64_t stride_, lead_;
  std::unique_ptr<A[]> data_;
};

// Input rows of x as A pointers, readable at readable_columns(g) (zeros outside the
// image). Padded rows and rows of half types (converted
// to A) are copied into a cache of K rows (slot ih % K is unique among K consecutive
// rows), so each input row is copied once per run of consecutive output rows; unpadded
// float rows are read in place. Rows outside the image are a row of zeros.
template <typename X, typename A>
class RowSource {
 public:
  RowSource(const X* x, const Geo& g)
      : x_(x), H_(g.H), K_(g.K), WC_(g.W * g.C), copy_(!std::is_same_v<X, A> || padded_rows(g)),
        lead_(-readable_columns(g).lo * g.C),
        span_((readable_columns(g).hi - readable_columns(g).lo) * g.C), zero_(span_, A(0)),
        cache_(copy_ ? K_ : 0, span_, lead_, WC_), tag_(copy_ ? K_ : 0, -1) {}

  const A* zeros() const { return zero_.data() + lead_; }

  // Input row ih of image n where it is stored in x (nullptr outside the image).
  const X* stored_row(int64_t n, int64_t ih) const {
    return ih < 0 || ih >= H_ ? nullptr : x_ + (n * H_ + ih) * WC_;
  }

  const A* row(int64_t n, int64_t ih) {
    if (ih < 0 || ih >= H_) return zeros();
    const X* src = x_ + (n * H_ + ih) * WC_;
    if constexpr (std::is_same_v<X, A>) {
      if (!copy_) return src;
    }
    const int64_t slot = ih % K_;
    A* dst = cache_.row(slot);
    if (tag_[slot] != n * H_ + ih) {
      load_row(src, dst, WC_);
      tag_[slot] = n * H_ + ih;
    }
    return dst;
  }

 private:
  const X* x_;
  int64_t H_, K_, WC_;
  bool copy_;
  int64_t lead_, span_;
  std::vector<A> zero_;
  MarginRows<A> cache_;
  std::vector<int64_t> tag_;
};

// A row of dy (read) or of out/dx (written) seen as A values: in place for float
// storage, through a converted buffer for half types.
template <typename X, typename A>
class RowView {
 public:
  explicit RowView(int64_t n) : buf_(std::is_same_v<X, A> ? 0 : n) {}

  const A* read(const X* src, int64_t n) {
    if constexpr (std::is_same_v<X, A>) {
      return src;
    } else {
      load_row(src, buf_.data(), n);
      return buf_.data();
    }
  }

  A* target(X* dst) {
    if constexpr (std::is_same_v<X, A>) {
      return dst;
    } else {
      return buf_.data();
    }
  }

  void commit(X* dst, int64_t n) {
    if constexpr (!std::is_same_v<X, A>) store_row(buf_.data(), dst, n);
  }

 private:
  std::vector<A> buf_;
};

// rows[kh] = input row oh * S - pt + kh of image n for kh < K, and rows[K] = a row of zeros
// (for the columns outside the image); rows holds K + 1 pointers.
// src is a RowSource, or anything with its row(n, ih) and zeros() (ExpandedRows).
template <int K, class Source, typename A>
inline void gather_rows(Source& src, const Geo& g, int64_t n, int64_t oh, const A** rows) {
  for (int kh = 0; kh < K; ++kh) rows[kh] = src.row(n, oh * g.S - g.pt + kh);
  rows[K] = src.zeros();
}

// Output pixels [t0, t1) of one row are processed as tiles: every channel vector sweeps
// the tile before the next tile starts, so the tile's K input rows, dy and output
// (about K + 2 rows of C values per pixel) stay in L1 instead of being streamed from L2
// once per channel vector (C / lanes times per row). Tiles are whole blocks of kBlock
// pixels (the conv loops' unit).
template <typename A, class F>
inline void for_pixel_tiles(int64_t n, int64_t C, int K, F&& f) {
  const int64_t per_pixel = std::max<int64_t>(1, C * int64_t(sizeof(A)) * (K + 2));
  const int64_t tile =
      std::max<int64_t>(kBlock, (int64_t(24) << 10) / per_pixel / kBlock * kBlock);
  for (int64_t t0 = 0; t0 < n; t0 += tile) f(t0, std::min(n, t0 + tile));
}

// The input vectors of one kernel row of a block's window, left to right: consecutive
// pixels C values apart (interior blocks) ...
template <class V>
struct ColumnRun {
  const ElemOf<V>* p;
  int64_t step;
  V next() {
    const V v = vload<V>(p);
    p += step;
    return v;
  }
};

// ... or one pointer per column, the zero row standing in for columns outside the image
// (blocks that touch the left or right border).
template <class V>
struct ColumnList {
  const ElemOf<V>* const* col;
  int64_t c;
  int j = 0;
  V next() { return vload<V>(col[j++] + c); }
};

// Calls f(o, kw, x) for the taps of one kernel row over a block of kBlock output pixels
// o at stride S, where x is the j-th input vector of the row's columns `col` and
// kw = j - o * S: each input vector is loaded once and fed to every tap it meets (for a
// fixed o, kw ascends).
template <int K, int S, class Col, class F>
inline void for_row_taps(Col col, F&& f) {
  constexpr int J = (kBlock - 1) * S + K;
#pragma GCC unroll 32
  for (int j = 0; j < J; ++j) {
    const auto x = col.next();
#pragma GCC unroll 8
    for (int o = 0; o < kBlock; ++o) {
      const int kw = j - o * S;
      if (kw >= 0 && kw < K) f(o, kw, x);
    }
  }
}

// Calls f(columns) for one block of kBlock output pixels at stride S whose window starts
// at input column iw0, with columns(kh) the window's input vectors of kernel row kh (of
// channel vector c): a ColumnRun where the window lies in the readable columns, else a
// ColumnList with the zero row (rows[K]) for the columns outside the image.
template <int K, int S, class V, class F>
inline void with_block_columns(const ElemOf<V>* const* rows, const Geo& g,
                               const ColumnRange& readable, int64_t iw0, int64_t c, F&& f) {
  constexpr int J = (kBlock - 1) * S + K;
  if (iw0 >= readable.lo && iw0 + J <= readable.hi) {
    f([&](int kh) { return ColumnRun<V>{rows[kh] + iw0 * g.C + c, g.C}; });
    return;
  }
  const ElemOf<V>* cols[K][J];
  for (int kh = 0; kh < K; ++kh) {
    for (int j = 0; j < J; ++j) {
      const int64_t iw = iw0 + j;
      cols[kh][j] = iw >= 0 && iw < g.W ? rows[kh] + iw * g.C : rows[K];
    }
  }
  f([&](int kh) { return ColumnList<V>{cols[kh], c}; });
}

// acc[o] = sum over (kh, kw), in that order, of w[kh][kw] * x[kh][o * S + kw] for the
// kBlock outputs o of a block, where x[kh][j] is the j-th vector of columns(kh) and the
// weights w[kh][kw] are at wc + (kh * K + kw) * C.
template <int K, int S, class V, class Columns>
inline void conv_pixels(const ElemOf<V>* wc, int64_t C, Columns&& columns, V* acc) {
#pragma GCC unroll 8
  for (int o = 0; o < kBlock; ++o) acc[o] = V{};
#pragma GCC unroll 7
  for (int kh = 0; kh < K; ++kh) {
    V w[K];
#pragma GCC unroll 7
    for (int kw = 0; kw < K; ++kw, wc += C) w[kw] = vload<V>(wc);
    for_row_taps<K, S>(columns(kh), [&](int o, int kw, V x) { acc[o] += x * w[kw]; });
  }
}

// One channel vector of output pixels [ow0, ow1) of a conv row at stride S: calls
// f(ow, y). Pixels go in blocks of kBlock; a block whose window leaves the readable
// columns of the rows (RowSource) reads zeros there (rows[K] is a row of zeros), and the
// outputs of a block past ow1 are dropped.
template <int K, int S, class V, class F>
inline void conv_row_blocks(const ElemOf<V>* const* rows, const ElemOf<V>* wt, const Geo& g,
                            int64_t c, int64_t ow0, int64_t ow1, F&& f) {
  constexpr int B = kBlock;
  const ColumnRange readable = readable_columns(g);
  for (int64_t ow = ow0; ow < ow1; ow += B) {
    V acc[B];
    with_block_columns<K, S, V>(rows, g, readable, ow * S - g.pl, c, [&](auto&& columns) {
      conv_pixels<K, S, V>(wt + c, g.C, columns, acc);
    });
    const int64_t n = std::min<int64_t>(B, ow1 - ow);
    for (int o = 0; o < n; ++o) f(ow + o, acc[o]);
  }
}

template <int K, class V, class F>
inline void conv_block(const ElemOf<V>* const* rows, const ElemOf<V>* wt, const Geo& g,
                       int64_t c, int64_t ow0, int64_t ow1, F&& f) {
  if (g.S == 1) {
    conv_row_blocks<K, 1, V>(rows, wt, g, c, ow0, ow1, f);
  } else {
    conv_row_blocks<K, 2, V>(rows, wt, g, c, ow0, ow1, f);
  }
}

// ---- software prefetch ----------------------------------------------------------------
// On the development machine (2-core x86 VM) the hardware prefetchers do not keep the
// conv passes fed on activations of several MB: with the row pointers, dy and the
// outputs streamed K + 2 at a time and 20-30 vector ops per cache line between them,
// the passes ran at 40-60 % of copy bandwidth. Each callback that touches one channel
// vector of pixel ow therefore asks for the same vector of pixel ow + g.pf of every
// stream it reads or writes for the first time (the newest input row(s), dy, y, g, out,
// dx), into L2 (prefetcht1, locality 2). The driver sets g.pf (a few KB ahead) only for
// large float tensors; small layers stay in L2 and the extra instructions would cost.
// The address is formed as an integer: it may lie past the end of the row (the next
// row, or past the tensor on the last one), which a prefetch never faults on.
template <class T>
inline void prefetch_read(const T* p, int64_t i) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + i * sizeof(T)),
                     0, 2);
}

template <class T>
inline void prefetch_write(const T* p, int64_t i) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + i * sizeof(T)),
                     1, 2);
}

// The input vectors that output pixel ow + g.pf of channel vector c will need from the
// rows the previous output row did not read: the last row at stride 1, the last two
// (both columns of each output pixel) at stride 2.
template <int K, class T>
inline void prefetch_input(const T* const* rows, const Geo& g, int64_t ow, int64_t c) {
  const int64_t at = (ow + g.pf) * g.S * g.C + c;
  prefetch_read(rows[K - 1], at);
  if (g.S == 2) {
    prefetch_read(rows[K - 1], at + g.C);
    if constexpr (K > 1) {
      prefetch_read(rows[K - 2], at);
      prefetch_read(rows[K - 2], at + g.C);
    }
  }
}

// Upcoming input (the next row's new lines of x, dy and a kept y) prefetched during a
// phase that computes on data already in cache: the M2 sweep of the statistics pass and
// the dx gather of the backward. Without it the memory streams idle through those phases
// and the next row's first loads wait for DRAM. Measured on 8x96x112x112 k3 with the
// caches full of other data: the statistics pass 12-28 % faster, dx + dweight 7-16 %, the
// whole training call 3-5 % (interleaved A/B). step(i) is called for the phase's vector at
// value offset i of its own span of `span` values and prefetches the matching share of
// each range, so the ranges are covered once the phase has walked its span.
template <typename A>
class Lookahead {
 public:
  explicit Lookahead(int64_t span) : span_(std::max<int64_t>(span, 1)) {}

  void add(const A* p, int64_t len) {
    if (p == nullptr || len <= 0 || n_ == 3) return;
    p_[n_] = p;
    ratio_[n_++] = (len + span_ - 1) / span_;
  }

  void step(int64_t i) const {
    for (int k = 0; k < n_; ++k) {
      for (int64_t j = 0; j < ratio_[k]; ++j) prefetch_read(p_[k], i * ratio_[k] + j * kLanes<A>);
    }
  }

 private:
  int64_t span_;
  const A* p_[3] = {nullptr, nullptr, nullptr};
  int64_t ratio_[3] = {0, 0, 0};
  int n_ = 0;
};
