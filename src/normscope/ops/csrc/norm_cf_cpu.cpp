// normscope CPU kernels: channels-first LayerNorm (timm's LayerNorm2d, ConvNeXt) forward and backward.
//
// The input is a contiguous (B, C, S) tensor (NCHW with S = H * W, or any (N, C, *spatial)): every
// position (b, s) is normalized over its C channels, which lie S elements apart. Instead of a permute
// copy to channels-last, a block of up to kBlock consecutive positions is processed at once: each pass
// walks the channels and updates the block's per-position accumulators, so every load is a contiguous,
// vectorizable run of up to kBlock elements, and a block's inputs (about 128 KB, see block_of) stay
// in L2 between the passes.
//
// Built on first use by normscope/ops/channels_first.py with the system C++ compiler, like
// norm_cpu.cpp, and called through ctypes; no torch headers.
//
// Numerics. Sums in double for every input dtype (C is at most a few thousand, so this costs little and
// makes each position's statistics exact to the float32 result of the float64 math); LayerNorm's two-pass
// form (mean, then the sum of squared deviations; never E[x^2] - E[x]^2). mean / rstd are stored in A
// (float; double for float64 input). Backward: dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) with
// g = dy * w, xhat recomputed from x, mean and rstd. dw / db are summed per block into that block's own
// partial row, then over the blocks in order: deterministic, independent of the thread count.
//
// dtype codes: 0 float32, 1 float64, 2 bfloat16, 3 float16.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace {

constexpr int64_t kBlock = 256;  // the most positions per block

// Positions per block: a block's C x n inputs (about 128 KB in float32) stay in L2 between the passes, and
// each channel's run of n positions is long enough for the prefetchers. Depends on C only, so the blocking
// (and the order of the dw / db sums) is the same for any thread count.
static inline int64_t block_of(int64_t C) {
  int64_t n = ((32768 / (C > 0 ? C : 1)) / 16) * 16;
  return n < 16 ? 16 : n > kBlock ? kBlock : n;
}

struct bf16 {
  uint16_t v;
};
using f16 = _Float16;

static inline double ld(const float* p, int64_t j) { return (double)p[j]; }
static inline double ld(const double* p, int64_t j) { return p[j]; }
static inline double ld(const f16* p, int64_t j) { return (double)(float)p[j]; }
static inline double ld(const bf16* p, int64_t j) {
  uint32_t u = (uint32_t)p[j].v << 16;
  float f;
  memcpy(&f, &u, 4);
  return (double)f;
}

// float -> bfloat16 with round to nearest even; a NaN stays a quiet NaN.
static inline uint16_t f2bf(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static inline void st(float* p, int64_t j, double v) { p[j] = (float)v; }
static inline void st(double* p, int64_t j, double v) { p[j] = v; }
static inline void st(f16* p, int64_t j, double v) { p[j] = (f16)(float)v; }
static inline void st(bf16* p, int64_t j, double v) { p[j].v = f2bf((float)v); }

// One block: positions [s0, s0 + n) of batch b. x points at (b, 0, s0); channel c is x + c * S.
template <class T, class A>
static void fwd_block(const T* x, int64_t C, int64_t S, int64_t n, const A* w, const A* bias, double eps,
                      T* y, A* mean, A* rstd) {
  double acc[kBlock], mu[kBlock], rs[kBlock];
  for (int64_t j = 0; j < n; ++j) acc[j] = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const T* xc = x + c * S;
    for (int64_t j = 0; j < n; ++j) acc[j] += ld(xc, j);
  }
  for (int64_t j = 0; j < n; ++j) {
    mu[j] = acc[j] / (double)C;
    acc[j] = 0.0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* xc = x + c * S;
    for (int64_t j = 0; j < n; ++j) {
      double d = ld(xc, j) - mu[j];
      acc[j] += d * d;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    // rstd rounded to A first, as the stored statistics the backward uses
    A r = (A)(1.0 / __builtin_sqrt(acc[j] / (double)C + eps));
    rs[j] = (double)r;
    mean[j] = (A)mu[j];
    rstd[j] = r;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* xc = x + c * S;
    T* yc = y + c * S;
    double wc = w ? (double)w[c] : 1.0, bc = bias ? (double)bias[c] : 0.0;
    for (int64_t j = 0; j < n; ++j) st(yc, j, (ld(xc, j) - mu[j]) * rs[j] * wc + bc);
  }
}

template <class T, class A>
static void bwd_block(const T* dy, const T* x, int64_t C, int64_t S, int64_t n, const A* w, const A* mean,
                      const A* rstd, T* dx, double* dw_part, double* db_part) {
  double sg[kBlock], sgx[kBlock], mu[kBlock], rs[kBlock];
  for (int64_t j = 0; j < n; ++j) {
    sg[j] = 0.0;
    sgx[j] = 0.0;
    mu[j] = (double)mean[j];
    rs[j] = (double)rstd[j];
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* xc = x + c * S;
    const T* dc = dy + c * S;
    double wc = w ? (double)w[c] : 1.0, pw = 0.0, pb = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      double g = ld(dc, j), xh = (ld(xc, j) - mu[j]) * rs[j];
      pw += g * xh;
      pb += g;
      sg[j] += g * wc;
      sgx[j] += g * wc * xh;
    }
    if (dw_part) dw_part[c] = pw;
    if (db_part) db_part[c] = pb;
  }
  const double inv = 1.0 / (double)C;
  for (int64_t j = 0; j < n; ++j) {
    sg[j] *= inv;
    sgx[j] *= inv;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* xc = x + c * S;
    const T* dc = dy + c * S;
    T* oc = dx + c * S;
    double wc = w ? (double)w[c] : 1.0;
    for (int64_t j = 0; j < n; ++j) {
      double xh = (ld(xc, j) - mu[j]) * rs[j];
      st(oc, j, rs[j] * (ld(dc, j) * wc - sg[j] - xh * sgx[j]));
    }
  }
}

template <class T, class A>
static void fwd(int64_t B, int64_t C, int64_t S, const void* xv, const void* wv, const void* bv, double eps,
                void* yv, void* meanv, void* rstdv, int threads) {
  const T* x = (const T*)xv;
  T* y = (T*)yv;
  const A *w = (const A*)wv, *bias = (const A*)bv;
  A *mean = (A*)meanv, *rstd = (A*)rstdv;
  const int64_t K = block_of(C), nb = (S + K - 1) / K, items = B * nb;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t it = 0; it < items; ++it) {
    int64_t b = it / nb, s0 = (it % nb) * K, n = S - s0 < K ? S - s0 : K;
    int64_t off = b * C * S + s0;
    fwd_block<T, A>(x + off, C, S, n, w, bias, eps, y + off, mean + b * S + s0, rstd + b * S + s0);
  }
}

template <class T, class A>
static void bwd(int64_t B, int64_t C, int64_t S, const void* dyv, const void* xv, const void* wv,
                const void* meanv, const void* rstdv, void* dxv, void* dwv, void* dbv, int threads) {
  const T *dy = (const T*)dyv, *x = (const T*)xv;
  T* dx = (T*)dxv;
  const A *w = (const A*)wv, *mean = (const A*)meanv, *rstd = (const A*)rstdv;
  A *dw = (A*)dwv, *db = (A*)dbv;
  const int64_t K = block_of(C), nb = (S + K - 1) / K, items = B * nb;
  // per-block partial sums of dw / db, combined over the blocks in order below
  double* part = (dw || db) ? (double*)malloc(sizeof(double) * (size_t)(items * C * 2)) : nullptr;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t it = 0; it < items; ++it) {
    int64_t b = it / nb, s0 = (it % nb) * K, n = S - s0 < K ? S - s0 : K;
    int64_t off = b * C * S + s0;
    bwd_block<T, A>(dy + off, x + off, C, S, n, w, mean + b * S + s0, rstd + b * S + s0, dx + off,
                    part ? part + it * C * 2 : nullptr, part ? part + it * C * 2 + C : nullptr);
  }
  if (part) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < C; ++c) {
      double sw = 0.0, sb = 0.0;
      for (int64_t it = 0; it < items; ++it) {
        sw += part[it * C * 2 + c];
        sb += part[it * C * 2 + C + c];
      }
      if (dw) dw[c] = (A)sw;
      if (db) db[c] = (A)sb;
    }
    free(part);
  }
}

template <class F>
static bool with_type(int code, F&& f) {
  switch (code) {
    case 0: f((float*)nullptr, (float*)nullptr); return true;
    case 1: f((double*)nullptr, (double*)nullptr); return true;
    case 2: f((bf16*)nullptr, (float*)nullptr); return true;
    case 3: f((f16*)nullptr, (float*)nullptr); return true;
  }
  return false;
}

template <class P>
struct remove_ptr {};
template <class X>
struct remove_ptr<X*> {
  using type = X;
};

}  // namespace

extern "C" {

int ns_cf_abi_version() { return 1; }

// Returns 0 on success, 1 for an unknown dtype code.
int ns_cf_fwd(int code, int64_t B, int64_t C, int64_t S, const void* x, const void* w, const void* b, double eps,
              void* y, void* mean, void* rstd, int threads) {
  return with_type(code, [&](auto t, auto a) {
           using T = typename remove_ptr<decltype(t)>::type;
           using A = typename remove_ptr<decltype(a)>::type;
           fwd<T, A>(B, C, S, x, w, b, eps, y, mean, rstd, threads);
         })
             ? 0
             : 1;
}

int ns_cf_bwd(int code, int64_t B, int64_t C, int64_t S, const void* dy, const void* x, const void* w,
              const void* mean, const void* rstd, void* dx, void* dw, void* db, int threads) {
  return with_type(code, [&](auto t, auto a) {
           using T = typename remove_ptr<decltype(t)>::type;
           using A = typename remove_ptr<decltype(a)>::type;
           bwd<T, A>(B, C, S, dy, x, w, mean, rstd, dx, dw, db, threads);
         })
             ? 0
             : 1;
}

}  // extern "C"
