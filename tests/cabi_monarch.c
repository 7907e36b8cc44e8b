/* A C program using libkernelkit's public header: Monarch forward + backward on a tiny problem,
 * checked against a naive triple loop, plus error statuses.  Built and run by test_monarch_cabi.py
 * (and by .ci/run under AddressSanitizer/UBSan).  Exit code 0 and "ok" on success. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kernelkit/kernelkit.h"

enum { B = 5, K = 3, Q = 4, P = 5, L = 2, S = 7, R = 6, NIN = K * P, NOUT = L * S };

static double naive(const double* x, const double* w1, const double* w2, int b, int o) {
  int c = o % L, n = o / L;
  double acc = 0;
  for (int m = 0; m < R; ++m) {
    int J = m * L + c, a = J / Q, i = J % Q;
    double t = 0;
    for (int j = 0; j < P; ++j) t += w1[(a * Q + i) * P + j] * x[b * NIN + a * P + j];
    acc += w2[(c * S + n) * R + m] * t;
  }
  return acc;
}

int main(void) {
  double x[B * NIN], w1[K * Q * P], w2[L * S * R], out[B * NOUT], dout[B * NOUT];
  double dx[B * NIN], dw1[K * Q * P], dw2[L * S * R];
  unsigned seed = 12345;
#define RND() ((seed = seed * 1103515245u + 12345u), ((double)((seed >> 8) & 0xffff) / 32768.0 - 1.0))
  for (int i = 0; i < B * NIN; ++i) x[i] = RND();
  for (int i = 0; i < K * Q * P; ++i) w1[i] = RND();
  for (int i = 0; i < L * S * R; ++i) w2[i] = RND();
  for (int i = 0; i < B * NOUT; ++i) { out[i] = NAN; dout[i] = RND(); }

  if (kk_abi_version() != KK_ABI_VERSION) { printf("abi mismatch\n"); return 1; }
  kk_status st = kk_monarch_fwd_cpu(KK_FLOAT64, B, K, Q, P, L, S, R, x, NIN, w1, w2, out, NOUT, 1);
  if (st != KK_OK) { printf("fwd failed: %s\n", kk_last_error()); return 1; }
  for (int b = 0; b < B; ++b)
    for (int o = 0; o < NOUT; ++o)
      if (!(fabs(out[b * NOUT + o] - naive(x, w1, w2, b, o)) < 1e-12)) { printf("mismatch %d %d\n", b, o); return 1; }

  /* Backward: check dx against finite differences of sum(out * dout) (exact: the map is linear). */
  st = kk_monarch_bwd_cpu(KK_FLOAT64, B, K, Q, P, L, S, R, x, NIN, w1, w2, dout, NOUT, dx, NIN, dw1, dw2, 0);
  if (st != KK_OK) { printf("bwd failed: %s\n", kk_last_error()); return 1; }
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < NIN; ++i) {
      double save = x[b * NIN + i], g = 0;
      x[b * NIN + i] = save + 1.0;
      for (int o = 0; o < NOUT; ++o) g += dout[b * NOUT + o] * naive(x, w1, w2, b, o);
      x[b * NIN + i] = save;
      for (int o = 0; o < NOUT; ++o) g -= dout[b * NOUT + o] * naive(x, w1, w2, b, o);
      if (!(fabs(g - dx[b * NIN + i]) < 1e-9)) { printf("dx mismatch %d %d: %g vs %g\n", b, i, g, dx[b * NIN + i]); return 1; }
    }

  /* Errors come back as statuses with a message, never as crashes. */
  if (kk_monarch_fwd_cpu(KK_FLOAT64, B, K, Q, P, L, S, R, NULL, NIN, w1, w2, out, NOUT, 1) != KK_ERR_NULL_POINTER) return 2;
  if (strstr(kk_last_error(), "x") == NULL) return 3;
  if (kk_monarch_fwd_cpu(KK_FLOAT64, -3, K, Q, P, L, S, R, x, NIN, w1, w2, out, NOUT, 1) != KK_ERR_INVALID_SIZE) return 4;
  if (kk_monarch_fwd_cpu(KK_FLOAT64, B, K, Q, P, L, S, R + 1, x, NIN, w1, w2, out, NOUT, 1) != KK_ERR_INVALID_SIZE) return 5;
  if (kk_monarch_bwd_cpu(KK_FLOAT64, B, K, Q, P, L, S, R, x, NIN, w1, w2, NULL, NOUT, dx, NIN, NULL, NULL, 1) != KK_ERR_NULL_POINTER) return 6;
  if (kk_monarch_fwd_cpu((kk_dtype)99, B, K, Q, P, L, S, R, x, NIN, w1, w2, out, NOUT, 1) != KK_ERR_UNSUPPORTED_DTYPE) return 7;
  printf("ok %s %s\n", kk_version(), kk_cpu_isa());
  return 0;
}
