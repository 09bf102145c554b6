// Row-major products on the Fortran BLAS sgemm_ (column-major: C = alpha op(A) op(B) +
// beta C). A row-major (r, c) matrix is the column-major (c, r) matrix, its transpose, so
// each product below is issued as the product of the transposes in reverse order.
#include "sgemm.h"

#include <c10/util/Exception.h>

#include <limits>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define EFFNET_HAS_DLOPEN 1
#endif

namespace effnet::cpu {
namespace {

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const float*, const float*, const int*, const float*, const int*,
                         const float*, float*, const int*);

SgemmFn find_sgemm() {
#ifdef EFFNET_HAS_DLOPEN
  void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  void* fn = lib ? dlsym(lib, "sgemm_") : nullptr;
  return reinterpret_cast<SgemmFn>(fn);
#else
  return nullptr;
#endif
}

SgemmFn sgemm() {
  static const SgemmFn fn = find_sgemm();
  return fn;
}

void colmajor_sgemm(const char* ta, const char* tb, int64_t m, int64_t n, int64_t k,
                    const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                    float* c, int64_t ldc) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();  // BLAS takes 32-bit sizes
  TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "sgemm: a matrix dimension exceeds 2^31 - 1 (m=", m, ", n=", n, ", k=", k, ")");
  const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
  const float one = 1.0f;
  sgemm()(ta, tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &beta, c, &lc);
}

}  // namespace

bool sgemm_available() { return sgemm() != nullptr; }

// y seen as (cout, rows) = A^T B with A = w seen as (cin, cout), B = x seen as (cin, rows).
void gemm_xwt(const float* x, const float* w, float* y, int64_t rows, int64_t cin,
              int64_t cout) {
  colmajor_sgemm("T", "N", cout, rows, cin, w, cin, x, cin, 0.0f, y, cout);
}

// dx seen as (cin, rows) = A B with A = w seen as (cin, cout), B = dy seen as (cout, rows).
void gemm_xw(const float* dy, const float* w, float* dx, int64_t rows, int64_t cin,
             int64_t cout, bool accumulate) {
  colmajor_sgemm("N", "N", cin, rows, cout, w, cin, dy, cout, accumulate ? 1.0f : 0.0f, dx, cin);
}

// dw seen as (cin, cout) += A B^T with A = x seen as (cin, rows), B = dy seen as (cout, rows).
void gemm_dtx(const float* dy, int64_t ld_dy, const float* x, float* dw, int64_t rows,
              int64_t cin, int64_t cout, bool accumulate) {
  colmajor_sgemm("N", "T", cin, cout, rows, x, cin, dy, ld_dy, accumulate ? 1.0f : 0.0f, dw,
                 cin);
}

// y seen as (cols, cout) = A B with A = x seen as (cols, cin) (columns ld apart), B = w
// seen as (cin, cout).
void gemm_wx(const float* w, const float* x, float* y, int64_t cout, int64_t cin, int64_t cols,
             int64_t ld) {
  colmajor_sgemm("N", "N", cols, cout, cin, x, ld, w, cin, 0.0f, y, ld);
}

}  // namespace effnet::cpu
