// Per-row cores of the fused depthwise conv + BN + activation's CPU kernels: one output
// row (forward, statistics, backward reduction) or one row of the backward's dweight sums
// and dx gathers, for a kernel size K and accumulation type A, on the row access of
// depthwise_row_access.h.
//
// No include guard on purpose: depthwise_kernels.h includes it once per ISA, inside that
// ISA's namespace (see depthwise_kernels.h's header for the layout and the work units).

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
