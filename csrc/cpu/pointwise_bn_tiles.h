// Tile kernels of the CPU training 1x1 conv + BatchNorm + activation
// (pointwise_bn_train.cpp): the per-channel work on a tile of GEMM output rows y while the
// tile is in cache. Layout: y, dout, dy are row-major (rows, C), one NHWC pixel per row,
// channels fastest; per-channel vectors are (C) float32. With z = y * scale + shift and
// g = dout * act'(z):
//
//   tile_moments    mean[c] = sum_r y[r, c] / rows (rounded), dev[c] = sum_r (y[r, c] - mean[c]),
//                   m2[c] = sum_r (y[r, c] - mean[c])^2 - dev[c]^2 / rows: the corrected
//                   two-pass moments of moments_row (depthwise_row_kernels.h)
//   tile_affine_act y[r, c] = act(z)                                        (in place)
//   tile_affine_act_stream  the same from src into dst, dst written with streaming stores
//   tile_bn_reduce  sum_g[c] += sum_r g,  sum_g_yc[c] += sum_r g * (y[r, c] - mean[c])
//   tile_bn_grad    dy[r, c] = scale[c] * g + coef_b[c] + coef_c[c] * (y[r, c] - mean[c])
//                   (dy may be y itself)
//   tile_bn_reduce_scale  tile_bn_reduce's sums, and y[r, c] = scale[c] * g in place: the
//                   part of dy that needs no batch sums (pw_bn_backward_gram)
//
// Rows are the outer loop (unit-stride streams); per-channel sums live in (C) arrays.
// No include guard on purpose: each isa_*.cpp includes this once, inside its ISA's
// namespace and `#pragma GCC target`, after vec_math.h (see its header).

void tile_moments(const float* y, int64_t rows, int64_t C, float* mean, float* m2, float* dev) {
  std::fill(mean, mean + C, 0.0f);
  std::fill(m2, m2 + C, 0.0f);
  std::fill(dev, dev + C, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for_channel_vectors<float>(C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      vstore(mean + c, vload<V>(mean + c) + vload<V>(y + r * C + c));
    });
  }
  const float inv = 1.0f / float(rows);
  for (int64_t c = 0; c < C; ++c) mean[c] *= inv;
  for (int64_t r = 0; r < rows; ++r) {
    for_channel_vectors<float>(C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      const V d = vload<V>(y + r * C + c) - vload<V>(mean + c);
      vstore(dev + c, vload<V>(dev + c) + d);
      vstore(m2 + c, vload<V>(m2 + c) + d * d);
    });
  }
  for (int64_t c = 0; c < C; ++c) m2[c] = std::max(0.0f, m2[c] - dev[c] * dev[c] * inv);
}

// dst[r, c] = act(src[r, c] * scale[c] + shift[c]); dst may be src. With STREAM, whole
// vectors go to dst with streaming stores where dst's rows are vector-aligned.
template <int ACT, bool STREAM>
inline void affine_act_tile(const float* src, float* dst, int64_t rows, int64_t C,
                            const float* scale, const float* shift) {
  constexpr int L = kLanes<float>;
  const bool aligned = STREAM && C % L == 0 &&
                       reinterpret_cast<uintptr_t>(dst) % (L * sizeof(float)) == 0;
  for (int64_t r = 0; r < rows; ++r) {
    for_channel_vectors<float>(C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      const V v = act_forward(vload<V>(src + r * C + c) * vload<V>(scale + c) +
                              vload<V>(shift + c), ACT);
      if constexpr (STREAM && kCount<V> == L) {
        if (aligned) return vstream(dst + r * C + c, v);
      }
      vstore(dst + r * C + c, v);
    });
  }
  if constexpr (STREAM) vstream_fence();
}

template <bool STREAM>
void affine_act_by_code(const float* src, float* dst, int64_t rows, int64_t C, const float* scale,
                        const float* shift, int64_t act) {
  with_act_code(act, [&]<int ACT>() {
    affine_act_tile<ACT, STREAM>(src, dst, rows, C, scale, shift);
  });
}

void tile_affine_act(float* y, int64_t rows, int64_t C, const float* scale, const float* shift,
                     int64_t act) {
  affine_act_by_code<false>(y, y, rows, C, scale, shift, act);
}

void tile_affine_act_stream(const float* src, float* dst, int64_t rows, int64_t C,
                            const float* scale, const float* shift, int64_t act) {
  affine_act_by_code<true>(src, dst, rows, C, scale, shift, act);
}

// The sums of tile_bn_reduce; with SCALE (Y = float), also y[r, c] = scale[c] * g in place.
template <int ACT, bool SCALE, class Y>
inline void bn_reduce_tile(const float* dout, Y* y, int64_t rows, int64_t C,
                           const float* scale, const float* shift, const float* mean,
                           float* sum_g, float* sum_g_yc) {
  for (int64_t r = 0; r < rows; ++r) {
    for_channel_vectors<float>(C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      const V yv = vload<V>(y + r * C + c);
      const V s = vload<V>(scale + c);
      const V g = vload<V>(dout + r * C + c) * act_backward(yv * s + vload<V>(shift + c), ACT);
      vstore(sum_g + c, vload<V>(sum_g + c) + g);
      vstore(sum_g_yc + c, vload<V>(sum_g_yc + c) + g * (yv - vload<V>(mean + c)));
      if constexpr (SCALE) vstore(y + r * C + c, s * g);
    });
  }
}

template <bool SCALE, class Y>
void bn_reduce_act(const float* dout, Y* y, int64_t rows, int64_t C, const float* scale,
                   const float* shift, const float* mean, int64_t act, float* sum_g,
                   float* sum_g_yc) {
  with_act_code(act, [&]<int ACT>() {
    bn_reduce_tile<ACT, SCALE>(dout, y, rows, C, scale, shift, mean, sum_g, sum_g_yc);
  });
}

void tile_bn_reduce(const float* dout, const float* y, int64_t rows, int64_t C,
                    const float* scale, const float* shift, const float* mean, int64_t act,
                    float* sum_g, float* sum_g_yc) {
  bn_reduce_act<false>(dout, y, rows, C, scale, shift, mean, act, sum_g, sum_g_yc);
}

void tile_bn_reduce_scale(const float* dout, float* y, int64_t rows, int64_t C,
                          const float* scale, const float* shift, const float* mean, int64_t act,
                          float* sum_g, float* sum_g_yc) {
  bn_reduce_act<true>(dout, y, rows, C, scale, shift, mean, act, sum_g, sum_g_yc);
}

template <int ACT>
inline void bn_grad_tile(const float* dout, const float* y, float* dy, int64_t rows, int64_t C,
                         const float* scale, const float* shift, const float* mean,
                         const float* coef_b, const float* coef_c) {
  for (int64_t r = 0; r < rows; ++r) {
    for_channel_vectors<float>(C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      const V yv = vload<V>(y + r * C + c);
      const V s = vload<V>(scale + c);
      const V g = vload<V>(dout + r * C + c) * act_backward(yv * s + vload<V>(shift + c), ACT);
      vstore(dy + r * C + c,
             s * g + vload<V>(coef_b + c) + vload<V>(coef_c + c) * (yv - vload<V>(mean + c)));
    });
  }
}

void tile_bn_grad(const float* dout, const float* y, float* dy, int64_t rows, int64_t C,
                  const float* scale, const float* shift, const float* mean,
                  const float* coef_b, const float* coef_c, int64_t act) {
  with_act_code(act, [&]<int ACT>() {
    bn_grad_tile<ACT>(dout, y, dy, rows, C, scale, shift, mean, coef_b, coef_c);
  });
}
