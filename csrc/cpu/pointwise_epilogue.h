// Epilogues of the CPU 1x1 conv (pointwise_conv.cpp): bias + activation over a tile of
// GEMM output rows while the tile is still in cache; also the excitation MLP's two
// layers in the eval plan's squeeze-excite gate (se_gate_eval, squeeze_excite.cpp).
//
//   y[r, c] = act(y[r, c] + bias[c])      r < rows, c < C; y row-major (one NHWC pixel
//   y[r, c] = sigmoid(y[r, c] + bias[c])  per row, channels fastest), float32
//   y[c, j] = act(y[c, j] + bias[c])      c < C, j < cols; rows ld apart (a column tile of
//                                         one NCHW image: one channel per row), float32
//
// No include guard on purpose: each isa_*.cpp includes this once, inside its ISA's
// namespace and `#pragma GCC target`, after vec_math.h (see its header).

// y[r, c] = f(y[r, c] + bias[c]), f applied channel vector by channel vector.
template <class F>
inline void bias_map_rows(float* y, int64_t rows, int64_t C, const float* bias, F&& f) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = y + r * C;
    for_channel_vectors<float>(C, [&](int64_t c, auto proto) {
      using V = decltype(proto);
      vstore(row + c, f(vload<V>(row + c) + vload<V>(bias + c)));
    });
  }
}

template <int ACT>
inline void bias_act_tile(float* y, int64_t rows, int64_t C, const float* bias) {
  bias_map_rows(y, rows, C, bias, [](auto v) { return act_forward(v, ACT); });
}

void bias_act_rows(float* y, int64_t rows, int64_t C, const float* bias, int64_t act) {
  with_act_code(act, [&]<int ACT>() { bias_act_tile<ACT>(y, rows, C, bias); });
}

template <int ACT>
inline void bias_act_planar_tile(float* y, int64_t C, int64_t cols, int64_t ld,
                                 const float* bias) {
  constexpr int L = kLanes<float>;
  using V = Vec<float, L>;
  using S = Vec<float, 1>;
  for (int64_t c = 0; c < C; ++c) {
    float* row = y + c * ld;
    const V b = vsplat<V>(bias[c]);
    int64_t j = 0;
    for (; j + L <= cols; j += L) vstore(row + j, act_forward(vload<V>(row + j) + b, ACT));
    for (; j < cols; ++j) row[j] = act_forward(S{row[j] + bias[c]}, ACT)[0];
  }
}

void bias_act_planar(float* y, int64_t C, int64_t cols, int64_t ld, const float* bias,
                     int64_t act) {
  with_act_code(act, [&]<int ACT>() { bias_act_planar_tile<ACT>(y, C, cols, ld, bias); });
}

void bias_sigmoid_rows(float* y, int64_t rows, int64_t C, const float* bias) {
  bias_map_rows(y, rows, C, bias, [](auto v) { return vsigmoid(v); });
}
