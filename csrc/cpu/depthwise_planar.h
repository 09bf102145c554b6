// NCHW (planar) rows for the depthwise row kernels: the eval forward on an NCHW tensor
// without converting it to channels_last and back.
//
// No include guard on purpose: isa_kernels.inc includes this once per ISA, after
// depthwise_row_access.h (RowSource's cache layout, gather_rows) and
// depthwise_row_kernels.h (forward_row).
//
// Layout: x is (N, C, H, W) row-major, so input row ih of image n is C runs of W values,
// run c at x + ((n * C + c) * H + ih) * W, and the rows of one image follow each other
// within every run. The row kernels read channels_last rows (pixel-major, C values per
// pixel), so PlanarRows transposes input rows (a block of them at a time for narrow
// rows) into a ring of rows laid out as RowSource's copies (zero margins, the same
// readable columns), and forward_rows_planar computes output rows into a [rows][OW][C]
// scratch block and transposes it into out's C runs. Both transposes work on data in
// cache; the conversions they replace (x to channels_last, out back) were each a full
// pass over memory: on B0's 8x96x112x112 layer the NCHW eval call took 10.9 ms against
// 3.2 ms for channels_last, and takes 1.9 against 1.9 ms this way (interleaved, one
// process). The conv arithmetic is the channels_last kernels', so results are bitwise
// theirs.

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < 8, j < 8 (an 8 x 8 tile of floats, in
// registers: three rounds of two-input shuffles, as unpack / shuffle / permute).
inline void transpose_tile8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  using V = Vec<float, 8>;
  using M = Vec<int32_t, 8>;
  V r[8], t[8], s[8];
  for (int i = 0; i < 8; ++i) r[i] = vload<V>(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], M{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], M{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4) {
    for (int j = 0; j < 2; ++j) {
      s[i + 2 * j] = __builtin_shuffle(t[i + j], t[i + j + 2], M{0, 1, 8, 9, 4, 5, 12, 13});
      s[i + 2 * j + 1] = __builtin_shuffle(t[i + j], t[i + j + 2], M{2, 3, 10, 11, 6, 7, 14, 15});
    }
  }
  for (int i = 0; i < 4; ++i) {
    vstore(dst + i * ld_dst, __builtin_shuffle(s[i], s[i + 4], M{0, 1, 2, 3, 8, 9, 10, 11}));
    vstore(dst + (i + 4) * ld_dst, __builtin_shuffle(s[i], s[i + 4], M{4, 5, 6, 7, 12, 13, 14, 15}));
  }
}

// dst[j * ld_dst + i] = To(src[i * ld_src + j]) for i < rows, j < cols: a rows x cols
// matrix transposed in 8 x 8 tiles. Full float tiles go straight through registers; edge
// tiles (B0's 7- and 14-pixel rows, channel counts off a multiple of 8) and half types
// go through a float copy of the tile, zero-filled past the edges, so every tile is
// vectorized. Double (gradcheck only) is transposed element by element.
template <typename From, typename To>
void transpose_block(const From* src, int64_t ld_src, To* dst, int64_t ld_dst, int64_t rows,
                     int64_t cols) {
  if constexpr (std::is_same_v<From, double> || std::is_same_v<To, double>) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = static_cast<To>(src[i * ld_src + j]);
    }
  } else {
    constexpr bool kFloat = std::is_same_v<From, float> && std::is_same_v<To, float>;
    float in[64], out[64];
    for (int64_t i0 = 0; i0 < rows; i0 += 8) {
      const int64_t ni = std::min<int64_t>(8, rows - i0);
      for (int64_t j0 = 0; j0 < cols; j0 += 8) {
        const int64_t nj = std::min<int64_t>(8, cols - j0);
        const From* s = src + i0 * ld_src + j0;
        To* d = dst + j0 * ld_dst + i0;
        if constexpr (kFloat) {
          if (ni == 8 && nj == 8) {
            transpose_tile8(s, ld_src, d, ld_dst);
            continue;
          }
        }
        for (int i = 0; i < 8; ++i) {
          if (i < ni && nj == 8) {
            vstore(in + 8 * i, load_as<Vec<float, 8>>(s + i * ld_src));
            continue;
          }
          for (int j = 0; j < 8; ++j) {
            in[8 * i + j] = i < ni && j < nj ? static_cast<float>(s[i * ld_src + j]) : 0.0f;
          }
        }
        transpose_tile8(in, 8, out, 8);
        for (int j = 0; j < nj; ++j) {
          if (ni == 8) {
            store_as(d + j * ld_dst, vload<Vec<float, 8>>(out + 8 * j));
          } else {
            for (int i = 0; i < ni; ++i) d[j * ld_dst + i] = static_cast<To>(out[8 * j + i]);
          }
        }
      }
    }
  }
}

void transpose_floats(const float* src, int64_t ld_src, float* dst, int64_t ld_dst,
                      int64_t rows, int64_t cols) {
  transpose_block(src, ld_src, dst, ld_dst, rows, cols);
}

// Pixels per transpose: rows narrower than this are transposed several at a time (the
// rows of one image are consecutive in each channel's plane), so B0's 7- and 14-pixel
// rows fill whole 8 x 8 tiles instead of mostly edge tiles.
constexpr int64_t kPlanarBlockPixels = 64;

inline int64_t planar_block_rows(int64_t width) {
  return std::max<int64_t>(1, (kPlanarBlockPixels + width - 1) / std::max<int64_t>(width, 1));
}

// Input rows of a planar x as channels_last rows of A, with RowSource's interface
// (row(n, ih), zeros()) and cache layout (zero margins, the same readable columns). A
// missing row ih of image n is transposed with the rows after it in that image, [ih, ih
// + B) up to q_end (one past the last row q = n * H + ih the caller will read), into a
// scratch block, and each row copied into slot q % R of a ring of R = B + K rows, which
// holds an output row's K rows while the next block is written; with B = 1 (wide rows)
// the row is transposed straight into its slot.
template <typename X, typename A>
class PlanarRows {
 public:
  PlanarRows(const X* x, const Geo& g, int64_t q_end)
      : x_(x), C_(g.C), H_(g.H), W_(g.W), q_end_(q_end), B_(planar_block_rows(g.W)),
        R_(B_ + g.K), lead_(-readable_columns(g).lo * g.C),
        zero_((readable_columns(g).hi - readable_columns(g).lo) * g.C, A(0)),
        block_(B_ > 1 ? B_ * g.W * g.C : 0), ring_(R_, zero_.size(), lead_, g.W * g.C),
        tag_(R_, -1) {}

  const A* zeros() const { return zero_.data() + lead_; }

  const A* row(int64_t n, int64_t ih) {
    if (ih < 0 || ih >= H_) return zeros();
    const int64_t q = n * H_ + ih;
    if (tag_[q % R_] != q) fill(n, ih);
    return ring_.row(q % R_);
  }

 private:
  void fill(int64_t n, int64_t ih) {
    const int64_t q0 = n * H_ + ih;
    const int64_t rows = std::max<int64_t>(1, std::min({B_, H_ - ih, q_end_ - q0}));
    const int64_t WC = W_ * C_;
    A* blk = rows == 1 ? ring_.row(q0 % R_) : block_.data();
    transpose_block(x_ + (n * C_ * H_ + ih) * W_, H_ * W_, blk, C_, C_, rows * W_);
    for (int64_t i = 0; i < rows; ++i) {
      if (rows > 1) std::memcpy(ring_.row((q0 + i) % R_), blk + i * WC, WC * sizeof(A));
      tag_[(q0 + i) % R_] = q0 + i;
    }
  }

  const X* x_;
  int64_t C_, H_, W_, q_end_, B_, R_, lead_;
  std::vector<A> zero_, block_;
  MarginRows<A> ring_;
  std::vector<int64_t> tag_;
};

// v[i] = A(X(v[i])) for i < n: values rounded to the storage type, as they will be stored.
template <typename X, typename A>
inline void round_to_storage(A* v, int64_t n) {
  if constexpr (!std::is_same_v<X, A>) {
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<A>(static_cast<X>(v[i]));
  }
}

// forward_rows for planar x and out (both (N, C, H, W) / (N, C, OH, OW) row-major):
// out = act(y * scale + shift) over output rows [r0, r1) (r = n * OH + oh), with
// row_sums[r][c] the sums of the stored out over the row's pixels when given. Output rows
// are computed into a scratch block of up to B rows of one image, then transposed into
// out's planes together.
template <typename X>
void forward_rows_planar(const Geo& geo, const X* x, const Params<AccOf<X>>& p, X* out,
                         int64_t r0, int64_t r1, AccOf<X>* row_sums) {
  using A = AccOf<X>;
  if (r1 <= r0) return;
  Geo g = geo;
  g.pf = 0;  // the kernels read the transposed cache rows, never x itself
  const int64_t last_n = (r1 - 1) / g.OH, last_oh = (r1 - 1) % g.OH;
  const int64_t last_ih = std::min(g.H - 1, last_oh * g.S - g.pt + g.K - 1);
  const int64_t B = planar_block_rows(g.OW), OWC = g.OW * g.C;
  with_kernel_size(g.K, [&]<int K>() {
    PlanarRows<X, A> src(x, g, last_n * g.H + last_ih + 1);
    std::vector<A> block(B * OWC);
    const A* rows[K + 1];
    for (int64_t r = r0; r < r1;) {
      const int64_t n = r / g.OH, oh0 = r % g.OH;
      const int64_t count = std::min({B, g.OH - oh0, r1 - r});
      for (int64_t i = 0; i < count; ++i) {
        gather_rows<K>(src, g, n, oh0 + i, rows);
        forward_row<K>(g, rows, p, block.data() + i * OWC);
      }
      transpose_block(block.data(), g.C, out + (n * g.C * g.OH + oh0) * g.OW, g.OH * g.OW,
                      count * g.OW, g.C);
      if (row_sums != nullptr) {
        round_to_storage<X>(block.data(), count * OWC);
        for (int64_t i = 0; i < count; ++i) {
          row_pixel_sums(g, block.data() + i * OWC, row_sums + (r + i) * g.C);
        }
      }
      r += count;
    }
  });
}
