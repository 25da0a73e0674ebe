// normscope CPU kernels: LayerNorm / RMSNorm forward and backward on row-major (M, N) problems.
//
// Built on first use by normscope/ops/cpu_backend.py with the system C++ compiler
// (c++ -O3 -march=native -fopenmp -fno-math-errno -shared -fPIC) and called through ctypes; no
// torch headers.
//
// Numerics. Accumulation in A = float (double for float64 problems). LayerNorm centering is the
// reference's shifted two-pass form, with s the row's first valid element (0 for a row without):
//     d = sum(x - s) / count,   c = (x - s) - d,   var = sum(c * c) / count,   mean = s + d
// (x - s is exact for a row with mean 1e4 and standard deviation 1e-3, a float32 mean is not);
// backward recomputes s and d from x instead of using the rounded mean. Never E[x^2] - E[x]^2.
// No -ffast-math: only reductions are reassociated, into a fixed number of lanes combined in a
// fixed tree, so each row's result depends on N alone -- bitwise reproducible and independent of
// the thread count. dw / db are summed per chunk of rows (the chunking is
// chosen by the caller from M and N only), then over the chunks in order.
//
// Speed. Rows are split over OpenMP threads (the libgomp torch already loaded). Each row is read
// from memory once; the later passes hit L1/L2. While a row's output is written, the next row's
// inputs are prefetched. Large outputs are written with non-temporal stores (no read for
// ownership), so a forward moves 2 instead of 3 bytes of memory per byte of output.
//
// Size. Row kernels are templated on A; inputs of other dtypes are converted into a per-thread A
// row (fused into the first pass for 16-bit inputs) and outputs converted on store (fused for the
// usual dtypes), by helpers picked at run time. Every dtype combination works with few
// instantiations, which keeps the build to a few seconds.
//
// dtype codes: 0 float32, 1 float64, 2 bfloat16, 3 float16.

// Only small C headers (no <immintrin.h>, <cmath>, ...): parsing them is most of a build.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace {

template <class X, class Y>
constexpr bool same_v = false;
template <class X>
constexpr bool same_v<X, X> = true;
template <class P>
struct remove_ptr {};
template <class X>
struct remove_ptr<X*> {
  using type = X;
};
static inline float sqrt_(float v) { return __builtin_sqrtf(v); }
static inline double sqrt_(double v) { return __builtin_sqrt(v); }

struct bf16 {
  uint16_t v;
};
using f16 = _Float16;

// ---- element conversion ---------------------------------------------------------------------
template <class A>
static inline A ld(const float* p, int64_t j) { return (A)p[j]; }
template <class A>
static inline A ld(const double* p, int64_t j) { return (A)p[j]; }
template <class A>
static inline A ld(const f16* p, int64_t j) { return (A)(float)p[j]; }
template <class A>
static inline A ld(const bf16* p, int64_t j) {
  uint32_t u = (uint32_t)p[j].v << 16;
  float f;
  memcpy(&f, &u, 4);
  return (A)f;
}

// float -> bfloat16 bits in the high half of a uint32 (low half zero): round to nearest even; a
// NaN stays a NaN (quiet, sign and high payload kept).
static inline uint32_t bf_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  const uint32_t v = f != f ? (u | 0x400000u) : rounded;
  return v & 0xffff0000u;
}
static inline uint16_t f2bf(float f) { return (uint16_t)(bf_bits(f) >> 16); }
static inline void st(float* p, int64_t j, float v) { p[j] = v; }
static inline void st(float* p, int64_t j, double v) { p[j] = (float)v; }
static inline void st(double* p, int64_t j, double v) { p[j] = v; }
static inline void st(double* p, int64_t j, float v) { p[j] = (double)v; }
static inline void st(f16* p, int64_t j, float v) { p[j] = (f16)v; }
static inline void st(f16* p, int64_t j, double v) { p[j] = (f16)(float)v; }
static inline void st(bf16* p, int64_t j, float v) { p[j].v = f2bf(v); }
static inline void st(bf16* p, int64_t j, double v) { p[j].v = f2bf((float)v); }

// Stores v rounded to T at d[l] and returns the stored value as A.
template <class T, class A>
static inline A put_round(T* d, int64_t l, A v) {
  st(d, l, v);
  return ld<A>(d, l);
}
static inline float put_round(bf16* d, int64_t l, float v) {
  const uint32_t b = bf_bits(v);
  d[l].v = (uint16_t)(b >> 16);
  float r;
  memcpy(&r, &b, 4);
  return r;
}

static inline int64_t dsize(int code) { return code == 1 ? 8 : code == 0 ? 4 : 2; }

template <class F>
static bool with_type(int code, F&& f) {
  switch (code) {
    case 0: f((float*)nullptr); return true;
    case 1: f((double*)nullptr); return true;
    case 2: f((bf16*)nullptr); return true;
    case 3: f((f16*)nullptr); return true;
  }
  return false;
}
template <class P>
using elem_t = typename remove_ptr<P>::type;

template <class A>
constexpr int code_of() { return same_v<A, double> ? 1 : 0; }

// Per-thread scratch row, 64-byte aligned (null when n == 0).
template <class A>
struct Scratch {
  A* p = nullptr;
  explicit Scratch(int64_t n) {
    if (n > 0) p = (A*)aligned_alloc(64, ((size_t)n * sizeof(A) + 63) / 64 * 64);
  }
  ~Scratch() { free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Masks as words of A's width: all ones for a valid element, 0 for a masked one. keep(v, mk) is v
// or +0.0 -- a bitwise AND, so v is computed for every element (vectorized, no branch) and
// whatever a masked element computes (NaN / Inf from NaN / Inf input) never leaks. (A select
// `c ? v : 0`, on the uint8 mask or on an A row, is not if-converted by GCC: it may not evaluate
// the float ops of v speculatively without -fno-trapping-math, so it branches and mispredicts on
// random masks. Multiplying by a 0/1 row would turn NaN * 0 into NaN.)
template <class A>
struct mask_word {};
template <>
struct mask_word<float> {
  using type = uint32_t;
};
template <>
struct mask_word<double> {
  using type = uint64_t;
};
template <class A>
using mword_t = typename mask_word<A>::type;

template <class A>
static inline A keep(A v, mword_t<A> mk) {
  mword_t<A> u;
  memcpy(&u, &v, sizeof u);
  u &= mk;
  A r;
  memcpy(&r, &u, sizeof r);
  return r;
}

// ---- reductions into a fixed set of lanes ---------------------------------------------------
// 128 bytes of lanes (4 AVX2 vectors) break the add-latency chain; the lanes are combined in a
// fixed tree, so a sum depends only on n.
template <class A>
constexpr int kLanes = 128 / sizeof(A);

// 0, in a form the compiler cannot see as a constant: a zero-initialised lane array would become a
// `rep stosb` memset, which costs more per row than the vector stores this gives.
static inline int64_t opaque_zero(int64_t n) { return n < 0 ? 1 : 0; }

template <class A, class F>
static inline A lane_sum(int64_t n, F&& f) {
  constexpr int L = kLanes<A>;
  A acc[L];
  const A zero = (A)opaque_zero(n);
  for (int l = 0; l < L; ++l) acc[l] = zero;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
#pragma omp simd
    for (int l = 0; l < L; ++l) acc[l] += f(j + l);
  }
  // Tail: scalar (`if (0)`: not worth vectorizing, and cheaper to compile).
#pragma omp simd if (0)
  for (int l = 0; l < (int)(n - j); ++l) acc[l] += f(j + l);
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// ---- prefetching the next row, streaming stores ---------------------------------------------

// Up to four byte ranges (the next row of each input), prefetched a few lines per step.
struct Prefetch {
  static constexpr unsigned kMax = 4;
  const char* p[kMax] = {nullptr, nullptr, nullptr, nullptr};
  const char* e[kMax] = {nullptr, nullptr, nullptr, nullptr};
  unsigned n = 0, cur = 0;
  int64_t per = 0;
  void add(const void* ptr, int64_t bytes) {
    if (ptr && bytes > 0 && n < kMax) {
      p[n] = (const char*)ptr;
      e[n] = p[n] + bytes;
      ++n;
    }
  }
  // Spread the lines over `steps` calls of step().
  void plan(int64_t steps) {
    int64_t lines = 0;
    for (unsigned i = 0; i < n; ++i) lines += (e[i] - p[i] + 63) / 64;
    steps = steps > 0 ? steps : 1;
    per = (lines + steps - 1) / steps;
  }
  inline void step() {
    for (int64_t q = 0; q < per; ++q) {
      if (cur >= n || cur >= kMax) return;
      __builtin_prefetch(p[cur], 0, 3);
      p[cur] += 64;
      if (p[cur] >= e[cur]) ++cur;
    }
  }
};

#if defined(__AVX__) && defined(__GNUC__) && !defined(__clang__)
// GCC's builtins behind _mm256_stream_si256 / _mm_sfence.
typedef long long v4di __attribute__((vector_size(32)));
static constexpr bool kCanStream = true;
static inline void stream128(void* dst, const void* src) {
  for (int off = 0; off < 128; off += 32) {
    v4di v;
    memcpy(&v, (const char*)src + off, 32);
    __builtin_ia32_movntdq256((v4di*)((char*)dst + off), v);
  }
}
static inline void stream_fence() { __builtin_ia32_sfence(); }
#elif defined(__AVX__) && defined(__clang__)
typedef long long v4di __attribute__((vector_size(32)));
static constexpr bool kCanStream = true;
static inline void stream128(void* dst, const void* src) {
  for (int off = 0; off < 128; off += 32) {
    v4di v;
    memcpy(&v, (const char*)src + off, 32);
    __builtin_nontemporal_store(v, (v4di*)((char*)dst + off));
  }
}
static inline void stream_fence() { __builtin_ia32_sfence(); }
#else
static constexpr bool kCanStream = false;
static inline void stream128(void* dst, const void* src) { memcpy(dst, src, 128); }
static inline void stream_fence() {}
#endif

// Writes a row of n values of dtype O: put(d, l, j) stores element j at d[l] (d + l is y + j,
// or a staging block). With `nt`, 128-byte blocks go out as non-temporal stores. pf.step() runs
// once per block.
template <class O, class Put>
static inline void write_row(O* y, int64_t n, bool nt, Prefetch& pf, Put&& put) {
  constexpr int B = 128 / sizeof(O);
  pf.plan(n / B);
  int64_t j = 0;
  if (kCanStream && nt) {
    const int64_t head = (int64_t)(((32 - ((uintptr_t)y & 31)) & 31) / sizeof(O));
    const int64_t h = head < n ? head : n;
#pragma omp simd if (0)
    for (int64_t q = 0; q < h; ++q) put(y, q, q);
    j = h;
    if (((uintptr_t)(y + j) & 31) == 0) {
      alignas(64) O tmp[B];
      for (; j + B <= n; j += B) {
#pragma omp simd
        for (int l = 0; l < B; ++l) put(tmp, l, j + l);
        stream128(y + j, tmp);
        pf.step();
      }
    }
  } else {
    for (; j + B <= n; j += B) {
#pragma omp simd
      for (int l = 0; l < B; ++l) put(y, j + l, j + l);
      pf.step();
    }
  }
#pragma omp simd if (0)
  for (int64_t q = j; q < n; ++q) put(y, q, q);
}

// write_row for y[j] = f(j) converted to O.
template <class O, class F>
static inline void write_vals(O* y, int64_t n, bool nt, Prefetch& pf, F&& f) {
  write_row<O>(y, n, nt, pf, [&](O* d, int64_t l, int64_t j) { st(d, l, f(j)); });
}

// ---- generic per-dtype helpers --------------------------------------------------------------
template <class T, class A>
static void cvt_in(const void* s, A* d, int64_t n) {
  const T* p = (const T*)s;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) d[j] = ld<A>(p, j);
}
template <class T, class A>
static void cvt_out(const A* s, void* d, int64_t n) {
  T* p = (T*)d;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) st(p, j, s[j]);
}
template <class TX, class TR, class A>
static void add2(const void* xv, const void* rv, A* d, int64_t n) {
  const TX* x = (const TX*)xv;
  const TR* r = (const TR*)rv;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) d[j] = ld<A>(x, j) + ld<A>(r, j);
}
// h = T(buf); buf = A(h)
template <class T, class A>
static void round_store(A* b, void* hv, int64_t n) {
  T* h = (T*)hv;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    st(h, j, b[j]);
    b[j] = ld<A>(h, j);
  }
}

template <class A>
using cvt_in_t = void (*)(const void*, A*, int64_t);
template <class A>
using cvt_out_t = void (*)(const A*, void*, int64_t);
template <class A>
using add2_t = void (*)(const void*, const void*, A*, int64_t);
template <class A>
using round_t = void (*)(A*, void*, int64_t);

template <class A>
static cvt_in_t<A> pick_cvt_in(int t) {
  cvt_in_t<A> f = nullptr;
  with_type(t, [&](auto* p) { f = &cvt_in<elem_t<decltype(p)>, A>; });
  return f;
}
template <class A>
static cvt_out_t<A> pick_cvt_out(int t) {
  cvt_out_t<A> f = nullptr;
  with_type(t, [&](auto* p) { f = &cvt_out<elem_t<decltype(p)>, A>; });
  return f;
}
template <class A>
static round_t<A> pick_round(int t) {
  round_t<A> f = nullptr;
  with_type(t, [&](auto* p) { f = &round_store<elem_t<decltype(p)>, A>; });
  return f;
}
// x, r dtype pairs whose accumulation dtype is A (double iff either is float64).
template <class A>
static add2_t<A> pick_add2(int tx, int tr) {
  add2_t<A> f = nullptr;
  if ((tx == 1 || tr == 1) != same_v<A, double>) return nullptr;
  with_type(tx, [&](auto* px) {
    with_type(tr, [&](auto* pr) {
      using TX = elem_t<decltype(px)>;
      using TR = elem_t<decltype(pr)>;
      if constexpr ((same_v<TX, double> || same_v<TR, double>) ==
                    same_v<A, double>)
        f = &add2<TX, TR, A>;
    });
  });
  return f;
}

// Dtypes with fused conversion: float32 / bfloat16 rows with float accumulation, float64 rows
// with double accumulation. Others go through cvt_in / cvt_out and an A row (float16 gains nothing
// from fusing: GCC converts it one element at a time).
template <class A, class G>
static bool with_fused_type(int code, G&& g) {
  if constexpr (same_v<A, float>) {
    switch (code) {
      case 0: g((float*)nullptr); return true;
      case 2: g((bf16*)nullptr); return true;
    }
  } else {
    if (code == 1) {
      g((double*)nullptr);
      return true;
    }
  }
  return false;
}

// ---- forward --------------------------------------------------------------------------------

// First statistics pass over a row of dtype T, copying it into buf as A when T != A. Returns
// sum(x - k) with k = x[0] (LayerNorm) or sum(x^2) (RMSNorm).
template <class T, class A, bool RMS>
static A pass1(const void* src, A* buf, A* k_out, int64_t n) {
  const T* x = (const T*)src;
  const A k = RMS ? (A)0 : ld<A>(x, 0);
  *k_out = k;
  if constexpr (same_v<T, A>) {
    if constexpr (RMS)
      return lane_sum<A>(n, [&](int64_t j) { return x[j] * x[j]; });
    else
      return lane_sum<A>(n, [&](int64_t j) { return x[j] - k; });
  } else {
    return lane_sum<A>(n, [&](int64_t j) {
      const A v = ld<A>(x, j);
      buf[j] = v;
      if constexpr (RMS)
        return v * v;
      else
        return v - k;
    });
  }
}

// Residual rows with x, r and h of dtype T: writes h = T(A(x) + A(r)) (streamed when nt and the
// row is 32-byte aligned), sets buf = A(h) and returns the first statistics pass over it, as
// pass1, in the same sweep. Lanes follow the element index (j % L) whatever the alignment.
template <class T, class A, bool RMS>
static A pass1_h(const void* xv, const void* rv, void* hv, A* buf, A* k_out, int64_t n, bool nt) {
  const T* x = (const T*)xv;
  const T* r = (const T*)rv;
  T* h = (T*)hv;
  constexpr int B = 128 / sizeof(T);
  constexpr int L = kLanes<A>;
  static_assert(B % L == 0, "a block holds whole lane groups");
  T t0[1];
  const A k = RMS ? (A)0 : put_round(t0, 0, ld<A>(x, 0) + ld<A>(r, 0));
  *k_out = k;
  A acc[L];
  const A zero = (A)opaque_zero(n);
  for (int l = 0; l < L; ++l) acc[l] = zero;
  auto stat = [&](A v) {
    if constexpr (RMS)
      return v * v;
    else
      return v - k;
  };
  const bool stream = kCanStream && nt && ((uintptr_t)h & 31) == 0;
  alignas(64) T tmp[B];
  int64_t j = 0;
  for (; j + B <= n; j += B) {
    T* d = stream ? tmp : h + j;
    for (int g = 0; g < B; g += L) {
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        const A v = put_round(d, g + l, ld<A>(x, j + g + l) + ld<A>(r, j + g + l));
        buf[j + g + l] = v;
        acc[l] += stat(v);
      }
    }
    if (stream) stream128(h + j, tmp);
  }
#pragma omp simd if (0)
  for (int64_t q = j; q < n; ++q) {
    const A v = put_round(h, q, ld<A>(x, q) + ld<A>(r, q));
    buf[q] = v;
    acc[q % L] += stat(v);
  }
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// y = (((x - s) - d) * rstd) * w + b in dtype O (w, b never null: ones / zeros when absent; s, d
// are 0 for RMS); with MASKED, +0 where mk[j] == 0.
template <class A, class O, bool MASKED>
static void out_row(const A* x, const mword_t<A>* mk, void* yv, const A* w, const A* b, A s, A d,
                    A rstd, int64_t n, bool nt, Prefetch& pf) {
  write_vals<O>((O*)yv, n, nt, pf, [&](int64_t j) {
    const A v = (((x[j] - s) - d) * rstd) * w[j] + b[j];
    if constexpr (MASKED)
      return keep(v, mk[j]);
    else
      return v;
  });
}

template <class A>
using pass1_t = A (*)(const void*, A*, A*, int64_t);
template <class A>
using pass1h_t = A (*)(const void*, const void*, void*, A*, A*, int64_t, bool);
template <class A>
using out_t = void (*)(const A*, const mword_t<A>*, void*, const A*, const A*, A, A, A, int64_t,
                       bool, Prefetch&);

// Masked rows: each uint8 mask row is first converted into a row mk of mask words (see keep).

// First statistics pass over a masked row x of dtype T, which also sets mk[j] (all ones where
// m[j] != 0, else 0), counts the valid elements into *cnt and, when T != A, copies the row into
// buf as A. The shift k is the first valid element (0 for a row without any). Returns sum(x - k)
// (LayerNorm) or sum(x^2) (RMSNorm) over the valid elements, in the lanes of lane_sum.
template <class T, class A, bool RMS>
static A masked_pass1(const void* src, const uint8_t* m, A* buf, mword_t<A>* mk, A* k_out,
                      int64_t* cnt, int64_t n) {
  using W = mword_t<A>;
  constexpr int L = kLanes<A>;
  const T* x = (const T*)src;
  A k = 0;
  if (!RMS) {
    int64_t f = 0;
    while (f < n && !m[f]) ++f;
    k = f < n ? ld<A>(x, f) : (A)0;
  }
  *k_out = k;
  // Sum lanes as in lane_sum; count lanes of W (a lane counts at most n / L + 1 < 2^32 elements
  // for any n below 2^37; the count lanes are summed as int64).
  A acc[L];
  W c[L];
  const A zero = (A)opaque_zero(n);
  for (int l = 0; l < L; ++l) acc[l] = zero, c[l] = (W)zero;
  auto body = [&](int64_t j, int l) {
    const A v = ld<A>(x, j);
    if constexpr (!same_v<T, A>) buf[j] = v;
    const W w = (W)0 - (W)(m[j] != 0);
    mk[j] = w;
    c[l] += w & 1;
    // keep before the multiply, as c * c below: acc + v * v may contract into an FMA, as in the
    // unmasked passes.
    const A vk = keep(v, w);
    if constexpr (RMS)
      acc[l] += vk * vk;
    else
      acc[l] += keep(v - k, w);
  };
  int64_t j = 0;
  for (; j + L <= n; j += L) {
#pragma omp simd
    for (int l = 0; l < L; ++l) body(j + l, l);
  }
#pragma omp simd if (0)
  for (int l = 0; l < (int)(n - j); ++l) body(j + l, l);
  int64_t total = 0;
  for (int l = 0; l < L; ++l) total += (int64_t)c[l];
  *cnt = total;
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

template <class A>
using mpass1_t = A (*)(const void*, const uint8_t*, A*, mword_t<A>*, A*, int64_t*, int64_t);

// Statistics of a masked row from masked_pass1's k and sum s1 and the count cnt of valid
// elements: shift s, d, rstd (a row without any: 0, 0, 0).
template <class A>
static void stats_masked(const A* x, const mword_t<A>* mk, A k, A s1, int64_t cnt, int64_t n,
                         A eps, bool rms, A& s, A& d, A& rstd) {
  s = d = rstd = 0;
  if (cnt == 0) return;
  const A denom = (A)cnt;
  if (rms) {
    rstd = (A)1 / sqrt_(s1 / denom + eps);
    return;
  }
  s = k;
  d = s1 / denom;
  const A dd = d;
  const A ss = lane_sum<A>(n, [&](int64_t j) {
    const A c = keep((x[j] - k) - dd, mk[j]);
    return c * c;
  });
  rstd = (A)1 / sqrt_(ss / denom + eps);
}

template <class A>
struct FwdArgs {
  int tin, tout, tx, tr;
  void* in;  // x (dtype tin), or h (dtype tin) written here when r != nullptr
  const void* x;
  const void* r;
  const uint8_t* mask;
  const A* w;  // ones when absent
  const A* b;  // zeros when absent
  void* y;
  A* mean;
  A* rstd;
  int64_t M, N;
  A eps;
  bool rms, stream, prefetch;
  int nt;
  bool small;  // the small-row path may be taken
};

template <class A, bool RMS>
static void pick_pass1(int t, pass1_t<A>& p1, pass1h_t<A>& p1h, pass1_t<A>& p1a) {
  with_fused_type<A>(t, [&](auto* p) {
    p1 = &pass1<elem_t<decltype(p)>, A, RMS>;
    p1h = &pass1_h<elem_t<decltype(p)>, A, RMS>;
  });
  p1a = &pass1<A, A, RMS>;
}

template <class A>
static int try_fwd_small(const FwdArgs<A>& a);

template <class A>
static int fwd_impl(const FwdArgs<A>& a) {
  if (a.small) {
    const int rc = try_fwd_small<A>(a);
    if (rc != 1) return rc;
  }
  const bool RMS = a.rms;
  const int ca = code_of<A>();
  const int64_t N = a.N;
  const int64_t sin = dsize(a.tin), sx = dsize(a.tx), sr = dsize(a.tr), so = dsize(a.tout);
  pass1_t<A> p1 = nullptr, p1a = nullptr;
  pass1h_t<A> p1h = nullptr;
  if (RMS)
    pick_pass1<A, true>(a.tin, p1, p1h, p1a);
  else
    pick_pass1<A, false>(a.tin, p1, p1h, p1a);
  mpass1_t<A> mp1 = nullptr;
  if (a.mask) {
    with_fused_type<A>(a.tin, [&](auto* p) {
      using T = elem_t<decltype(p)>;
      mp1 = RMS ? &masked_pass1<T, A, true> : &masked_pass1<T, A, false>;
    });
  }
  const mpass1_t<A> mp1a = RMS ? &masked_pass1<A, A, true> : &masked_pass1<A, A, false>;
  out_t<A> outf = nullptr;
  if (a.mask)
    with_fused_type<A>(a.tout, [&](auto* p) { outf = &out_row<A, elem_t<decltype(p)>, true>; });
  else
    with_fused_type<A>(a.tout, [&](auto* p) { outf = &out_row<A, elem_t<decltype(p)>, false>; });
  const out_t<A> outa = a.mask ? &out_row<A, A, true> : &out_row<A, A, false>;
  const cvt_in_t<A> cin = pick_cvt_in<A>(a.tin);
  const cvt_out_t<A> cout = pick_cvt_out<A>(a.tout);
  const round_t<A> rnd = pick_round<A>(a.tin);
  const add2_t<A> add = a.r ? pick_add2<A>(a.tx, a.tr) : nullptr;
  if (!cin || !cout || !rnd || (a.r && !add)) return -1;
  const bool nt = a.stream && kCanStream;
  const bool fused_add = a.r && a.tx == a.tin && a.tr == a.tin;
#pragma omp parallel num_threads(a.nt) if (a.nt > 1)
  {
    Scratch<A> buf(N), obuf(outf ? 0 : N);
    Scratch<mword_t<A>> mk(a.mask ? N : 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.M; ++i) {
      char* in_i = (char*)a.in + i * N * sin;
      const uint8_t* m = a.mask ? a.mask + i * N : nullptr;
      const A* src = buf.p;
      A k = 0, s = 0, d = 0, rstd;
      int64_t cnt = 0;
      if (a.r) {
        const char* x_i = (const char*)a.x + i * N * sx;
        const char* r_i = (const char*)a.r + i * N * sr;
        if (p1h && fused_add && !a.mask) {
          s = p1h(x_i, r_i, in_i, buf.p, &k, N, nt);
        } else if (m) {
          add(x_i, r_i, buf.p, N);
          rnd(buf.p, in_i, N);
          s = mp1a(buf.p, m, nullptr, mk.p, &k, &cnt, N);
        } else {
          add(x_i, r_i, buf.p, N);
          rnd(buf.p, in_i, N);
          s = p1a(buf.p, nullptr, &k, N);
        }
      } else if (m) {
        if (a.tin == ca) {
          src = (const A*)in_i;
          s = mp1a(in_i, m, nullptr, mk.p, &k, &cnt, N);
        } else if (mp1) {
          s = mp1(in_i, m, buf.p, mk.p, &k, &cnt, N);
        } else {
          cin(in_i, buf.p, N);
          s = mp1a(buf.p, m, nullptr, mk.p, &k, &cnt, N);
        }
      } else if (a.tin == ca) {
        src = (const A*)in_i;
        s = p1a(in_i, nullptr, &k, N);
      } else if (p1) {
        s = p1(in_i, buf.p, &k, N);
      } else {
        cin(in_i, buf.p, N);
        s = p1a(buf.p, nullptr, &k, N);
      }
      Prefetch pf;
      if (a.prefetch && i + 1 < a.M) {
        if (a.r) {
          pf.add((const char*)a.x + (i + 1) * N * sx, N * sx);
          pf.add((const char*)a.r + (i + 1) * N * sr, N * sr);
        } else {
          pf.add((const char*)a.in + (i + 1) * N * sin, N * sin);
        }
        if (m) pf.add(m + N, N);
      }
      char* y_i = (char*)a.y + i * N * so;
      if (m) {
        const A s1 = s;
        stats_masked<A>(src, mk.p, k, s1, cnt, N, a.eps, RMS, k, d, rstd);
      } else {
        if (RMS) {
          rstd = (A)1 / sqrt_(s / (A)N + a.eps);
        } else {
          d = s / (A)N;
          const A kk = k, dd = d;
          const A ss = lane_sum<A>(N, [&](int64_t j) {
            const A c = (src[j] - kk) - dd;
            return c * c;
          });
          rstd = (A)1 / sqrt_(ss / (A)N + a.eps);
        }
      }
      if (outf) {
        outf(src, mk.p, y_i, a.w, a.b, k, d, rstd, N, nt, pf);
      } else {
        outa(src, mk.p, obuf.p, a.w, a.b, k, d, rstd, N, false, pf);
        cout(obuf.p, y_i, N);
      }
      if (a.mean) a.mean[i] = k + d;
      a.rstd[i] = rstd;
    }
    if (nt) stream_fence();
  }
  return 0;
}

// ---- backward -------------------------------------------------------------------------------
//
// xhat = ((x - s) - d) * rstd with s, d recomputed from x as in forward, g0 = dy, g = g0 * w (all
// 0 where masked), <.> the mean over valid elements:
//   dx = rstd * (g - <g> - xhat * <g xhat>) [+ dh]      (RMS: s = d = 0 and no <g> term)
//   dw += g0 * xhat, db += g0, into a per-thread block row of A, added every kDwBlock rows into a
//   double row for the current chunk, stored as the chunk's partial row; the partials are summed
//   over the chunks in double (a single running float sum over a chunk of 1024 rows loses about
//   4x more than torch's own reduction).

// With MASKED, xhat and g0 are +0 where mk[j] == 0 (see keep).
template <class A, bool DW, bool DB, bool MASKED>
static void bwd_sums(const A* x, const A* dy, const mword_t<A>* mk, const A* w, A s, A d, A rstd,
                     int64_t n, A* pw, A* pb, A* s1, A* s2) {
  // Two sums in one sweep: lanes by hand (lane_sum returns one value).
  constexpr int L = kLanes<A>;
  A a1[L], a2[L];
  const A zero = (A)opaque_zero(n);
  for (int l = 0; l < L; ++l) a1[l] = a2[l] = zero;
  auto body = [&](int64_t j, int l) {
    A xh = ((x[j] - s) - d) * rstd;
    A g0 = dy[j];
    if constexpr (MASKED) {
      xh = keep(xh, mk[j]);
      g0 = keep(g0, mk[j]);
    }
    const A g = g0 * w[j];
    if constexpr (DW) pw[j] += g0 * xh;
    if constexpr (DB) pb[j] += g0;
    a1[l] += g;
    a2[l] += g * xh;
  };
  int64_t j = 0;
  for (; j + L <= n; j += L) {
#pragma omp simd
    for (int l = 0; l < L; ++l) body(j + l, l);
  }
#pragma omp simd if (0)
  for (int l = 0; l < (int)(n - j); ++l) body(j + l, l);
  for (int wd = L / 2; wd > 0; wd /= 2)
    for (int l = 0; l < wd; ++l) {
      a1[l] += a1[l + wd];
      a2[l] += a2[l + wd];
    }
  *s1 = a1[0];
  *s2 = a2[0];
}

template <class A>
using sums_t = void (*)(const A*, const A*, const mword_t<A>*, const A*, A, A, A, int64_t, A*, A*,
                        A*, A*);

template <class A, bool MASKED>
static sums_t<A> pick_sums(bool dw, bool db) {
  return dw ? (db ? &bwd_sums<A, true, true, MASKED> : &bwd_sums<A, true, false, MASKED>)
            : (db ? &bwd_sums<A, false, true, MASKED> : &bwd_sums<A, false, false, MASKED>);
}

// Unmasked LayerNorm rows: one sweep gives the centering and both sums of the backward. With the
// forward's shift k = x[0] and its saved mean mu = fl(k + d): sd = sum(x - k) (d = sd / n, as the
// forward), s1 = sum(g) and t2 = sum(g (x - mu)), g = dy * w. Since xhat = ((x - k) - d) rstd and
// k + d = mu + e exactly (e the rounding error of fl(k + d), from two_sum_err),
// sum(g xhat) = rstd (t2 - e s1) (xhat_dot). x - mu is as exact as the forward's centering (exact
// when x is within a factor 2 of mu: rows with a large offset), so the sum keeps the accuracy of a
// second sweep over xhat. The dw / db sums move to the dx sweep (bwd_dx_acc): two sweeps over the
// row instead of three. A saved mean that is not fl(k + d) (or none) takes the three sweeps.
template <class A>
static void bwd_sums3(const A* x, const A* dy, const A* w, A k, A mu, int64_t n, A* sd, A* s1, A* t2) {
  constexpr int L = kLanes<A>;
  A a0[L], a1[L], a2[L];
  const A zero = (A)opaque_zero(n);
  for (int l = 0; l < L; ++l) a0[l] = a1[l] = a2[l] = zero;
  auto body = [&](int64_t j, int l) {
    const A g = dy[j] * w[j];
    a0[l] += x[j] - k;
    a1[l] += g;
    a2[l] += g * (x[j] - mu);
  };
  int64_t j = 0;
  for (; j + L <= n; j += L) {
#pragma omp simd
    for (int l = 0; l < L; ++l) body(j + l, l);
  }
#pragma omp simd if (0)
  for (int l = 0; l < (int)(n - j); ++l) body(j + l, l);
  for (int wd = L / 2; wd > 0; wd /= 2)
    for (int l = 0; l < wd; ++l) {
      a0[l] += a0[l + wd];
      a1[l] += a1[l + wd];
      a2[l] += a2[l + wd];
    }
  *sd = a0[0];
  *s1 = a1[0];
  *t2 = a2[0];
}

// (a + b) - s exactly, for s = fl(a + b) (Knuth's TwoSum).
template <class A>
static inline A two_sum_err(A a, A b, A s) {
  const A bb = s - a;
  return (a - (s - bb)) + (b - bb);
}

// sum(g xhat) from the sums of bwd_sums3, or false when mu is not fl(k + d) (one function for both
// row paths: the same operations and contractions).
template <class A>
static inline bool xhat_dot(A t2, A k, A d, A mu, A s1, A rstd, A* s2) {
  const A m = k + d;
  if (!(m == mu)) return false;
  const A e = two_sum_err<A>(k, d, m);
  const A t = t2 - e * s1;
  *s2 = rstd * t;
  return true;
}

// bwd_dx for unmasked rows that also adds g0 * xhat and g0 into the block's dw / db sums pw / pb
// (null when not wanted), the terms and order of bwd_sums.
template <class A, class O, bool DW, bool DB>
static void bwd_dx_acc(const A* x, const A* dy, const A* w, const A* dh, void* dxv, A s, A d, A rstd,
                       A c1, A c2, int64_t n, bool nt, Prefetch& pf, A* pw, A* pb) {
  write_vals<O>((O*)dxv, n, nt, pf, [&](int64_t j) {
    const A xh = ((x[j] - s) - d) * rstd;
    const A g0 = dy[j];
    if constexpr (DW) pw[j] += g0 * xh;
    if constexpr (DB) pb[j] += g0;
    const A v = rstd * (g0 * w[j] - c1 - xh * c2);
    return v + dh[j];
  });
}

template <class A>
using dxacc_t = void (*)(const A*, const A*, const A*, const A*, void*, A, A, A, A, A, int64_t, bool,
                         Prefetch&, A*, A*);

template <class A, class O>
static dxacc_t<A> pick_dx_acc(bool dw, bool db) {
  return dw ? (db ? &bwd_dx_acc<A, O, true, true> : &bwd_dx_acc<A, O, true, false>)
            : (db ? &bwd_dx_acc<A, O, false, true> : &bwd_dx_acc<A, O, false, false>);
}

// dx = rstd * (g - c1 - xhat * c2) + dh in dtype O (w: ones when absent; dh: zeros); with MASKED
// the first term is +0 where mk[j] == 0 (see keep).
template <class A, class O, bool MASKED>
static void bwd_dx(const A* x, const A* dy, const mword_t<A>* mk, const A* w, const A* dh,
                   void* dxv, A s, A d, A rstd, A c1, A c2, int64_t n, bool nt, Prefetch& pf) {
  write_vals<O>((O*)dxv, n, nt, pf, [&](int64_t j) {
    const A xh = ((x[j] - s) - d) * rstd;
    const A v = rstd * (dy[j] * w[j] - c1 - xh * c2);
    if constexpr (MASKED)
      return keep(v, mk[j]) + dh[j];
    else
      return v + dh[j];
  });
}

template <class A>
using dx_t = void (*)(const A*, const A*, const mword_t<A>*, const A*, const A*, void*, A, A, A, A,
                      A, int64_t, bool, Prefetch&);

template <class A>
struct BwdArgs {
  int tdy, txn, tdh, tdx;
  const void* dy;
  const void* dh;
  const void* x;
  const uint8_t* mask;
  const A* w;
  const A* mean;
  const A* rstd;
  void* dx;
  A* pw;
  A* pb;
  A* dw;
  A* db;
  int64_t M, N, R;
  bool rms, stream, prefetch;
  int nt;
  bool small;  // the small-row path may be taken
};

// Rows per block of the two-level dw / db sum (blocks are counted from the chunk's first row, so
// the result does not depend on the thread count).
constexpr int64_t kDwBlock = 32;

template <class A>
static int try_bwd_small(const BwdArgs<A>& a);

template <class A>
static int bwd_impl(const BwdArgs<A>& a) {
  if (a.small) {
    const int rc = try_bwd_small<A>(a);
    if (rc != 1) return rc;
  }
  const bool DW = a.dw != nullptr, DB = a.db != nullptr;
  const sums_t<A> sums = a.mask ? pick_sums<A, true>(DW, DB) : pick_sums<A, false>(DW, DB);
  const int ca = code_of<A>();
  const int64_t N = a.N, M = a.M, R = a.R;
  const int64_t K = (M + R - 1) / R;
  const int64_t sdy = dsize(a.tdy), sxn = dsize(a.txn), sdh = dsize(a.tdh), sdx = dsize(a.tdx);
  const cvt_in_t<A> cin_x = pick_cvt_in<A>(a.txn);
  const cvt_in_t<A> cin_dy = pick_cvt_in<A>(a.tdy);
  const cvt_in_t<A> cin_dh = pick_cvt_in<A>(a.dh ? a.tdh : ca);
  const cvt_out_t<A> cout = pick_cvt_out<A>(a.tdx);
  if (!cin_x || !cin_dy || !cin_dh || !cout) return -1;
  dx_t<A> dxf = nullptr;
  if (a.mask)
    with_fused_type<A>(a.tdx, [&](auto* p) { dxf = &bwd_dx<A, elem_t<decltype(p)>, true>; });
  else
    with_fused_type<A>(a.tdx, [&](auto* p) { dxf = &bwd_dx<A, elem_t<decltype(p)>, false>; });
  const dx_t<A> dxa = a.mask ? &bwd_dx<A, A, true> : &bwd_dx<A, A, false>;
  // Unmasked LayerNorm with the saved mean: two sweeps (bwd_sums3, then dx with the dw / db sums).
  const bool two = !a.mask && !a.rms && a.mean != nullptr;
  const sums_t<A> sums_only = pick_sums<A, false>(false, false);
  dxacc_t<A> dxc = nullptr;
  with_fused_type<A>(a.tdx, [&](auto* p) { dxc = pick_dx_acc<A, elem_t<decltype(p)>>(DW, DB); });
  const dxacc_t<A> dxca = pick_dx_acc<A, A>(DW, DB);
  const bool nt = a.stream && kCanStream;
  const bool need_bo = dxf == nullptr || (two && dxc == nullptr);
  // A chunk of at most kDwBlock rows is one block, and its partial is the block's sum (through a double that
  // holds it exactly; a sum started at +0 is never -0): its rows then add into the partial row directly, with
  // no block or chunk scratch rows (for long rows and few rows per chunk, allocating, clearing and flushing
  // those was most of the memory traffic).
  const bool one_block = R <= kDwBlock;
#pragma omp parallel num_threads(a.nt) if (a.nt > 1)
  {
    Scratch<A> bx(a.txn == ca ? 0 : N), bdy(a.tdy == ca ? 0 : N);
    Scratch<A> bdh(a.dh && a.tdh != ca ? N : 0), bo(need_bo ? N : 0), zero(a.dh ? 0 : N);
    Scratch<mword_t<A>> mk(a.mask ? N : 0);
    // the current block's and chunk's dw / db sums (none when a chunk is one block, see above)
    Scratch<A> blw(DW && !one_block ? N : 0), blb(DB && !one_block ? N : 0);
    Scratch<double> chw(DW && !one_block ? N : 0), chb(DB && !one_block ? N : 0);
    if (zero.p) memset(zero.p, 0, sizeof(A) * N);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      A* cw = DW ? a.pw + k * N : nullptr;
      A* cb = DB ? a.pb + k * N : nullptr;
      A* accw = DW ? (one_block ? cw : blw.p) : nullptr;
      A* accb = DB ? (one_block ? cb : blb.p) : nullptr;
      if (one_block) {
        if (DW) memset(cw, 0, sizeof(A) * N);
        if (DB) memset(cb, 0, sizeof(A) * N);
      } else {
        if (DW) memset(chw.p, 0, sizeof(double) * N), memset(blw.p, 0, sizeof(A) * N);
        if (DB) memset(chb.p, 0, sizeof(double) * N), memset(blb.p, 0, sizeof(A) * N);
      }
      const int64_t i1 = (k + 1) * R < M ? (k + 1) * R : M;
      for (int64_t i = k * R; i < i1; ++i) {
        const void* x_i = (const char*)a.x + i * N * sxn;
        const void* dy_i = (const char*)a.dy + i * N * sdy;
        const void* dh_i = a.dh ? (const char*)a.dh + i * N * sdh : nullptr;
        void* dx_i = (char*)a.dx + i * N * sdx;
        const A* x = (const A*)x_i;
        if (a.txn != ca) cin_x(x_i, bx.p, N), x = bx.p;
        const A* dy = (const A*)dy_i;
        if (a.tdy != ca) cin_dy(dy_i, bdy.p, N), dy = bdy.p;
        const A* dh = dh_i ? (const A*)dh_i : zero.p;
        if (dh_i && a.tdh != ca) cin_dh(dh_i, bdh.p, N), dh = bdh.p;
        const A rstd = a.rstd[i];
        const uint8_t* m = a.mask ? a.mask + i * N : nullptr;
        // Recompute the forward's centering: shift s and d = mean(x - s) over valid elements.
        A s = 0, d = 0, denom = (A)N;
        if (m) {
          A k;
          int64_t cnt;
          const A s1 = masked_pass1<A, A, false>(x, m, nullptr, mk.p, &k, &cnt, N);
          denom = cnt > 0 ? (A)cnt : (A)1;
          if (!a.rms) {
            s = k;
            d = s1 / denom;
          }
        }
        A s1, s2;
        if (two) {
          const A k = x[0];
          A sd, t2;
          s = k;
          bwd_sums3<A>(x, dy, a.w, k, a.mean[i], N, &sd, &s1, &t2);
          d = sd / denom;
          if (!xhat_dot<A>(t2, k, d, a.mean[i], s1, rstd, &s2))
            sums_only(x, dy, mk.p, a.w, s, d, rstd, N, nullptr, nullptr, &s1, &s2);
        } else if (!m && !a.rms) {
          const A k = x[0];
          s = k;
          d = lane_sum<A>(N, [&](int64_t j) { return x[j] - k; }) / denom;
        }
        Prefetch pf;
        if (a.prefetch && i + 1 < M) {
          pf.add((const char*)x_i + N * sxn, N * sxn);
          pf.add((const char*)dy_i + N * sdy, N * sdy);
          if (dh_i) pf.add((const char*)dh_i + N * sdh, N * sdh);
          if (m) pf.add(m + N, N);
        }
        if (two) {
          const A c1 = s1 / denom, c2 = s2 / denom;
          if (dxc) {
            dxc(x, dy, a.w, dh, dx_i, s, d, rstd, c1, c2, N, nt, pf, accw, accb);
          } else {
            dxca(x, dy, a.w, dh, bo.p, s, d, rstd, c1, c2, N, false, pf, accw, accb);
            cout(bo.p, dx_i, N);
          }
        } else {
          sums(x, dy, mk.p, a.w, s, d, rstd, N, accw, accb, &s1, &s2);
        }
        if (!one_block && (DW || DB) && ((i - k * R + 1) % kDwBlock == 0 || i + 1 == i1)) {
          for (int pass = 0; pass < 2; ++pass) {
            if ((pass == 0 && !DW) || (pass == 1 && !DB)) continue;
            double* o = pass == 0 ? chw.p : chb.p;
            A* q = pass == 0 ? blw.p : blb.p;
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) o[j] += (double)q[j], q[j] = (A)0;
            if (i + 1 == i1) {
              A* c = pass == 0 ? cw : cb;
              for (int64_t j = 0; j < N; ++j) c[j] = (A)o[j];
            }
          }
        }
        if (!two) {
          const A c1 = a.rms ? (A)0 : s1 / denom;
          const A c2 = s2 / denom;
          if (dxf) {
            dxf(x, dy, mk.p, a.w, dh, dx_i, s, d, rstd, c1, c2, N, nt, pf);
          } else {
            dxa(x, dy, mk.p, a.w, dh, bo.p, s, d, rstd, c1, c2, N, false, pf);
            cout(bo.p, dx_i, N);
          }
        }
      }
    }
    if (nt) stream_fence();
    if (DW || DB) {
      // Column-parallel sum of the chunk partials, in chunk order (the implicit barrier of the
      // loop above makes every partial visible).
      const int64_t C = 512;
#pragma omp for schedule(static)
      for (int64_t c0 = 0; c0 < N; c0 += C) {
        const int64_t c1 = c0 + C < N ? c0 + C : N;
        for (int pass = 0; pass < 2; ++pass) {
          if ((pass == 0 && !DW) || (pass == 1 && !DB)) continue;
          const A* p = pass == 0 ? a.pw : a.pb;
          A* o = pass == 0 ? a.dw : a.db;
          double t[C];
          for (int64_t j = c0; j < c1; ++j) t[j - c0] = (double)p[j];
          for (int64_t kk = 1; kk < K; ++kk) {
            const A* q = p + kk * N;
#pragma omp simd
            for (int64_t j = c0; j < c1; ++j) t[j - c0] += (double)q[j];
          }
          for (int64_t j = c0; j < c1; ++j) o[j] = (A)t[j - c0];
        }
      }
    }
  }
  return 0;
}

// ---- small rows -----------------------------------------------------------------------------
//
// Rows of up to kSmallMax elements, plain (no residual, no mask) with one dtype T for input and
// output, float32 or bfloat16 (float accumulation; float64 rows keep the general loops): the per-row
// costs of the general loops above (picking kernels through pointers, the scalar tail of lane_sum
// on a lane array kept in memory, prefetch planning, streaming checks) outweigh the arithmetic of
// such a row. Here every row runs straight-line code with the lanes in registers: the lane count P
// (a power of two, P = L when N > L) is a template argument, and a row's last partial group of lanes
// reads its last element again with the operands of the masked lanes set to +0. Rows go in groups
// of kSmallGroup (see there). Backward keeps the dw / db blocks and chunks of bwd_impl.
//
// Results are bitwise those of the general loops (NORMSCOPE_CPU_SMALL_ROWS=0 in the tests): each
// lane adds the same terms in the same order from +0 with the same contractions, a masked lane adds
// +0 (exact: a lane sum started from +0 is never -0), and the lanes beyond P, all +0 in lane_sum,
// only ever add +0 in its tree.

constexpr int64_t kSmallMax = 256;

// lane_sum's value for a row of n elements with P lanes (n <= P, or P == kLanes<A>). f(j, mk) is
// the term of element j with its operands kept by the mask word mk (see keep).
template <class A, int P, class F>
static inline A small_sum(int64_t n, F&& f) {
  using W = mword_t<A>;
  constexpr W kAll = ~(W)0;
  A acc[P];
  if (n == P) {  // (the clamped indices below would make gathers)
    for (int l = 0; l < P; ++l) acc[l] = (A)0 + f(l, kAll);
  } else if (n < P) {
    for (int l = 0; l < P; ++l) acc[l] = (A)0 + f(l < n ? l : n - 1, l < n ? kAll : (W)0);
  } else {
    for (int l = 0; l < P; ++l) acc[l] = (A)0 + f(l, kAll);
    int64_t j = P;
    for (; j + P <= n; j += P)
      for (int l = 0; l < P; ++l) acc[l] += f(j + l, kAll);
    if (j < n)
      for (int l = 0; l < P; ++l) acc[l] += f(j + l < n ? j + l : n - 1, j + l < n ? kAll : (W)0);
  }
  // Fully unrolled (else GCC keeps the level loop and moves the partial sums through the stack, where a
  // wide store does not forward to a narrower load: a stall per row).
#pragma GCC unroll 8
  for (int w = P / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// Two sums in one sweep, as bwd_sums: f(j, mk, t1, t2) sets the two terms of element j.
template <class A, int P, class F>
static inline void small_sum2(int64_t n, A* s1, A* s2, F&& f) {
  using W = mword_t<A>;
  constexpr W kAll = ~(W)0;
  A a1[P], a2[P];
  auto add = [&](int l, int64_t j, W mk, bool first) {
    A t1, t2;
    f(j, mk, t1, t2);
    if (first) {
      a1[l] = (A)0 + t1;
      a2[l] = (A)0 + t2;
    } else {
      a1[l] += t1;
      a2[l] += t2;
    }
  };
  if (n == P) {
    for (int l = 0; l < P; ++l) add(l, l, kAll, true);
  } else if (n < P) {
    for (int l = 0; l < P; ++l) add(l, l < n ? l : n - 1, l < n ? kAll : (W)0, true);
  } else {
    for (int l = 0; l < P; ++l) add(l, l, kAll, true);
    int64_t j = P;
    for (; j + P <= n; j += P)
      for (int l = 0; l < P; ++l) add(l, j + l, kAll, false);
    if (j < n)
      for (int l = 0; l < P; ++l) add(l, j + l < n ? j + l : n - 1, j + l < n ? kAll : (W)0, false);
  }
#pragma GCC unroll 8
  for (int w = P / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) {
      a1[l] += a1[l + w];
      a2[l] += a2[l + w];
    }
  *s1 = a1[0];
  *s2 = a2[0];
}

// Three sums in one sweep, as bwd_sums3: f(j, mk, t0, t1, t2) sets the three terms of element j.
template <class A, int P, class F>
static inline void small_sum3(int64_t n, A* s0, A* s1, A* s2, F&& f) {
  using W = mword_t<A>;
  constexpr W kAll = ~(W)0;
  A a0[P], a1[P], a2[P];
  auto add = [&](int l, int64_t j, W mk, bool first) {
    A t0, t1, t2;
    f(j, mk, t0, t1, t2);
    if (first) {
      a0[l] = (A)0 + t0;
      a1[l] = (A)0 + t1;
      a2[l] = (A)0 + t2;
    } else {
      a0[l] += t0;
      a1[l] += t1;
      a2[l] += t2;
    }
  };
  // (omp simd: left to itself, GCC ran the three sums of a bfloat16 row lane by lane)
  if (n == P) {
#pragma omp simd
    for (int l = 0; l < P; ++l) add(l, l, kAll, true);
  } else if (n < P) {
#pragma omp simd
    for (int l = 0; l < P; ++l) add(l, l < n ? l : n - 1, l < n ? kAll : (W)0, true);
  } else {
#pragma omp simd
    for (int l = 0; l < P; ++l) add(l, l, kAll, true);
    int64_t j = P;
    for (; j + P <= n; j += P) {
#pragma omp simd
      for (int l = 0; l < P; ++l) add(l, j + l, kAll, false);
    }
    if (j < n) {
#pragma omp simd
      for (int l = 0; l < P; ++l) add(l, j + l < n ? j + l : n - 1, j + l < n ? kAll : (W)0, false);
    }
  }
  // One array at a time (with the three interleaved, GCC moved the partial sums of rows of up to 8
  // elements through the stack: a store-forwarding stall per row, bfloat16 N = 8 1.3x slower).
  auto tree = [](A* a) {
#pragma GCC unroll 8
    for (int w = P / 2; w > 0; w /= 2)
      for (int l = 0; l < w; ++l) a[l] += a[l + w];
  };
  tree(a0);
  tree(a1);
  tree(a2);
  *s0 = a0[0];
  *s1 = a1[0];
  *s2 = a2[0];
}

// body(j) for j < n: with P < kLanes<A> (so n <= P), a loop of P steps guarded by j < n (masked
// vector code, no loop set-up per row).
template <class A, int P, class F>
static inline void small_for(int64_t n, F&& body) {
  if constexpr (P < kLanes<A>) {
    if (n == P) {  // a full row: no mask (GCC does not vectorize the masked form of a bfloat16 store)
#pragma omp simd
      for (int j = 0; j < P; ++j) body(j);
    } else {
#pragma omp simd
      for (int j = 0; j < P; ++j)
        if (j < n) body(j);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) body(j);
  }
}

// Rows per group: a group's rows are reduced one after the other (independent chains the core
// overlaps), and their divisions and square roots run as one vector operation.
constexpr int kSmallGroup = 16;
// ... but fewer for longer rows: each pass goes over all of a group's rows before the next pass, so a group's
// rows of each input (x; x and dy in the backward) should stay in L1 between the passes together with the
// outputs. 16 rows of 256 float32 elements (16 KB per input) did not: the backward at N = 128-256 took 1.25-1.35x
// the time it takes with groups of 4 KB per input, the forward at N = 256 about 1.1-1.2x.
constexpr int64_t kSmallGroupBytes = 4096;

// Rows per group for rows of n elements of T: a power of two (kDwBlock is a multiple of it, so the dw / db
// flushes fall on group ends) of at most kSmallGroup rows and, beyond one row, kSmallGroupBytes per input.
template <class T>
static inline int small_group_rows(int64_t n) {
  int g = kSmallGroup;
  while (g > 1 && g * n * (int64_t)sizeof(T) > kSmallGroupBytes) g /= 2;
  return g;
}

template <class T, class A, bool RMS, int P>
static int fwd_small(const FwdArgs<A>& a) {
  using W = mword_t<A>;
  constexpr int G = kSmallGroup;
  const int64_t N = a.N;
  const T* X = (const T*)a.in;
  T* Y = (T*)a.y;
  const A* w = a.w;
  const A* b = a.b;
  const A eps = a.eps;
  const A dn = (A)N;
  const int Gr = small_group_rows<T>(N);  // (kSmallGroup when N == 1)
  const int64_t groups = (a.M + Gr - 1) / Gr;
  if constexpr (P == 1) {
    // Rows of one element: a group's rows are consecutive elements, so each step below runs as one vector
    // operation across the group's rows (the same operations per row as the general case).
#pragma omp parallel for num_threads(a.nt) if (a.nt > 1) schedule(static)
    for (int64_t q = 0; q < groups; ++q) {
      const int64_t i0 = q * Gr;
      const int cnt = (int)(a.M - i0 < Gr ? a.M - i0 : Gr);
      const T* x = X + i0;
      T* y = Y + i0;
      const A w0 = w[0], b0 = b[0];
      A mean[G], rstd[G];
#pragma omp simd
      for (int g = 0; g < cnt; ++g) {
        const A v = ld<A>(x, g);
        A kg = 0, dg = 0, rg;
        if constexpr (RMS) {
          rg = (A)1 / sqrt_(((A)0 + v * v) / dn + eps);
        } else {
          kg = v;
          dg = ((A)0 + (v - kg)) / dn;
          const A c = (v - kg) - dg;
          rg = (A)1 / sqrt_(((A)0 + c * c) / dn + eps);
        }
        st(y, g, (((v - kg) - dg) * rg) * w0 + b0);
        mean[g] = kg + dg;
        rstd[g] = rg;
      }
      if (a.mean)
        for (int g = 0; g < cnt; ++g) a.mean[i0 + g] = mean[g];
      for (int g = 0; g < cnt; ++g) a.rstd[i0 + g] = rstd[g];
    }
    return 0;
  }
#pragma omp parallel for num_threads(a.nt) if (a.nt > 1) schedule(static)
  for (int64_t q = 0; q < groups; ++q) {
    const int64_t i0 = q * Gr;
    const int cnt = (int)(a.M - i0 < Gr ? a.M - i0 : Gr);
    A k[G], s1[G], d[G], rstd[G];
    for (int g = 0; g < G; ++g) k[g] = s1[g] = d[g] = 0;
    for (int g = 0; g < cnt; ++g) {
      const T* x = X + (i0 + g) * N;
      const A kg = RMS ? (A)0 : ld<A>(x, 0);
      k[g] = kg;
      s1[g] = small_sum<A, P>(N, [&](int64_t j, W mk) {
        const A v = ld<A>(x, j);
        if constexpr (RMS) {
          const A vk = keep(v, mk);
          return vk * vk;
        } else {
          return keep(v - kg, mk);
        }
      });
    }
    if constexpr (RMS) {
#pragma omp simd
      for (int g = 0; g < G; ++g) rstd[g] = (A)1 / sqrt_(s1[g] / dn + eps);
    } else {
      A ss[G];
#pragma omp simd
      for (int g = 0; g < G; ++g) d[g] = s1[g] / dn, ss[g] = 0;
      for (int g = 0; g < cnt; ++g) {
        const T* x = X + (i0 + g) * N;
        const A kg = k[g], dg = d[g];
        ss[g] = small_sum<A, P>(N, [&](int64_t j, W mk) {
          const A c = keep((ld<A>(x, j) - kg) - dg, mk);
          return c * c;
        });
      }
#pragma omp simd
      for (int g = 0; g < G; ++g) rstd[g] = (A)1 / sqrt_(ss[g] / dn + eps);
    }
    for (int g = 0; g < cnt; ++g) {
      const T* x = X + (i0 + g) * N;
      T* y = Y + (i0 + g) * N;
      const A kg = k[g], dg = d[g], rg = rstd[g];
      small_for<A, P>(N, [&](int64_t j) {
        st(y, j, (((ld<A>(x, j) - kg) - dg) * rg) * w[j] + b[j]);
      });
      if (a.mean) a.mean[i0 + g] = kg + dg;
      a.rstd[i0 + g] = rg;
    }
  }
  return 0;
}

template <class T, class A, int P>
static int bwd_small(const BwdArgs<A>& a) {
  using W = mword_t<A>;
  constexpr W kAllW = ~(W)0;
  const int64_t N = a.N, M = a.M, R = a.R;
  const int64_t K = (M + R - 1) / R;
  const T* X = (const T*)a.x;
  const T* DY = (const T*)a.dy;
  T* DX = (T*)a.dx;
  const A* w = a.w;
  constexpr int G = kSmallGroup;
  const A dn = (A)N;
  const bool DW = a.dw != nullptr, DB = a.db != nullptr;
  const int Gr = small_group_rows<T>(N);  // (a power of two, so kDwBlock flushes fall on group ends)
#pragma omp parallel num_threads(a.nt) if (a.nt > 1)
  {
    Scratch<A> blw(DW ? N : 0), blb(DB ? N : 0);  // the current block's dw / db sums
    Scratch<double> chw(DW ? N : 0), chb(DB ? N : 0);  // the current chunk's dw / db sums
#pragma omp for schedule(static)
    for (int64_t kc = 0; kc < K; ++kc) {
      if (DW) memset(chw.p, 0, sizeof(double) * N), memset(blw.p, 0, sizeof(A) * N);
      if (DB) memset(chb.p, 0, sizeof(double) * N), memset(blb.p, 0, sizeof(A) * N);
      A rw[P], rb[P];  // the block's dw / db sums when N <= P < kLanes (see below)
      for (int j = 0; j < P; ++j) rw[j] = rb[j] = (A)0;
      const int64_t i1 = (kc + 1) * R < M ? (kc + 1) * R : M;
      for (int64_t i0 = kc * R; i0 < i1; i0 += Gr) {
        const int cnt = (int)(i1 - i0 < Gr ? i1 - i0 : Gr);
        A sh[G], d[G], rstd[G], s1[G], s2[G], c1[G], c2[G];
        for (int g = 0; g < G; ++g) {
          sh[g] = d[g] = s1[g] = s2[g] = 0;
          rstd[g] = g < cnt ? a.rstd[i0 + g] : (A)0;
        }
        bool again[G];  // rows whose sums need the sweep over xhat below
        for (int g = 0; g < G; ++g) again[g] = g < cnt;
        if (!a.rms && a.mean) {
          // One sweep for the centering and both sums (bwd_sums3, xhat_dot).
          A t2[G];
          for (int g = 0; g < G; ++g) t2[g] = 0;
          for (int g = 0; g < cnt; ++g) {
            const T* x = X + (i0 + g) * N;
            const T* dy = DY + (i0 + g) * N;
            const A k = ld<A>(x, 0), mu = a.mean[i0 + g];
            sh[g] = k;
            small_sum3<A, P>(N, &d[g], &s1[g], &t2[g], [&](int64_t j, W mk, A& u0, A& u1, A& u2) {
              const A v = ld<A>(x, j);
              const A gw = keep(ld<A>(dy, j), mk) * keep(w[j], mk);
              u0 = keep(v - k, mk);
              u1 = gw;
              u2 = gw * keep(v - mu, mk);
            });
          }
#pragma omp simd
          for (int g = 0; g < G; ++g) d[g] = d[g] / dn;
          for (int g = 0; g < cnt; ++g)
            again[g] = !xhat_dot<A>(t2[g], sh[g], d[g], a.mean[i0 + g], s1[g], rstd[g], &s2[g]);
        } else if (!a.rms) {
          for (int g = 0; g < cnt; ++g) {
            const T* x = X + (i0 + g) * N;
            const A k = ld<A>(x, 0);
            sh[g] = k;
            d[g] = small_sum<A, P>(N, [&](int64_t j, W mk) { return keep(ld<A>(x, j) - k, mk); });
          }
#pragma omp simd
          for (int g = 0; g < G; ++g) d[g] = d[g] / dn;
        }
        {
          for (int g = 0; g < cnt; ++g) {
            if (!again[g]) continue;
            const T* x = X + (i0 + g) * N;
            const T* dy = DY + (i0 + g) * N;
            const A s = sh[g], dg = d[g], rg = rstd[g];
            small_sum2<A, P>(N, &s1[g], &s2[g], [&](int64_t j, W mk, A& t1, A& t2) {
              const A xh = keep(((ld<A>(x, j) - s) - dg) * rg, mk);
              const A g0 = keep(ld<A>(dy, j), mk);
              const A gw = g0 * keep(w[j], mk);
              t1 = gw;
              t2 = gw * xh;
            });
          }
        }
        // A run-time 0 for RMS, as in bwd_impl (a constant one would change the FMA contractions).
        const A zero = (A)opaque_zero(N);
#pragma omp simd
        for (int g = 0; g < G; ++g) c1[g] = a.rms ? zero : s1[g] / dn, c2[g] = s2[g] / dn;
        for (int g = 0; g < cnt; ++g) {
          const int64_t i = i0 + g;
          const T* x = X + i * N;
          const T* dy = DY + i * N;
          T* dx = DX + i * N;
          const A s = sh[g], dg = d[g], rg = rstd[g], cg1 = c1[g], cg2 = c2[g];
          A* pw = blw.p;
          A* pb = blb.p;
          if constexpr (P < kLanes<A>) {
            // N <= P: all P lanes, the block sums in registers (rw, rb) rather than in the scratch rows (a
            // masked store there does not forward to the next row's masked load: a stall per row). Lanes
            // j >= N re-read the row's last element and add g0 = +0 (their products +0 or -0), so they
            // stay +0 and are never read; lanes j < N compute exactly the terms of small_for.
            if (N == P) {  // (the clamped indices below would make gathers)
#pragma omp simd
              for (int j = 0; j < P; ++j) {
                const A xh = ((ld<A>(x, j) - s) - dg) * rg;
                const A g0 = ld<A>(dy, j);
                if (DW) rw[j] += g0 * xh;
                if (DB) rb[j] += g0;
                st(dx, j, rg * (g0 * w[j] - cg1 - xh * cg2) + (A)0);
              }
            } else {
#pragma omp simd
              for (int j = 0; j < P; ++j) {
                const int64_t jj = j < N ? j : N - 1;
                const A xh = ((ld<A>(x, jj) - s) - dg) * rg;
                const A g0 = keep(ld<A>(dy, jj), j < N ? kAllW : (W)0);
                if (DW) rw[j] += g0 * xh;
                if (DB) rb[j] += g0;
                if (j < N) st(dx, j, rg * (g0 * w[jj] - cg1 - xh * cg2) + (A)0);
              }
            }
          } else {
            small_for<A, P>(N, [&](int64_t j) {
              const A xh = ((ld<A>(x, j) - s) - dg) * rg;
              const A g0 = ld<A>(dy, j);
              if (DW) pw[j] += g0 * xh;
              if (DB) pb[j] += g0;
              st(dx, j, rg * (g0 * w[j] - cg1 - xh * cg2) + (A)0);
            });
          }
          if ((DW || DB) && ((i - kc * R + 1) % kDwBlock == 0 || i + 1 == i1)) {
            if constexpr (P < kLanes<A>) {  // hand the register sums to the flush below
              for (int64_t j = 0; j < N; ++j) {
                if (DW) pw[j] = rw[j];
                if (DB) pb[j] = rb[j];
              }
              for (int j = 0; j < P; ++j) rw[j] = rb[j] = (A)0;
            }
            for (int pass = 0; pass < 2; ++pass) {
              if ((pass == 0 && !DW) || (pass == 1 && !DB)) continue;
              double* o = pass == 0 ? chw.p : chb.p;
              A* q = pass == 0 ? blw.p : blb.p;
#pragma omp simd
              for (int64_t j = 0; j < N; ++j) o[j] += (double)q[j], q[j] = (A)0;
              if (i + 1 == i1) {
                A* c = (pass == 0 ? a.pw : a.pb) + kc * N;
                for (int64_t j = 0; j < N; ++j) c[j] = (A)o[j];
              }
            }
          }
        }
      }
    }
  }
  // The chunk partials, summed in chunk order (as bwd_impl; N <= kSmallMax columns).
  for (int pass = 0; pass < 2; ++pass) {
    if ((pass == 0 && !DW) || (pass == 1 && !DB)) continue;
    const A* p = pass == 0 ? a.pw : a.pb;
    A* o = pass == 0 ? a.dw : a.db;
    double t[kSmallMax];
    for (int64_t j = 0; j < N; ++j) t[j] = (double)p[j];
    for (int64_t kk = 1; kk < K; ++kk) {
      const A* q = p + kk * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) t[j] += (double)q[j];
    }
    for (int64_t j = 0; j < N; ++j) o[j] = (A)t[j];
  }
  return 0;
}

template <int P>
struct lanes_c {
  static constexpr int value = P;
};

// Calls f(lanes_c<P>{}) with the lane count P of small_sum for rows of n elements.
template <class A, class F>
static inline int with_lanes(int64_t n, F&& f) {
  if (n <= 1) return f(lanes_c<1>{});
  if (n <= 2) return f(lanes_c<2>{});
  if (n <= 4) return f(lanes_c<4>{});
  if (n <= 8) return f(lanes_c<8>{});
  if constexpr (kLanes<A> == 16) {
    return f(lanes_c<16>{});
  } else {
    if (n <= 16) return f(lanes_c<16>{});
    return f(lanes_c<32>{});
  }
}

// The small-row forward for a, or 1 when it does not apply.
template <class A>
static int try_fwd_small(const FwdArgs<A>& a) {
  if (a.N > kSmallMax || a.r || a.mask || a.tin != a.tout) return 1;
  int rc = 1;
  if constexpr (!same_v<A, double>) {
    with_fused_type<A>(a.tin, [&](auto* p) {
      using T = elem_t<decltype(p)>;
      rc = with_lanes<A>(a.N, [&](auto lc) {
        constexpr int P = decltype(lc)::value;
        return a.rms ? fwd_small<T, A, true, P>(a) : fwd_small<T, A, false, P>(a);
      });
    });
  }
  return rc;
}

// The small-row backward for a, or 1 when it does not apply.
template <class A>
static int try_bwd_small(const BwdArgs<A>& a) {
  if (a.N > kSmallMax || a.dh || a.mask || a.tdy != a.txn || a.tdx != a.txn) return 1;
  int rc = 1;
  if constexpr (!same_v<A, double>) {
    with_fused_type<A>(a.txn, [&](auto* p) {
      using T = elem_t<decltype(p)>;
      rc = with_lanes<A>(a.N, [&](auto lc) {
        constexpr int P = decltype(lc)::value;
        return bwd_small<T, A, P>(a);
      });
    });
  }
  return rc;
}

// ---- entry points ---------------------------------------------------------------------------
//
// They take their arguments packed in an int64 array (pointers as integers, 0 for null): one
// ctypes argument instead of twenty keeps the per-call overhead down.
//
// The build compiles this file twice, in parallel: NS_PART=0 holds the float-accumulation kernels
// and the exported entry points, NS_PART=1 the double-accumulation kernels (float64 problems).
// Without NS_PART one compile holds both.

template <class A>
static int fwd_entry(const int64_t* a, double eps) {
  auto P = [&](int k) { return (void*)(uintptr_t)a[k]; };
  const int64_t M = a[14], N = a[15];
  if (!P(9) || !P(10) || !P(5) || !P(11) || !P(13) || N < 1 || M < 0) return -2;
  FwdArgs<A> f{(int)a[0], (int)a[1], (int)a[2], (int)a[3], P(5), P(6), P(7),
               (const uint8_t*)P(8), (const A*)P(9), (const A*)P(10), P(11), (A*)P(12),
               (A*)P(13), M, N, (A)eps, a[16] != 0, (a[17] & 1) != 0, (a[17] & 2) != 0,
               (int)a[18], (a[17] & 4) == 0};
  return fwd_impl<A>(f);
}

template <class A>
static int bwd_entry(const int64_t* a) {
  auto P = [&](int k) { return (void*)(uintptr_t)a[k]; };
  const int64_t M = a[17], N = a[18], R = a[19];
  if (!P(5) || !P(7) || !P(9) || !P(11) || !P(12) || (P(15) && !P(13)) || (P(16) && !P(14)) ||
      N < 1 || M < 0 || R < 1)
    return -2;
  BwdArgs<A> b{(int)a[0], (int)a[1], (int)a[2], (int)a[3], P(5), P(6), P(7),
               (const uint8_t*)P(8), (const A*)P(9), (const A*)P(10), (const A*)P(11), P(12),
               (A*)P(13), (A*)P(14), (A*)P(15), (A*)P(16), M, N, R, a[20] != 0,
               (a[21] & 1) != 0, (a[21] & 2) != 0, (int)a[22], (a[21] & 4) == 0};
  return bwd_impl<A>(b);
}

}  // namespace

#ifndef NS_PART
#define NS_PART 2
#endif

extern "C" {

#if NS_PART != 0
int ns_fwd_f64(const int64_t* a, double eps) { return fwd_entry<double>(a, eps); }
int ns_bwd_f64(const int64_t* a) { return bwd_entry<double>(a); }
#else
int ns_fwd_f64(const int64_t* a, double eps);
int ns_bwd_f64(const int64_t* a);
#endif

#if NS_PART != 1
int ns_abi_version() { return 5; }

// Forward. a[] = {tin, tout, tx, tr, acc64, in, x, r, mask, w, b, y, mean, rstd, M, N, rms, flags,
// nt}. `in` (dtype tin) is the row input: x itself, or h when r != 0, in which case
// h = round_tin(A(x) + A(r)) is written first (x dtype tx, r dtype tr) and the statistics are
// taken over the stored h. y has dtype tout. w, b: N values of the accumulation type A (double
// iff acc64; ones / zeros when the op has none). mean may be 0 (RMS). flags: bit 0 writes y and h
// with non-temporal stores, bit 1 prefetches the next row, bit 2 turns off the small-row path (the
// same results). Returns 0, or < 0 on bad arguments.
int ns_fwd(const int64_t* a, double eps) {
  return a[4] ? ns_fwd_f64(a, eps) : fwd_entry<float>(a, eps);
}

// Backward. a[] = {tdy, txn, tdh, tdx, acc64, dy, dh, xn, mask, w, mean, rstd, dx, pw, pb, dw, db,
// M, N, rows_per_chunk, rms, flags, nt}. Any dtypes for dy, xn, dh (ignored when dh is 0) and dx.
// w: N accumulation-type values (ones when the op has none); mean: forward's mean (LayerNorm; the
// centering is recomputed from xn, the mean lets unmasked rows take two sweeps, see bwd_sums3), or
// 0. dw / db (0 when not wanted) need pw / pb scratch of K * N
// accumulation values, K = ceil(M / rows_per_chunk). flags as for ns_fwd (for dx). Returns 0, or
// < 0 on bad arguments.
int ns_bwd(const int64_t* a) { return a[4] ? ns_bwd_f64(a) : bwd_entry<float>(a); }
#endif

}  // extern "C"

// ---- monitor statistics -----------------------------------------------------------------------
//
// One call of normscope.Monitor's fused per-call statistics on the CPU (the reference is the torch
// path in normscope/monitor/_monitor.py). Inputs: x and y, row-major (rows, cols), any of the four
// dtypes each. Everything is accumulated in double into the caller's float64 buffers, in place, in
// a fixed order (single thread, fixed 8-lane reductions: deterministic). Per sampled row (rows
// start, start + stride, ...): mean and variance by two passes in double (the mean square for RMS
// norms; never E[x^2] - E[x]^2). NaN / Inf are counted over every element of x and y (a row whose
// double sum is finite holds neither, so only rows with a non-finite sum are counted element-wise).
//
// ia[] = {tx, ty, x, y, rows, cols, start, stride, rms, hist_row_step, hist_bins, sums, maxima,
//         var_hist, in_hist, var_edges, n_var_edges, hist_f64}
// da[] = {eps_threshold, hist_lo, hist_scale, key_in, key_out, key_eps}
// sums (11): valid rows, sum of row means, sum of row variances, eps rows, NaN in, Inf in, NaN out,
//            Inf out, then the finite output elements of the sampled rows as a (count, mean, M2) triple:
//            each row's mean and centred sum of squares by two passes, merged over the rows and into
//            the accumulated triple with Chan et al.'s parallel formula (never E[y^2] - E[y]^2).
// maxima (7): max row mean, max row var, -min row mean, -min row var, then the three event keys
//             (input non-finite, output non-finite in sampled rows, eps-dominated row), each raised
//             to key_* when its event happened.
// var_hist: n_var_edges + 2 slots: bucketize(var, edges, right=True), NaN/Inf rows in the last.
// in_hist: hist_bins + 3 slots: floor((v - lo) * scale + 1) clamped to [0, bins + 1], NaN last;
//          over every hist_row_step-th sampled row, computed in float (double when hist_f64).
// Returns 0, or < 0 on bad arguments.

namespace {

constexpr int kMonLanes = 8;

static inline double lanes_total(const double* l) {
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// Sum of a row (8 lanes, fixed order).
template <class T>
static inline double row_sum(const T* p, int64_t n) {
  double l[kMonLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + kMonLanes <= n; j += kMonLanes)
    for (int u = 0; u < kMonLanes; ++u) l[u] += ld<double>(p, j + u);
  for (int u = 0; j < n; ++j, ++u) l[u] += ld<double>(p, j);
  return lanes_total(l);
}

// Sum of (x - c)^2 over a row (8 lanes); c = 0 gives the sum of squares.
template <class T>
static inline double row_sq(const T* p, int64_t n, double c) {
  double l[kMonLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + kMonLanes <= n; j += kMonLanes)
    for (int u = 0; u < kMonLanes; ++u) {
      const double d = ld<double>(p, j + u) - c;
      l[u] += d * d;
    }
  for (int u = 0; j < n; ++j, ++u) {
    const double d = ld<double>(p, j) - c;
    l[u] += d * d;
  }
  return lanes_total(l);
}

// Count, mean and centred sum of squares (two passes) of the finite values of a row, with NaN / Inf counts.
template <class T>
static inline void row_finite(const T* p, int64_t n, double& cnt, double& mean, double& m2, int64_t& nan,
                              int64_t& inf) {
  double ls[kMonLanes] = {0, 0, 0, 0, 0, 0, 0, 0}, lq[kMonLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t a = 0, b = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double v = ld<double>(p, j);
    const bool isn = v != v;
    const bool isi = !isn && (v - v != v - v);
    a += isn;
    b += isi;
    ls[j % kMonLanes] += (isn || isi) ? 0.0 : v;
  }
  cnt = (double)(n - a - b);
  mean = cnt > 0 ? lanes_total(ls) / cnt : 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double v = ld<double>(p, j);
    const double d = (v == v && v - v == v - v) ? v - mean : 0.0;
    lq[j % kMonLanes] += d * d;
  }
  m2 = cnt > 0 ? lanes_total(lq) : 0.0;
  nan += a;
  inf += b;
}

// (n, mean, m2) += (nb, mean_b, m2_b): Chan et al.'s parallel update of a count, mean and M2.
static inline void chan_merge(double& n, double& mean, double& m2, double nb, double mean_b, double m2_b) {
  if (!(nb > 0)) return;
  if (!(n > 0)) {
    n = nb;
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const double t = n + nb, delta = mean_b - mean;
  mean += delta * (nb / t);
  m2 += m2_b + delta * delta * (n * nb / t);
  n = t;
}

template <class T>
static inline void count_row(const T* p, int64_t n, int64_t& nan, int64_t& inf) {
  const double s = row_sum(p, n);
  if (s - s == 0.0) return;  // finite: no NaN / Inf in the row (double sums of 16/32-bit values do not overflow)
  int64_t a = 0, b = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double v = ld<double>(p, j);
    a += v != v;
    b += (v == v) && (v - v != v - v);
  }
  nan += a;
  inf += b;
}

// Input-histogram indices of n values into idx (float arithmetic, as the torch path for non-float64).
template <class T>
static inline void hist_idx_f(const T* p, int64_t n, float lo, float scale, float top, float nan_slot, int32_t* idx) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = ld<float>(p, j);
    float q = __builtin_floorf((v - lo) * scale + 1.0f);
    q = q < 0.0f ? 0.0f : q;
    q = q > top ? top : q;
    idx[j] = (int32_t)(v != v ? nan_slot : q);
  }
}
template <class T>
static inline void hist_idx_d(const T* p, int64_t n, double lo, double scale, double top, double nan_slot,
                              int32_t* idx) {
  for (int64_t j = 0; j < n; ++j) {
    const double v = ld<double>(p, j);
    double q = __builtin_floor((v - lo) * scale + 1.0);
    q = q < 0.0 ? 0.0 : q;
    q = q > top ? top : q;
    idx[j] = (int32_t)(v != v ? nan_slot : q);
  }
}

template <class TX, class TY>
static int monitor_stats_impl(const int64_t* ia, const double* da) {
  const TX* x = (const TX*)(uintptr_t)ia[2];
  const TY* y = (const TY*)(uintptr_t)ia[3];
  const int64_t rows = ia[4], cols = ia[5], start = ia[6], stride = ia[7];
  const bool rms = ia[8] != 0;
  const int64_t hstep = ia[9], bins = ia[10];
  double* sums = (double*)(uintptr_t)ia[11];
  double* mx = (double*)(uintptr_t)ia[12];
  double* vh = (double*)(uintptr_t)ia[13];
  double* ih = (double*)(uintptr_t)ia[14];
  const double* edges = (const double*)(uintptr_t)ia[15];
  const int64_t ne = ia[16];
  const bool h64 = ia[17] != 0;
  if (!x || !y || !sums || !mx || !vh || !ih || !edges || rows < 1 || cols < 1 || stride < 1 ||
      start < 0 || hstep < 1 || bins < 1 || bins > (1 << 30) || ne < 1)
    return -2;
  const double eps_thr = da[0], lo = da[1], scale = da[2];
  const bool var64 = same_v<TX, double>;
  const double inf_d = __builtin_inf();
  // Scratch: 4 interleaved int64 input histograms (independent increments) and a row of indices.
  const int64_t hw = bins + 3;
  int64_t* hc = (int64_t*)calloc((size_t)(4 * hw), sizeof(int64_t));
  int32_t* idx = (int32_t*)malloc((size_t)cols * sizeof(int32_t));
  if (!hc || !idx) {
    free(hc);
    free(idx);
    return -3;
  }

  int64_t nan_in = 0, inf_in = 0, nan_out = 0, inf_out = 0, bad_out_s = 0, valid = 0, n_eps = 0;
  double s_mean = 0, s_var = 0, o_n = 0, o_mean = 0, o_m2 = 0;
  double mean_max = -inf_d, var_max = -inf_d, nmean_min = -inf_d, nvar_min = -inf_d;
  int64_t k = 0;  // index among the sampled rows
  for (int64_t r = 0; r < rows; ++r) {
    const TX* xr = x + r * cols;
    const TY* yr = y + r * cols;
    if (!(r >= start && (r - start) % stride == 0)) {
      count_row(xr, cols, nan_in, inf_in);
      count_row(yr, cols, nan_out, inf_out);
      continue;
    }
    // Input: sum (counts where it is not finite), then the centred (or raw, RMS) sum of squares.
    double sum = row_sum(xr, cols);
    if (sum - sum != 0.0) count_row(xr, cols, nan_in, inf_in);
    const double mean = sum / (double)cols;
    double var = row_sq(xr, cols, rms ? 0.0 : mean) / (double)cols;
    if (!var64) var = (double)(float)var;  // the torch path's accumulation dtype
    const double mean_r = var64 ? mean : (double)(float)mean;
    if (var < inf_d) {
      ++valid;
      s_mean += mean_r;
      s_var += var;
      mean_max = mean_r > mean_max ? mean_r : mean_max;
      var_max = var > var_max ? var : var_max;
      nmean_min = -mean_r > nmean_min ? -mean_r : nmean_min;
      nvar_min = -var > nvar_min ? -var : nvar_min;
      n_eps += var < eps_thr;
      // bucketize(var, edges, right=True): the number of edges <= var.
      int64_t a = 0, b = ne;
      while (a < b) {
        const int64_t mid = (a + b) >> 1;
        const bool le = var64 ? edges[mid] <= var : (float)edges[mid] <= (float)var;
        if (le) a = mid + 1; else b = mid;
      }
      vh[a] += 1.0;
    } else {
      vh[ne + 1] += 1.0;
    }
    if (k % hstep == 0) {
      if (h64)
        hist_idx_d(xr, cols, lo, scale, (double)(bins + 1), (double)(bins + 2), idx);
      else
        hist_idx_f(xr, cols, (float)lo, (float)scale, (float)(bins + 1), (float)(bins + 2), idx);
      int64_t j = 0;
      for (; j + 4 <= cols; j += 4) {
        ++hc[idx[j]];
        ++hc[hw + idx[j + 1]];
        ++hc[2 * hw + idx[j + 2]];
        ++hc[3 * hw + idx[j + 3]];
      }
      for (; j < cols; ++j) ++hc[idx[j]];
    }
    ++k;
    // Output: the row's mean and centred sum of squares (two passes), merged into the call's triple;
    // element-wise counts only for a row whose sum is not finite.
    const double os = row_sum(yr, cols);
    double rn = (double)cols, rmean = os / (double)cols, rm2;
    int64_t c = 0, d = 0;
    if (os - os != 0.0)
      row_finite(yr, cols, rn, rmean, rm2, c, d);
    else
      rm2 = row_sq(yr, cols, rmean);
    nan_out += c;
    inf_out += d;
    bad_out_s += c + d;
    chan_merge(o_n, o_mean, o_m2, rn, rmean, rm2);
  }
  for (int64_t b = 0; b < hw; ++b) ih[b] += (double)(hc[b] + hc[hw + b] + hc[2 * hw + b] + hc[3 * hw + b]);
  free(hc);
  free(idx);
  sums[0] += (double)valid;
  sums[1] += s_mean;
  sums[2] += s_var;
  sums[3] += (double)n_eps;
  sums[4] += (double)nan_in;
  sums[5] += (double)inf_in;
  sums[6] += (double)nan_out;
  sums[7] += (double)inf_out;
  chan_merge(sums[8], sums[9], sums[10], o_n, o_mean, o_m2);
  const double upd[4] = {mean_max, var_max, nmean_min, nvar_min};
  for (int i = 0; i < 4; ++i) mx[i] = upd[i] > mx[i] ? upd[i] : mx[i];
  if (nan_in + inf_in > 0 && da[3] > mx[4]) mx[4] = da[3];
  if (bad_out_s > 0 && da[4] > mx[5]) mx[5] = da[4];
  if (n_eps > 0 && da[5] > mx[6]) mx[6] = da[5];
  return 0;
}

// Sum of squares (in double) of n values of dtype code t at p.
template <class T>
static double sumsq_impl(const T* p, int64_t n) {
  return row_sq(p, n, 0.0);
}

}  // namespace

#if NS_PART != 1
extern "C" {

int ns_monitor_stats(const int64_t* ia, const double* da) {
  int rc = -1;
  const bool ok = with_type((int)ia[0], [&](auto px) {
    with_type((int)ia[1], [&](auto py) {
      rc = monitor_stats_impl<elem_t<decltype(px)>, elem_t<decltype(py)>>(ia, da);
    });
  });
  return ok ? rc : -1;
}

// Gradient norms for the monitor: s = sum of squares of g (n values, dtype code t) in double. mode 0
// (input gradient): slot[0] += s, fired[0] = 1, and key[0] = max(key[0], neg_key) when s is not
// finite. mode 1 (parameter gradient): slot[0] = s, fired[0] = 1. Returns 0, or < 0 on bad arguments.
int ns_monitor_grad(int t, const void* g, int64_t n, int mode, double* slot, double* fired, double* key,
                    double neg_key) {
  if (!g || !slot || !fired || n < 0 || (mode == 0 && !key)) return -2;
  double s = 0;
  const bool ok = with_type(t, [&](auto p) { s = sumsq_impl((const elem_t<decltype(p)>*)g, n); });
  if (!ok) return -1;
  if (mode == 0) {
    slot[0] += s;
    if (!(s < __builtin_inf()) && neg_key > key[0]) key[0] = neg_key;
  } else {
    slot[0] = s;
  }
  fired[0] = 1.0;
  return 0;
}

}  // extern "C"
#endif
