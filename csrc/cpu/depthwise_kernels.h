// Row kernels of the fused depthwise conv + BN + activation, channels_last layout.
//
// No include guard on purpose: each isa_*.cpp includes this once, inside its
// ISA's namespace and `#pragma GCC target`, after vec_math.h (see its header); Geo, Params,
// AccOf and chan_merge come from depthwise_passes.h.
//
// Layout: x is NHWC, so one image row is W * C values with the channel fastest; every
// inner loop runs over a vector of channels at one pixel. Weights arrive transposed to
// wt[kh][kw][c] (accumulation type A). The conv reads input rows through zero-padded
// copies (RowSource) and the dx gathers read zero-padded dyc rows, so their blocks of 8
// pixels never test a border; out-of-image rows read a shared row of zeros. The dweight
// sums read x like the conv (border blocks of unpadded rows through per-column pointers).
//
// Work units (chosen by the driver): output rows r = n * OH + oh for the three forward-
// style passes, (image, block of input rows) for the backward pass. Per-channel sums are
// accumulated per row in A, then added into the caller's double partials, which the
// driver merges in a fixed order: results do not depend on the thread count.

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

// ---- per-row cores (depend on K and the accumulation type A only) --------------------

// Per-channel moments of one row of y (y[OW][C] scratch), in the corrected two-pass form:
// mean[c] = m, the rounded mean of a first sweep, dev[c] = sum d with d = y - m, and
// m2[c] = sum d^2 - (sum d)^2 / OW; the row's mean is m + dev / OW (chan_merge takes it in
// double). Without the correction m's rounding enters M2 as OW * (m - mean)^2 (relative
// error ~1e-4 in float32 on channels whose mean is ~1e4 times their spread).
template <int K, typename A>
void moments_row(const Geo& g, const A* const* rows, const A* wt, A* y, A* mean, A* m2, A* dev,
                 const Lookahead<A>& ahead) {
  std::fill(mean, mean + g.C, A(0));
  std::fill(m2, m2 + g.C, A(0));
  std::fill(dev, dev + g.C, A(0));
  for_pixel_tiles<A>(g.OW, g.C, K, [&](int64_t t0, int64_t t1) {
    for_channel_vectors<A>(g.C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      V sum = vload<V>(mean + c);
      conv_block<K, V>(rows, wt, g, c, t0, t1, [&](int64_t ow, V v) {
        if (g.pf != 0) prefetch_input<K>(rows, g, ow, c), prefetch_write(y, (ow + g.pf) * g.C + c);
        sum += v;
        vstore(y + ow * g.C + c, v);
      });
      vstore(mean + c, sum);
    });
  });
  const A inv = A(1) / A(g.OW);
  for (int64_t c = 0; c < g.C; ++c) mean[c] *= inv;
  for_pixel_tiles<A>(g.OW, g.C, 0, [&](int64_t t0, int64_t t1) {
    for_channel_vectors<A>(g.C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      const V m = vload<V>(mean + c);
      V q = vload<V>(m2 + c), s = vload<V>(dev + c);
      for (int64_t ow = t0; ow < t1; ++ow) {
        ahead.step(ow * g.C + c);
        const V d = vload<V>(y + ow * g.C + c) - m;
        s += d;
        q += d * d;
      }
      vstore(m2 + c, q);
      vstore(dev + c, s);
    });
  });
  for (int64_t c = 0; c < g.C; ++c) m2[c] = std::max(A(0), m2[c] - dev[c] * dev[c] * inv);
}

// out = act(y * scale + shift) for one row: the BN affine per pixel, then the act per tile.
template <int K, typename A>
void forward_row(const Geo& g, const A* const* rows, const Params<A>& p, A* out) {
  for_pixel_tiles<A>(g.OW, g.C, K, [&](int64_t t0, int64_t t1) {
    for_channel_vectors<A>(g.C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      const V sc = vload<V>(p.scale + c), sh = vload<V>(p.shift + c);
      conv_block<K, V>(rows, p.wt, g, c, t0, t1, [&](int64_t ow, V y) {
        if (g.pf != 0) prefetch_input<K>(rows, g, ow, c), prefetch_write(out, (ow + g.pf) * g.C + c);
        vstore(out + ow * g.C + c, y * sc + sh);
      });
    });
    act_in_place(out + t0 * g.C, (t1 - t0) * g.C, g.act);
  });
}

// sg[c] = sum_ow g, sgy[c] = sum_ow g (y - mean), g = dy * act'(y * scale + shift); g
// itself is stored to g_out[ow][c] when g_out is given, and y to y_out[ow][c] when y_out is.
template <int K, typename A>
void reduce_row(const Geo& g, const A* const* rows, const A* dy, const Params<A>& p, A* sg,
                A* sgy, A* g_out, A* y_out) {
  std::fill(sg, sg + g.C, A(0));
  std::fill(sgy, sgy + g.C, A(0));
  for_pixel_tiles<A>(g.OW, g.C, K, [&](int64_t t0, int64_t t1) {
    for_channel_vectors<A>(g.C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      const V sc = vload<V>(p.scale + c), sh = vload<V>(p.shift + c), mu = vload<V>(p.mean + c);
      V s1 = vload<V>(sg + c), s2 = vload<V>(sgy + c);
      conv_block<K, V>(rows, p.wt, g, c, t0, t1, [&](int64_t ow, V y) {
        if (g.pf != 0) {
          const int64_t ahead = (ow + g.pf) * g.C + c;
          prefetch_input<K>(rows, g, ow, c);
          prefetch_read(dy, ahead);
          if (g_out != nullptr) prefetch_write(g_out, ahead);
          if (y_out != nullptr) prefetch_write(y_out, ahead);
        }
        const V gv = vload<V>(dy + ow * g.C + c) * act_backward(y * sc + sh, g.act);
        s1 += gv;
        s2 += gv * (y - mu);
        if (g_out != nullptr) vstore(g_out + ow * g.C + c, gv);
        if (y_out != nullptr) vstore(y_out + ow * g.C + c, y);
      });
      vstore(sg + c, s1);
      vstore(sgy + c, s2);
    });
  });
}

// dyc = scale * g + coef_b + coef_c * (y - mean) with g = dy * act'(y * scale + shift): the
// gradient w.r.t. y at one pixel (one channel vector).
template <class V>
inline V dyc_value(V dy, V y, V sc, V sh, V mu, V cb, V cc, int64_t act) {
  const V gv = dy * act_backward(y * sc + sh, act);
  return sc * gv + cb + cc * (y - mu);
}

// dyc_value for one row, y recomputed by the conv.
template <int K, typename A>
void dyc_row(const Geo& g, const A* const* rows, const A* dy, const Params<A>& p, A* dyc) {
  for_pixel_tiles<A>(g.OW, g.C, K, [&](int64_t t0, int64_t t1) {
    for_channel_vectors<A>(g.C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      const V sc = vload<V>(p.scale + c), sh = vload<V>(p.shift + c), mu = vload<V>(p.mean + c);
      const V cb = vload<V>(p.coef_b + c), cc = vload<V>(p.coef_c + c);
      conv_block<K, V>(rows, p.wt, g, c, t0, t1, [&](int64_t ow, V y) {
        if (g.pf != 0) prefetch_input<K>(rows, g, ow, c), prefetch_read(dy, (ow + g.pf) * g.C + c);
        vstore(dyc + ow * g.C + c, dyc_value(vload<V>(dy + ow * g.C + c), y, sc, sh, mu, cb, cc,
                                             g.act));
      });
    });
  });
}

// dyc_row from a kept y row (reduce_rows' y_out) instead of the conv: elementwise.
template <typename A>
void dyc_row_kept(const Geo& g, const A* y, const A* dy, const Params<A>& p, A* dyc) {
  for_pixel_tiles<A>(g.OW, g.C, 0, [&](int64_t t0, int64_t t1) {
    for_channel_vectors<A>(g.C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      const V sc = vload<V>(p.scale + c), sh = vload<V>(p.shift + c), mu = vload<V>(p.mean + c);
      const V cb = vload<V>(p.coef_b + c), cc = vload<V>(p.coef_c + c);
      for (int64_t ow = t0; ow < t1; ++ow) {
        if (g.pf != 0) prefetch_read(dy, (ow + g.pf) * g.C + c), prefetch_read(y, (ow + g.pf) * g.C + c);
        vstore(dyc + ow * g.C + c, dyc_value(vload<V>(dy + ow * g.C + c), vload<V>(y + ow * g.C + c),
                                             sc, sh, mu, cb, cc, g.act));
      }
    });
  });
}

// The dweight sums go over groups of kDweightRows<K> kernel rows (the last group may be
// shorter), each tap of a group with `dweight_sets` independent partial sums: at least
// 8 FMA chains (two FMA ports times four cycles of latency) in registers, and each block's
// dyc vectors loaded once per group.
template <int K>
inline constexpr int kDweightRows = K == 1 ? 1 : (K == 3 ? 3 : 2);
inline constexpr int dweight_sets(int taps) { return taps >= 8 ? 1 : (8 + taps - 1) / taps; }

// The dweight sums of kernel rows KH0 .. KH0 + R - 1 over one block of kBlock output
// pixels at stride S: part[r][o % NS][kw] += x[r][o * S + kw] * d[o], x[r] the block's
// input columns of row KH0 + r (columns(kh), see with_block_columns).
template <int K, int S, int KH0, int R, int NS, class V, class Columns>
inline void dweight_pixels(Columns&& columns, const V* d, V (*part)[NS][K]) {
#pragma GCC unroll 7
  for (int r = 0; r < R; ++r) {
    for_row_taps<K, S>(columns(KH0 + r), [&](int o, int kw, V x) { part[r][o % NS][kw] += x * d[o]; });
  }
}

// acc[kh][kw] += sum over the pixels [t0, t1) of one channel vector c of the group of kernel
// rows from KH0 (then the next group): partial sums in registers over the whole range,
// pixels in blocks of kBlock. The dyc ring's zero columns past OW stand in for a last
// block's missing pixels; a block whose window leaves the readable columns reads the
// zero row there.
template <int K, int S, int KH0, class V>
inline void dweight_rows(const Geo& g, const ElemOf<V>* const* rows, const ElemOf<V>* dyc,
                         const ColumnRange& readable, int64_t c, int64_t t0, int64_t t1,
                         ElemOf<V>* acc_row) {
  constexpr int B = kBlock;
  constexpr int R = std::min(kDweightRows<K>, K - KH0), NS = dweight_sets(R * K);
  const int64_t C = g.C;
  V part[R][NS][K] = {};
  for (int64_t ow = t0; ow < t1; ow += B) {
    V d[B];
#pragma GCC unroll 8
    for (int o = 0; o < B; ++o) d[o] = vload<V>(dyc + (ow + o) * C + c);
    with_block_columns<K, S, V>(rows, g, readable, ow * S - g.pl, c, [&](auto&& columns) {
      dweight_pixels<K, S, KH0, R, NS>(columns, d, part);
    });
  }
#pragma GCC unroll 7
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 7
    for (int kw = 0; kw < K; ++kw) {
      V sum = part[r][0][kw];
#pragma GCC unroll 8
      for (int s = 1; s < NS; ++s) sum += part[r][s][kw];
      ElemOf<V>* a = acc_row + ((KH0 + r) * K + kw) * C + c;
      vstore(a, vload<V>(a) + sum);
    }
  }
  if constexpr (KH0 + R < K) dweight_rows<K, S, KH0 + R, V>(g, rows, dyc, readable, c, t0, t1, acc_row);
}

// acc[kh][kw][c] += sum_ow x[kh][ow * S - pl + kw][c] * dyc[ow][c] for one output row, in
// A (the caller flushes acc into its double partials every few rows).
template <int K, int S, typename A>
void dweight_row_stride(const Geo& g, const A* const* rows, const A* dyc, A* acc_row) {
  const ColumnRange readable = readable_columns(g);
  for_pixel_tiles<A>(g.OW, g.C, K, [&](int64_t t0, int64_t t1) {
    for_channel_vectors<A>(g.C, [&](int64_t c, auto proto) {
      dweight_rows<K, S, 0, decltype(proto)>(g, rows, dyc, readable, c, t0, t1, acc_row);
    });
  });
}

template <int K, typename A>
void dweight_row(const Geo& g, const A* const* rows, const A* dyc, A* acc_row) {
  if (g.S == 1) {
    dweight_row_stride<K, 1>(g, rows, dyc, acc_row);
  } else {
    dweight_row_stride<K, 2>(g, rows, dyc, acc_row);
  }
}

// Unit kernel (K = 1, stride 1, no padding: the pointwise BN + act of nn/pointwise.py)
// in one sweep of a row, no dyc ring: y = x * w, dyc as in dyc_row, dx = w * dyc, and
// acc_dw[c] += x * dyc.
template <typename A>
void unit_backward_row(const Geo& g, const A* x, const A* dy, const Params<A>& p, A* dx,
                       A* acc_dw) {
  for_pixel_tiles<A>(g.OW, g.C, 1, [&](int64_t t0, int64_t t1) {
    for_channel_vectors<A>(g.C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      const V w = vload<V>(p.wt + c), sc = vload<V>(p.scale + c), sh = vload<V>(p.shift + c);
      const V mu = vload<V>(p.mean + c), cb = vload<V>(p.coef_b + c), cc = vload<V>(p.coef_c + c);
      V acc = vload<V>(acc_dw + c);
      for (int64_t ow = t0; ow < t1; ++ow) {
        if (g.pf != 0) {
          const int64_t ahead = (ow + g.pf) * g.C + c;
          prefetch_read(x, ahead), prefetch_read(dy, ahead), prefetch_write(dx, ahead);
        }
        const V xv = vload<V>(x + ow * g.C + c);
        const V d = dyc_value(vload<V>(dy + ow * g.C + c), xv * w, sc, sh, mu, cb, cc, g.act);
        vstore(dx + ow * g.C + c, d * w);
        acc += xv * d;
      }
      vstore(acc_dw + c, acc);
    });
  });
}

// kBlock consecutive input pixels of the stride-1 dx gather, base = iw + pl for the
// first: acc[o] = sum over (kh, kw), in that order, of dyc[kh][base + o - kw] * w[kh][kw].
// That is conv_pixels over each kernel row's dyc columns read right to left: its j-th
// column, base + kBlock - 1 - j, feeds tap kw = j - o' of its output o' = kBlock - 1 - o.
template <int K, class V>
inline void dx_pixels(const ElemOf<V>* const* drows, const ElemOf<V>* wc, int64_t base,
                      int64_t C, int64_t c, V* acc) {
  V flipped[kBlock];
  conv_pixels<K, 1, V>(
      wc, C, [&](int kh) { return ColumnRun<V>{drows[kh] + (base + kBlock - 1) * C + c, -C}; },
      flipped);
#pragma GCC unroll 8
  for (int o = 0; o < kBlock; ++o) acc[o] = flipped[kBlock - 1 - o];
}

// dx[iw][c] = sum of dyc[oh][ow][c] * wt[kh][kw][c] over oh = ih + pt - kh,
// ow = iw + pl - kw (stride 1; the transposed conv as a gather). drows[kh] are dyc rows
// with K - 1 zero columns on the left and K - 1 + kBlock on the right, and a zero row
// stands in for rows outside the output, so every tap of every block is in bounds: no
// border cases (a block's outputs past the tile are dropped).
template <int K, typename A>
void dx_row(const Geo& g, const A* const* drows, const A* wt, A* dx, const Lookahead<A>& ahead) {
  const int64_t C = g.C;
  for_pixel_tiles<A>(g.W, C, K, [&](int64_t t0, int64_t t1) {
    for_channel_vectors<A>(C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      for (int64_t iw = t0; iw < t1; iw += kBlock) {
        V acc[kBlock];
        dx_pixels<K, V>(drows, wt + c, iw + g.pl, C, c, acc);
        materialize(acc);
        if (g.pf != 0) {
          for (int o = 0; o < kBlock; ++o) prefetch_write(dx, (iw + o + g.pf) * C + c);
        }
        const int64_t n = std::min<int64_t>(kBlock, t1 - iw);
        for (int o = 0; o < n; ++o) vstore(dx + (iw + o) * C + c, acc[o]);
        for (int o = 0; o < n; ++o) ahead.step((iw + o) * C + c);
      }
    });
  });
}

// kBlock consecutive input pixels of the stride-2 dx gather, the first at column
// base = iw + pl = 2 * m0 + R: pixel o receives dyc[kh][ow] * w[kh][kw] for the kernel
// rows kh = PR, PR + 2, ... of the input row's parity and the taps kw of its column's
// parity, ow = (base + o - kw) / 2. Each kernel row's dyc columns are loaded once, right
// to left, and feed every pixel they reach (kw ascending for a fixed pixel).
template <int K, int R, int PR, class V>
inline void dx_pixels_stride2(const ElemOf<V>* const* drows, const ElemOf<V>* wc, int64_t m0,
                              int64_t C, int64_t c, V* acc) {
  constexpr int B = kBlock;
  constexpr int QHI = (R + B - 1) / 2;                 // column offset of (o = B - 1, kw = 0)
  constexpr int QLO = -((K - 1 - R) / 2);              // column offset of (o = 0, kw = K - 1)
#pragma GCC unroll 8
  for (int o = 0; o < B; ++o) acc[o] = V{};
#pragma GCC unroll 4
  for (int kh = PR; kh < K; kh += 2) {
    V w[K];
#pragma GCC unroll 7
    for (int kw = 0; kw < K; ++kw) w[kw] = vload<V>(wc + (kh * K + kw) * C);
    const ElemOf<V>* r = drows[kh] + (m0 + QHI) * C + c;
#pragma GCC unroll 16
    for (int q = QHI; q >= QLO; --q, r -= C) {
      const V v = vload<V>(r);
#pragma GCC unroll 8
      for (int o = 0; o < B; ++o) {
        const int kw = R + o - 2 * q;
        if (kw >= 0 && kw < K) acc[o] += v * w[kw];
      }
    }
  }
}

// dx_row for stride 2: dx[iw][c] = sum of dyc[oh][ow][c] * wt[kh][kw][c] over
// 2 * oh = ih + pt - kh, 2 * ow = iw + pl - kw. drows[kh] are the dyc rows of the kernel
// rows kh = pr, pr + 2, ... (the input row's parity; the zero row where oh is outside the
// output), with the dyc ring's zero columns around them, so blocks need no border tests.
template <int K, typename A>
void dx_row_stride2(const Geo& g, const A* const* drows, int pr, const A* wt, A* dx,
                    const Lookahead<A>& ahead) {
  const int64_t C = g.C;
  auto row = [&]<int PR>() {
    for_pixel_tiles<A>(g.W, C, K, [&](int64_t t0, int64_t t1) {
      for_channel_vectors<A>(C, [&](int64_t c, auto proto) {
        using V = decltype(proto);
        for (int64_t iw = t0; iw < t1; iw += kBlock) {
          V acc[kBlock];
          const int64_t base = iw + g.pl;
          if (base & 1) {
            dx_pixels_stride2<K, 1, PR, V>(drows, wt + c, base >> 1, C, c, acc);
          } else {
            dx_pixels_stride2<K, 0, PR, V>(drows, wt + c, base >> 1, C, c, acc);
          }
          if (g.pf != 0) {
            for (int o = 0; o < kBlock; ++o) prefetch_write(dx, (iw + o + g.pf) * C + c);
          }
          const int64_t n = std::min<int64_t>(kBlock, t1 - iw);
          for (int o = 0; o < n; ++o) vstore(dx + (iw + o) * C + c, acc[o]);
          for (int o = 0; o < n; ++o) ahead.step((iw + o) * C + c);
        }
      });
    });
  };
  if (pr == 1) {
    row.template operator()<1>();
  } else {
    row.template operator()<0>();
  }
}

// ---- passes over work units (templated on the storage type X) ------------------------

// What output row oh of image n reads that row oh - 1 did not: its new input rows of x
// (S of them), and its rows of dy and of a kept y where those are given, for a phase of
// `span` values; nothing without software prefetch (g.pf == 0), past the image, or for
// half storage (its rows are converted into scratch copies).
template <int K, typename X, typename A>
Lookahead<A> row_input(const RowSource<X, A>& src, const Geo& g, int64_t n, int64_t oh,
                       const X* dy, const X* y_kept, int64_t span) {
  Lookahead<A> ahead(span);
  if constexpr (std::is_same_v<X, A>) {
    if (g.pf == 0 || oh < 0 || oh >= g.OH) return ahead;
    const int64_t first = oh * g.S - g.pt + K - g.S;
    if (first >= 0 && first + g.S <= g.H) ahead.add(src.stored_row(n, first), g.S * g.W * g.C);
    const int64_t OWC = g.OW * g.C, at = (n * g.OH + oh) * OWC;
    if (dy != nullptr) ahead.add(dy + at, OWC);
    if (y_kept != nullptr) ahead.add(y_kept + at, OWC);
  }
  return ahead;
}

// Pass 1: per-channel (count, mean, M2) of y over output rows [r0, r1). With y_out (float
// storage only, where y in storage is y in A), y itself is kept there, row r at
// y_out + r * OW * C, for affine_act_rows to finish in place instead of a second conv.
template <typename X>
void stats_rows(const Geo& g, const X* x, const Params<AccOf<X>>& p, const GroupRange& groups,
                double* part, X* y_out) {
  using A = AccOf<X>;
  with_kernel_size(g.K, [&]<int K>() {
    RowSource<X, A> src(x, g);
    std::vector<A> y(g.OW * g.C), mean(g.C), m2(g.C), dev(g.C);
    const A* rows[K + 1];
    for (int64_t i = groups.first; i < groups.last; ++i) {
      double* acc = part + i * (1 + 2 * g.C);
      for (int64_t r = groups.begin(i); r < groups.end(i); ++r) {
        gather_rows<K>(src, g, r / g.OH, r % g.OH, rows);
        A* yrow = y.data();
        if constexpr (std::is_same_v<X, A>) {
          if (y_out != nullptr) yrow = y_out + r * g.OW * g.C;
        }
        moments_row<K>(g, rows, p.wt, yrow, mean.data(), m2.data(), dev.data(),
                       row_input<K>(src, g, r / g.OH, r % g.OH + 1, static_cast<const X*>(nullptr),
                                    static_cast<const X*>(nullptr), g.OW * g.C));
        chan_merge(acc, g.C, double(g.OW), mean.data(), m2.data(), dev.data());
      }
    }
  });
}

// Per-channel sums over the pixels of one stored row (the squeeze-excite pool).
template <typename A>
inline void row_pixel_sums(const Geo& g, const A* row, A* sums) {
  for (int64_t c = 0; c < g.C; ++c) sums[c] = A(0);
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    const A* px = row + ow * g.C;
    for (int64_t c = 0; c < g.C; ++c) sums[c] += px[c];
  }
}

// Pass 2 for an unpadded 1x1 kernel at stride 1 (the BN + act passes of the 1x1 convs):
// y = x * w read straight from the input row (no row gathering, no conv blocks), then as
// forward_row; the same arithmetic (y starts at zero and accumulates x * w), so the same
// results. 10-20 % faster than the conv route on B0's 7x7-56x56 projection outputs.
template <typename X>
void unit_forward_rows(const Geo& g, const X* x, const Params<AccOf<X>>& p, X* out, int64_t r0,
                       int64_t r1, AccOf<X>* row_sums) {
  using A = AccOf<X>;
  const int64_t OWC = g.OW * g.C;
  RowView<X, A> src(OWC), dst(OWC);
  for (int64_t r = r0; r < r1; ++r) {
    const A* xrow = src.read(x + r * OWC, OWC);
    X* orow = out + r * OWC;
    A* o = dst.target(orow);
    for_pixel_tiles<A>(g.OW, g.C, 0, [&](int64_t t0, int64_t t1) {
      for_channel_vectors<A>(g.C, [&](int64_t c, auto proto) {
        using V = decltype(proto);
        const V w = vload<V>(p.wt + c), sc = vload<V>(p.scale + c), sh = vload<V>(p.shift + c);
        for (int64_t ow = t0; ow < t1; ++ow) {
          V y{};
          y += vload<V>(xrow + ow * g.C + c) * w;
          vstore(o + ow * g.C + c, y * sc + sh);
        }
      });
      act_in_place(o + t0 * g.C, (t1 - t0) * g.C, g.act);
    });
    dst.commit(orow, OWC);
    if (row_sums != nullptr) row_pixel_sums(g, dst.read(orow, OWC), row_sums + r * g.C);
  }
}

// Pass 2: out = act(y * scale + shift) over output rows [r0, r1). With row_sums, also
// row_sums[r][c] = sum over the row's pixels of the stored out (the squeeze-excite pool,
// read back while the row is still in cache instead of in a separate pass over out).
template <typename X>
void forward_rows(const Geo& g, const X* x, const Params<AccOf<X>>& p, X* out, int64_t r0,
                  int64_t r1, AccOf<X>* row_sums) {
  using A = AccOf<X>;
  if (g.K == 1 && g.S == 1 && g.pt == 0 && g.pl == 0 && g.OH == g.H && g.OW == g.W) {
    unit_forward_rows(g, x, p, out, r0, r1, row_sums);
    return;
  }
  with_kernel_size(g.K, [&]<int K>() {
    RowSource<X, A> src(x, g);
    RowView<X, A> view(g.OW * g.C);
    const A* rows[K + 1];
    for (int64_t r = r0; r < r1; ++r) {
      gather_rows<K>(src, g, r / g.OH, r % g.OH, rows);
      X* orow = out + r * g.OW * g.C;
      forward_row<K>(g, rows, p, view.target(orow));
      view.commit(orow, g.OW * g.C);
      if (row_sums != nullptr) row_pixel_sums(g, view.read(orow, g.OW * g.C), row_sums + r * g.C);
    }
  });
}

// Pixels per GEMM of ExpandedRows: a GEMM over one narrow row (7-28 pixels on B0) spent
// about as long packing the weight as multiplying when MKL's sgemm ran it (it packs its
// operand per call), so rows are computed in blocks of at least this many pixels.
constexpr int64_t kExpandGemmPixels = 64;

// The input rows of a depthwise conv computed from the expand conv that feeds it (the eval
// plan's expand + depthwise, ExpandSource): input row q = n * H + ih (rows of consecutive
// images are consecutive in x) is act(x[q] w^T + bias). A missing row q is computed with
// the rows after it, [q, q + B) up to q_end (the last row the caller will read), in one
// (B * W, cin) x (cin, C) GEMM into a scratch block, then pw_conv_act's bias + act
// epilogue there and a copy of
// each row into slot q % R of a ring of R = B + K rows laid out as RowSource's copies
// (zero margins where the conv reads padding): the expanded activation never goes through
// memory, and the ring holds the K rows of an output row while the block after them is
// written.
class ExpandedRows {
 public:
  ExpandedRows(const ExpandSource& e, const Geo& g, int64_t q_end)
      : e_(e), H_(g.H), W_(g.W), C_(g.C), q_end_(q_end),
        B_(std::max<int64_t>(1, (kExpandGemmPixels + g.W - 1) / std::max<int64_t>(g.W, 1))),
        R_(B_ + g.K), lead_(-readable_columns(g).lo * g.C),
        span_((readable_columns(g).hi - readable_columns(g).lo) * g.C), zero_(span_, 0.0f),
        block_(B_ > 1 ? B_ * g.W * g.C : 0), ring_(R_, span_, lead_, W_ * C_), tag_(R_, -1) {}

  const float* zeros() const { return zero_.data() + lead_; }

  const float* row(int64_t n, int64_t ih) {
    if (ih < 0 || ih >= H_) return zeros();
    const int64_t q = n * H_ + ih;
    if (tag_[q % R_] != q) compute(q);
    return ring_.row(q % R_);
  }

 private:
  void compute(int64_t q0) {
    const int64_t rows = std::max<int64_t>(1, std::min(B_, q_end_ - q0));
    const int64_t WC = W_ * C_;
    // One row (wide rows: B = 1) goes straight into its slot.
    float* blk = rows == 1 ? ring_.row(q0 % R_) : block_.data();
    (*e_.product)(e_.x + q0 * W_ * e_.cin, blk, rows * W_);
    e_.bias_act(blk, rows * W_, C_, e_.bias, e_.act);
    for (int64_t i = 0; i < rows; ++i) {
      if (rows > 1) std::memcpy(ring_.row((q0 + i) % R_), blk + i * WC, WC * sizeof(float));
      tag_[(q0 + i) % R_] = q0 + i;
    }
  }

  ExpandSource e_;
  int64_t H_, W_, C_, q_end_, B_, R_, lead_, span_;
  std::vector<float> zero_, block_;
  MarginRows<float> ring_;
  std::vector<int64_t> tag_;
};

// forward_rows for float32 with the input rows from an ExpandSource (g's H, W and C are
// the expanded activation's).
void expand_forward_rows(const Geo& g, const ExpandSource& e, const Params<float>& p,
                         float* out, int64_t r0, int64_t r1, float* row_sums) {
  if (r1 <= r0) return;
  const int64_t last_n = (r1 - 1) / g.OH, last_oh = (r1 - 1) % g.OH;
  const int64_t last_ih = std::min(g.H - 1, last_oh * g.S - g.pt + g.K - 1);
  with_kernel_size(g.K, [&]<int K>() {
    ExpandedRows src(e, g, last_n * g.H + last_ih + 1);
    const float* rows[K + 1];
    for (int64_t r = r0; r < r1; ++r) {
      gather_rows<K>(src, g, r / g.OH, r % g.OH, rows);
      float* orow = out + r * g.OW * g.C;
      forward_row<K>(g, rows, p, orow);
      if (row_sums != nullptr) row_pixel_sums(g, orow, row_sums + r * g.C);
    }
  });
}

// Pass 2 on a y kept by stats_rows: y = act(y * scale + shift) in place over output rows
// [r0, r1), the BN affine per pixel and the act per tile as in forward_row, so the result
// is bitwise that of forward_rows; row_sums as there.
template <typename X>
void affine_act_rows(const Geo& g, X* y, const Params<AccOf<X>>& p, int64_t r0, int64_t r1,
                     AccOf<X>* row_sums) {
  using A = AccOf<X>;
  const int64_t OWC = g.OW * g.C;
  RowView<X, A> view(OWC);
  for (int64_t r = r0; r < r1; ++r) {
    X* yrow = y + r * OWC;
    view.read(yrow, OWC);
    A* v = view.target(yrow);
    for_pixel_tiles<A>(g.OW, g.C, 0, [&](int64_t t0, int64_t t1) {
      for_channel_vectors<A>(g.C, [&](int64_t c, auto proto) {
        using V = decltype(proto);
        const V sc = vload<V>(p.scale + c), sh = vload<V>(p.shift + c);
        for (int64_t ow = t0; ow < t1; ++ow) {
          if (g.pf != 0) prefetch_write(v, (ow + g.pf) * g.C + c);
          vstore(v + ow * g.C + c, vload<V>(v + ow * g.C + c) * sc + sh);
        }
      });
      act_in_place(v + t0 * g.C, (t1 - t0) * g.C, g.act);
    });
    view.commit(yrow, OWC);
    if (row_sums != nullptr) row_pixel_sums(g, view.read(yrow, OWC), row_sums + r * g.C);
  }
}

// Pass 3: acc[c] += sum g, acc[C + c] += sum g (y - mean) over output rows [r0, r1). With
// g_out (float storage only), g is also kept there (row r at g_out + r * OW * C): pass 4
// then takes g as its dy with the identity act (g * 1 is exact) instead of recomputing act'.
template <typename X>
void reduce_rows(const Geo& g, const X* x, const X* dy, const Params<AccOf<X>>& p,
                 const GroupRange& groups, double* part, X* g_out, X* y_out) {
  using A = AccOf<X>;
  with_kernel_size(g.K, [&]<int K>() {
    RowSource<X, A> src(x, g);
    RowView<X, A> view(g.OW * g.C);
    std::vector<A> sums(2 * g.C);
    const A* rows[K + 1];
    for (int64_t i = groups.first; i < groups.last; ++i) {
      double* acc = part + i * 2 * g.C;
      for (int64_t r = groups.begin(i); r < groups.end(i); ++r) {
        gather_rows<K>(src, g, r / g.OH, r % g.OH, rows);
        const A* dyrow = view.read(dy + r * g.OW * g.C, g.OW * g.C);
        A* grow = nullptr;
        A* yrow = nullptr;
        if constexpr (std::is_same_v<X, A>) {
          if (g_out != nullptr) grow = g_out + r * g.OW * g.C;
          if (y_out != nullptr) yrow = y_out + r * g.OW * g.C;
        }
        reduce_row<K>(g, rows, dyrow, p, sums.data(), sums.data() + g.C, grow, yrow);
        for (int64_t c = 0; c < 2 * g.C; ++c) acc[c] += double(sums[c]);
      }
    }
  });
}

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Scratch of one thread for pass 4. Ring rows hold OW dyc pixels between K - 1 zero
// pixels on the left and K - 1 + kBlock on the right (the zero columns are never
// written), zero_row stands in for dyc rows outside the output, dweight sums taps in A
// between flushes into the caller's double partials, every kFlushRows summed rows (which
// bounds the float sums).
template <typename X, typename A>
struct BackwardScratch {
  static constexpr int kFlushRows = 8;

  BackwardScratch(const X* x, const Geo& g)
      : src(x, g), dy(g.OW * g.C), dx(g.W * g.C), k(g.K), pad((g.K - 1) * g.C),
        stride((g.OW + 2 * (g.K - 1) + kBlock) * g.C), ring(g.K, stride, pad, g.OW * g.C),
        zero_row(stride),
        dweight(g.K * g.K * g.C) {}
  A* ring_row(int64_t oh) { return ring.row(oh % k); }
  const A* zero() const { return zero_row.data() + pad; }

  // Call after summing one more row into dweight.
  void row_summed(double* dw) {
    if (++unflushed == kFlushRows) flush(dw);
  }

  // Adds the A sums in dweight into the double partials dw and clears them.
  void flush(double* dw) {
    if (unflushed == 0) return;
    for (size_t i = 0; i < dweight.size(); ++i) dw[i] += double(dweight[i]), dweight[i] = A(0);
    unflushed = 0;
  }

  RowSource<X, A> src;
  RowView<X, A> dy, dx;
  int64_t k, pad, stride;
  MarginRows<A> ring;
  std::vector<A> zero_row, dweight;
  int unflushed = 0;
};

// Pass 4 over input rows [i0, i1) of image n (a unit kernel takes unit_backward_row):
// dx rows, plus dweight from the dyc rows this block owns (row oh belongs to the block
// holding input row max(oh * S - pt, 0)).
// dyc rows live in a ring of K rows; oh uses slot oh % K.
template <int K, typename X, typename A>
void backward_block(const Geo& g, BackwardScratch<X, A>& s, const X* dy, const X* y_kept,
                    const Params<A>& p, X* dx, int64_t n, int64_t i0, int64_t i1, double* dw) {
  const int64_t OWC = g.OW * g.C, WC = g.W * g.C;
  if constexpr (K == 1) {
    if (g.S == 1 && g.pt == 0 && g.pl == 0) {
      for (int64_t ih = i0; ih < i1; ++ih) {
        const int64_t r = n * g.H + ih;
        X* dxrow = dx + r * WC;
        unit_backward_row(g, s.src.row(n, ih), s.dy.read(dy + r * OWC, OWC), p,
                          s.dx.target(dxrow), s.dweight.data());
        s.dx.commit(dxrow, WC);
        s.row_summed(dw);
      }
      s.flush(dw);
      return;
    }
  }
  int64_t next = std::max<int64_t>(0, -floor_div(-(i0 + g.pt - (K - 1)), g.S));
  const A* rows[K + 1];
  const A* drows[K];
  for (int64_t ih = i0; ih < i1; ++ih) {
    const int64_t need = std::min(g.OH, floor_div(ih + g.pt, g.S) + 1);
    for (; next < need; ++next) {
      A* drow = s.ring_row(next);
      gather_rows<K>(s.src, g, n, next, rows);
      const A* dyrow = s.dy.read(dy + (n * g.OH + next) * OWC, OWC);
      const A* yrow = nullptr;
      if constexpr (std::is_same_v<X, A>) {
        if (y_kept != nullptr) yrow = y_kept + (n * g.OH + next) * OWC;
      }
      if (yrow != nullptr) {
        dyc_row_kept(g, yrow, dyrow, p, drow);
      } else {
        dyc_row<K>(g, rows, dyrow, p, drow);
      }
      const int64_t owner = std::max<int64_t>(next * g.S - g.pt, 0);
      if (owner >= i0 && owner < i1) {
        dweight_row<K>(g, rows, drow, s.dweight.data());
        s.row_summed(dw);
      }
    }
    for (int kh = 0; kh < K; ++kh) {  // rows of the wrong parity (stride 2) are not read
      const int64_t num = ih + g.pt - kh;
      const bool ok = num >= 0 && num % g.S == 0 && num / g.S < g.OH;
      drows[kh] = ok ? s.ring_row(num / g.S) : s.zero();
    }
    X* dxrow = dx + (n * g.H + ih) * WC;
    const Lookahead<A> ahead = row_input<K>(s.src, g, n, next, dy, y_kept, WC);
    if (g.S == 1) {
      dx_row<K>(g, drows, p.wt, s.dx.target(dxrow), ahead);
    } else {
      dx_row_stride2<K>(g, drows, int((ih + g.pt) & 1), p.wt, s.dx.target(dxrow), ahead);
    }
    s.dx.commit(dxrow, WC);
  }
  s.flush(dw);
}

// Pass 4 over the units of `groups`; unit u is block u % blocks of image u / blocks.
// With y_kept (float storage: reduce_rows' y_out), dyc comes from it instead of the conv.
template <typename X>
void backward_units(const Geo& g, const X* x, const X* dy, const X* y_kept,
                    const Params<AccOf<X>>& p, X* dx, int64_t blocks, const GroupRange& groups,
                    double* part) {
  using A = AccOf<X>;
  with_kernel_size(g.K, [&]<int K>() {
    BackwardScratch<X, A> scratch(x, g);
    for (int64_t i = groups.first; i < groups.last; ++i) {
      double* dw = part + i * g.K * g.K * g.C;
      for (int64_t u = groups.begin(i); u < groups.end(i); ++u) {
        const int64_t n = u / blocks, b = u % blocks;
        backward_block<K>(g, scratch, dy, y_kept, p, dx, n, b * g.H / blocks,
                          (b + 1) * g.H / blocks, dw);
      }
    }
  });
}
