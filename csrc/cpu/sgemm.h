// Row-major float32 matrix products on the BLAS sgemm_ that libtorch_cpu ships (MKL on
// x86 wheels), looked up at runtime; single-threaded or MKL-threaded as the caller's
// context makes them. Layout: every matrix is row-major; the NHWC pixels of a
// channels_last activation are the rows of a (pixels, channels) matrix.
//
//   gemm_xwt      y  (rows, cout)  = x  (rows, cin)  @ w^T     w (cout, cin)
//   gemm_xw       dx (rows, cin)   = dy (rows, cout) @ w  (+= when accumulate)  w (cout, cin)
//   gemm_dtx      dw (cout, cin)   = dy^T @ x  (+= when accumulate)   dy (rows, cout; rows ld_dy
//                 apart), x (rows, cin)
//   gemm_wx       y  (cout, cols)  = w (cout, cin) @ x (cin, cols), x and y rows ld apart
//                 (a column tile of one NCHW image: its channels are the rows)
#pragma once

#include <cstdint>

namespace effnet::cpu {

// Whether libtorch_cpu exports sgemm_ (without it the callers keep ATen's path).
bool sgemm_available();

void gemm_xwt(const float* x, const float* w, float* y, int64_t rows, int64_t cin,
              int64_t cout);
void gemm_xw(const float* dy, const float* w, float* dx, int64_t rows, int64_t cin,
             int64_t cout, bool accumulate = false);
void gemm_dtx(const float* dy, int64_t ld_dy, const float* x, float* dw, int64_t rows,
              int64_t cin, int64_t cout, bool accumulate);
void gemm_wx(const float* w, const float* x, float* y, int64_t cout, int64_t cin, int64_t cols,
             int64_t ld);

}  // namespace effnet::cpu
