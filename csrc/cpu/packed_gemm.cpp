// Route choice and weight packing for XWtProduct (packed_gemm.h).
#include "packed_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>

#include "gemm_microkernel_decl.h"
#include "isa.h"
#include "sgemm.h"

namespace effnet::cpu_gemm {
namespace {
std::atomic<bool> half_vectors_enabled{true};
}  // namespace

bool half_vectors() { return half_vectors_enabled.load(std::memory_order_relaxed); }
bool set_half_vectors(bool enabled) { return half_vectors_enabled.exchange(enabled); }
}  // namespace effnet::cpu_gemm

namespace effnet::cpu {
namespace {

std::mutex mode_mutex;

void check_mode(const std::string& mode, const char* source) {
  TORCH_CHECK_VALUE(mode == "auto" || mode == "native" || mode == "blas", source,
                    " must be 'auto', 'native' or 'blas', got '", mode, "'");
}

std::string& mode_slot() {
  static std::string mode = [] {
    const char* env = std::getenv("EFFNET_CPU_GEMM");
    std::string chosen = env && *env ? env : "auto";
    check_mode(chosen, "EFFNET_CPU_GEMM");
    return chosen;
  }();
  return mode;
}

bool native_isa() { return cpu_isa() != Isa::Base; }

bool intel_cpu() {
#ifdef EFFNET_CPU_X86
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

// Fewest rows per thread when parallel() splits rows.
constexpr int64_t kRowGrain = 48;

}  // namespace

std::string gemm_mode() {
  std::lock_guard<std::mutex> lock(mode_mutex);
  return mode_slot();
}

std::string set_gemm_mode(const std::string& mode) {
  check_mode(mode, "gemm mode");
  TORCH_CHECK(mode != "native" || native_isa(),
              "gemm mode 'native' needs an AVX2 or AVX-512 CPU (this one runs the '", isa_name(),
              "' kernels)");
  TORCH_CHECK(mode != "blas" || sgemm_available(),
              "gemm mode 'blas' needs the sgemm_ of libtorch_cpu, which was not found");
  std::lock_guard<std::mutex> lock(mode_mutex);
  std::string previous = mode_slot();
  mode_slot() = mode;
  return previous;
}

bool native_gemm() {
  const std::string mode = gemm_mode();
  if (!native_isa()) return false;
  if (mode == "native" || !sgemm_available()) return true;
  if (mode == "blas") return false;
  static const bool intel = intel_cpu();
  return !intel;
}

bool gemm_available() { return sgemm_available() || native_isa(); }

void dtx_product(const float* dy, int64_t ld_dy, const float* x, float* dw, int64_t rows,
                 int64_t cin, int64_t cout, bool accumulate) {
  if (native_gemm()) {
    EFFNET_PICK_ISA(cpu_gemm, gemm_dtx_native)(dy, ld_dy, x, dw, rows, cin, cout, accumulate);
  } else {
    gemm_dtx(dy, ld_dy, x, dw, rows, cin, cout, accumulate);
  }
}

bool XWtProduct::prepare(const float* w, int64_t cout, int64_t cin, bool xw) {
  TORCH_CHECK(gemm_available(), "no float32 GEMM: no sgemm_ in libtorch_cpu and no AVX2");
  w_ = w;
  xw_ = xw;
  cout_ = cout;
  cin_ = cin;
  if (!native_gemm()) {
    kernel_ = nullptr;
    wt_.clear();
    return false;
  }
  kernel_ = EFFNET_PICK_ISA(cpu_gemm, gemm_packed);
  const int64_t unit = EFFNET_PICK_ISA(cpu_gemm, packed_unit)();
  panel_ = EFFNET_PICK_ISA(cpu_gemm, packed_panel)();
  ld_ = (cout + unit - 1) / unit * unit;
  wt_.assign(cin * ld_, 0.0f);
  return true;
}

void XWtProduct::reset(const float* w, int64_t cout, int64_t cin) {
  if (prepare(w, cout, cin, false)) EFFNET_PICK_ISA(cpu_gemm, pack_wt)(w, cout, cin, wt_.data(), ld_);
}

void XWtProduct::reset_xw(const float* m, int64_t cin, int64_t cout) {
  if (!prepare(m, cout, cin, true)) return;
  for (int64_t j = 0; j < cout; j += panel_) {
    const int64_t width = panel_width(j), cols = std::min(panel_, cout - j);
    float* block = wt_.data() + j * cin;
    for (int64_t k = 0; k < cin; ++k) std::copy(m + k * cout + j, m + k * cout + j + cols, block + k * width);
  }
}

void XWtProduct::reset_in_scaled(const XWtProduct& base, const float* scale) {
  TORCH_CHECK(!base.xw_ && base.w_ != nullptr, "reset_in_scaled needs a product made by reset()");
  xw_ = false;
  cout_ = base.cout_;
  cin_ = base.cin_;
  ld_ = base.ld_;
  panel_ = base.panel_;
  kernel_ = base.kernel_;
  if (kernel_ == nullptr) {
    w_scaled_.resize(cout_ * cin_);
    for (int64_t o = 0; o < cout_; ++o) {
      const float* src = base.w_ + o * cin_;
      float* dst = w_scaled_.data() + o * cin_;
      for (int64_t i = 0; i < cin_; ++i) dst[i] = src[i] * scale[i];
    }
    w_ = w_scaled_.data();
    wt_.clear();
    return;
  }
  w_ = nullptr;
  wt_.resize(cin_ * ld_);
  for (int64_t j = 0; j < ld_; j += panel_) {  // row i of every panel block scaled by scale[i]
    const int64_t width = panel_width(j);
    const float* src = base.wt_.data() + j * cin_;
    float* dst = wt_.data() + j * cin_;
    for (int64_t i = 0; i < cin_; ++i) {
      const float s = scale[i];
      for (int64_t c = 0; c < width; ++c) dst[i * width + c] = src[i * width + c] * s;
    }
  }
}

void XWtProduct::blas(const float* x, float* y, int64_t rows) const {
  if (xw_) {
    gemm_xw(x, w_, y, rows, cout_, cin_);
  } else {
    gemm_xwt(x, w_, y, rows, cin_, cout_);
  }
}

void XWtProduct::operator()(const float* x, float* y, int64_t rows) const {
  if (rows <= 0) return;
  if (kernel_ == nullptr) {
    blas(x, y, rows);
    return;
  }
  kernel_(x, cin_, wt_.data(), ld_, y, cout_, rows, cin_, 0, cout_);
}

void XWtProduct::taps(const float* a, int64_t a_row, const int64_t* off, float* y,
                      int64_t rows) const {
  TORCH_CHECK(kernel_ != nullptr, "XWtProduct::taps needs the native GEMM");
  if (rows <= 0) return;
  EFFNET_PICK_ISA(cpu_gemm, gemm_packed_taps)(a, a_row, off, cin_, wt_.data(), ld_, y, cout_, rows, 0,
                                              cout_);
}

void XWtProduct::parallel(const float* x, float* y, int64_t rows) const {
  if (rows <= 0) return;
  if (kernel_ == nullptr) {
    blas(x, y, rows);
    return;
  }
  // Column panels over the threads where they share the columns evenly (or there are too
  // few rows to split), else row ranges. at::parallel_for gives each thread a run of
  // ceil(panels / threads) panels, so 80 columns (32 + 32 + 16) went 64 | 16 over two
  // threads and took as long as 64 columns on one.
  const int64_t threads = at::get_num_threads();
  const int64_t panels = (cout_ + panel_ - 1) / panel_;
  const int64_t widest = std::min(cout_, (panels + threads - 1) / threads * panel_);
  const bool even = widest * threads * 10 <= cout_ * 11;  // within 10 % of cout / threads
  if (panels >= threads && (even || rows < threads * kRowGrain)) {
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      kernel_(x, cin_, wt_.data(), ld_, y, cout_, rows, cin_, p0 * panel_,
              std::min(cout_, p1 * panel_));
    });
    return;
  }
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    kernel_(x + r0 * cin_, cin_, wt_.data(), ld_, y + r0 * cout_, cout_, r1 - r0, cin_, 0, cout_);
  });
}

}  // namespace effnet::cpu
