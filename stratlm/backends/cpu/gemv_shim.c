/* cblas_sgemm for MLX on Linux CPU that sends matrix-vector products to cblas_sgemv.

MLX calls cblas_sgemm even when one side is a single row (every decode step). A GEMM
packs the whole weight matrix into a buffer first; a GEMV streams it once, which is
2-3x faster for these memory-bound products. Everything else goes to the real sgemm.
Loaded globally before the real BLAS, so MLX binds cblas_sgemm to this one. */
#include <dlfcn.h>
#include <string.h>

enum { RowMajor = 101 };
enum { NoTrans = 111 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;

int stratlm_gemv_shim_init(const char *path) {
  void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) return 1;
  real_sgemm = (sgemm_fn)dlsym(lib, "cblas_sgemm");
  real_sgemv = (sgemv_fn)dlsym(lib, "cblas_sgemv");
  return (real_sgemm && real_sgemv) ? 0 : 2;
}

static void clear(float *y, int n, int inc) {
  /* beta == 0 must not propagate NaN garbage from an uninitialised output */
  if (inc == 1) memset(y, 0, (size_t)n * sizeof(float));
  else for (int i = 0; i < n; i++) y[(size_t)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
  if (order == RowMajor && K > 0 && M == 1 && N > 1) {
    /* C(1,N) = op(A)(1,K) op(B)(K,N)  ->  y = op(B)^T x */
    int incx = ta == NoTrans ? 1 : lda;
    if (beta == 0.0f) clear(C, N, 1);
    if (tb == NoTrans) real_sgemv(RowMajor, 112, K, N, alpha, B, ldb, A, incx, beta, C, 1);
    else real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, incx, beta, C, 1);
    return;
  }
  if (order == RowMajor && K > 0 && N == 1 && M > 1) {
    /* C(M,1) = op(A)(M,K) op(B)(K,1)  ->  y = op(A) x */
    int incx = tb == NoTrans ? ldb : 1;
    if (beta == 0.0f) clear(C, M, ldc);
    if (ta == NoTrans) real_sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, incx, beta, C, ldc);
    else real_sgemv(RowMajor, 112, K, M, alpha, A, lda, B, incx, beta, C, ldc);
    return;
  }
  real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
