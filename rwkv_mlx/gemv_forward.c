/*
 * Single-row matrix products for MLX's CPU backend on Linux, as BLAS
 * matrix-vector products.
 *
 * MLX sends every float32 product to cblas_sgemm, also when one side is a
 * single row or column, as in decoding one token. For one row, OpenBLAS 0.3.21
 * (Debian 12) read [3072, 768], [768, 3072] and [65536, 768] weights at 11 to
 * 17 GB/s through cblas_sgemm and at 27 to 43 GB/s through cblas_sgemv (2-core
 * x86_64 VM, bench/bench_cpu_ops.py, docs/benchmarks.md). rwkv_mlx/_blas.py compiles this file, loads it before
 * MLX, and so MLX's cblas_sgemm calls land here: products with M = 1 or N = 1
 * go to cblas_sgemv, every other product to OpenBLAS's cblas_sgemm.
 *
 * Row-major C[M, N] = alpha * op(A)[M, K] op(B)[K, N] + beta * C, with
 * op(X) = X or X^T:
 *   M = 1: C's row is alpha * op(B)^T a + beta * C, where a is op(A)'s row,
 *          which lies along A with stride 1 (A as stored) or lda (A^T).
 *   N = 1: C's column (stride ldc) is alpha * op(A) b + beta * C, where b is
 *          op(B)'s column, stride ldb (B as stored) or 1 (B^T).
 */
#include <dlfcn.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);
typedef void (*sgemv_fn)(int order, int trans, int m, int n, float alpha, const float *a, int lda,
                         const float *x, int inc_x, float beta, float *y, int inc_y);

static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;
static long forwarded;

/* Take cblas_sgemm and cblas_sgemv from the BLAS at `path`. Returns 0 on
 * success. Call it before this library's symbols become global. */
int rwkv_mlx_gemv_forward_init(const char *path) {
    void *blas = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!blas) return 1;
    blas_sgemm = (sgemm_fn)dlsym(blas, "cblas_sgemm");
    blas_sgemv = (sgemv_fn)dlsym(blas, "cblas_sgemv");
    return blas_sgemm && blas_sgemv ? 0 : 2;
}

/* Return the number of products sent to cblas_sgemv so far. */
long rwkv_mlx_gemv_forwarded(void) { return forwarded; }

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (order == ROW_MAJOR && k > 0 && m == 1) {
        int inc_a = trans_a == NO_TRANS ? 1 : lda;
        if (inc_a > 0) {
            if (trans_b == NO_TRANS)
                blas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
            else
                blas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
            forwarded++;
            return;
        }
    }
    if (order == ROW_MAJOR && k > 0 && n == 1) {
        int inc_b = trans_b == NO_TRANS ? ldb : 1;
        if (inc_b > 0 && ldc > 0) {
            if (trans_a == NO_TRANS)
                blas_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_b, beta, c, ldc);
            else
                blas_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_b, beta, c, ldc);
            forwarded++;
            return;
        }
    }
    blas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
