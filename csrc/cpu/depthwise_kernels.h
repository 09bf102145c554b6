// CPU kernels of the fused depthwise conv + BN + activation, channels_last layout: the
// passes over work units (output rows, image row blocks) that the driver runs, on the
// row access (depthwise_row_access.h) and per-row cores (depthwise_row_kernels.h).
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

#include "depthwise_row_access.h"
#include "depthwise_row_kernels.h"

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
