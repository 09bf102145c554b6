// y = x w^T for one fixed float32 weight w (Cout, Cin), the product every 1x1 conv of the
// CPU kernels runs (and dtx_product, its weight gradient): on the native GEMM
// (gemm_microkernel.h, with w^T packed once per weight here) or on the BLAS sgemm_ that
// libtorch_cpu ships (sgemm.h, which packs its operand on every call).
//
// Which one is a policy (gemm_mode): "native", "blas" or "auto" (the default, or the
// environment's EFFNET_CPU_GEMM): auto takes the native GEMM on AVX2/AVX-512 CPUs not
// made by Intel, where MKL's sgemm measured about half its rate (AMD EPYC Zen 5, single
// thread, B0's 1x1 shapes: 69-100 GFLOP/s for MKL against 126-226 for the AVX-512 kernel),
// and MKL on Intel CPUs, where its kernels are tuned (the native kernel was not measured
// against it there). Without sgemm_ the native GEMM is the only route.
//
// Layout: x and y row-major, (rows, Cin) and (rows, Cout): the NHWC pixels of a
// channels_last activation.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace effnet::cpu {

// Whether products made now run on the native GEMM.
bool native_gemm();
// Sets the policy ("auto", "native" or "blas"); returns the previous one.
std::string set_gemm_mode(const std::string& mode);
std::string gemm_mode();
// Whether either route exists (the native one needs AVX2; x86 only).
bool gemm_available();

// dw (cout, cin) = dy^T x (+= with accumulate) for dy (rows, cout; rows ld_dy apart) and
// x (rows, cin): the weight gradient of a 1x1 conv, on the route native_gemm() picks;
// single-threaded (BLAS: threaded as its context makes it).
void dtx_product(const float* dy, int64_t ld_dy, const float* x, float* dw, int64_t rows,
                 int64_t cin, int64_t cout, bool accumulate);

class XWtProduct {
 public:
  XWtProduct() = default;
  XWtProduct(const float* w, int64_t cout, int64_t cin) { reset(w, cout, cin); }

  // Takes weight w (cout, cin, row-major; kept by pointer for BLAS, packed for native).
  void reset(const float* w, int64_t cout, int64_t cin);

  // The product y = x m instead, for m (cin, cout) row-major: the input gradient of a 1x1
  // conv, dx = dy w, is reset_xw(w, Cout, Cin) (m = w^T is already packed: a copy).
  void reset_xw(const float* m, int64_t cin, int64_t cout);

  // This product for w[o, i] * scale[i] (input channel i of base's weight scaled; the
  // squeeze-excite gate folded into a projection), from base's packing: native, base's
  // w^T rows scaled (one contiguous pass, no repacking); BLAS, a scaled copy of w kept
  // here. base must have been made by reset(); the result keeps no reference to it.
  void reset_in_scaled(const XWtProduct& base, const float* scale);

  // y = x w^T for `rows` rows, on the calling thread (BLAS: threaded as its context
  // makes it).
  void operator()(const float* x, float* y, int64_t rows) const;

  // The same with the columns split over at::parallel_for's threads (native) or one
  // BLAS call (threaded by BLAS). Call outside a parallel region.
  void parallel(const float* x, float* y, int64_t rows) const;

  // y[r, :] = sum_t a[r * a_row + off[t]] w[:, t] for `rows` rows: the product with x's
  // rows read through tap offsets instead of stored (a direct conv's patches,
  // patch_conv.cpp; gemm_microkernel.h's gemm_packed_taps), cin = the number of taps. On
  // the calling thread; native products only (made while native_gemm()).
  void taps(const float* a, int64_t a_row, const int64_t* off, float* y, int64_t rows) const;

  int64_t cout() const { return cout_; }

 private:
  using Kernel = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t,
                          int64_t, int64_t, int64_t, int64_t);
  // Route and packed-layout setup shared by reset and reset_xw; false for BLAS.
  bool prepare(const float* w, int64_t cout, int64_t cin, bool xw);
  void blas(const float* x, float* y, int64_t rows) const;

  const float* w_ = nullptr;
  bool xw_ = false;  // w_ is m (cin, cout) of reset_xw
  int64_t cout_ = 0, cin_ = 0, ld_ = 0, panel_ = 0;
  // Width of the packed panel starting at column j (gemm_microkernel.h's layout).
  int64_t panel_width(int64_t j) const { return std::min(panel_, ld_ - j); }

  std::vector<float> wt_;  // w^T in gemm_packed's panels, cin * ld_ zero padded; native only
  std::vector<float> w_scaled_;  // w with scaled input channels; reset_in_scaled on BLAS
  Kernel kernel_ = nullptr;
};

}  // namespace effnet::cpu
