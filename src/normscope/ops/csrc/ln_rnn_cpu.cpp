// Fused per-step kernels of the layer-normalized LSTM and GRU (Ba, Kiros & Hinton, 2016) on the CPU.
//
// One call per time step does, for the n sequences running at that step, everything between the recurrent
// matmul (done by torch) and the next one: the per-gate-block layer norm of the hidden pre-activations, the
// gate nonlinearities, the state update and (LSTM) the layer norm of the cell state; the backward call does
// the reverse. Rows k..n-1 hold the zero initial state (their normalized hidden term is exactly zero and is
// not computed). Statistics are two-pass with the sums in double.
// Rows are independent: a parallel loop over rows gives the same bits for any number of threads; the
// parameter-gradient sums are done afterwards by ns_rnn_colsum in a fixed row order.
//
// No torch headers: plain pointers, loaded with ctypes by normscope/ops/rnn_cpu.py. All arrays contiguous.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Elementwise loops: no element depends on another and the arrays do not overlap (GCC otherwise gives up on the
// loops that store to several arrays and runs them scalar). Never on a sum: that would reorder it.
#define NS_SIMD _Pragma("omp simd")

// float32 exp / tanh that the compiler vectorizes (the scalar libm calls cost ~20 ns each and dominated the
// step): Cephes' expf and tanhf (range reduction + minimax polynomials; within 2 ulp of the correctly rounded
// result over the range used here). float64 keeps libm's exp / tanh.
inline float vexp(float x) {
    x = std::min(std::max(x, -87.3f), 88.3f);
    const float t = x * 1.44269504088896341f + 0.5f;
    int32_t n = static_cast<int32_t>(t);
    n -= static_cast<int32_t>(static_cast<float>(n) > t);  // floor(t), in a form the vectorizer takes
    const float fx = static_cast<float>(n);
    x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
    const float z = x * x;
    float y = 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    const int32_t bits = (n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);  // 2^fx
    return y * scale;
}

inline float vtanh(float x) {
    const float ax = std::fabs(x);
    const float z = x * x;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const float small = p * z * x + x;
    const float big = std::copysign(1.0f - 2.0f / (vexp(2.0f * ax) + 1.0f), x);
    const float use_small = static_cast<float>(ax < 0.625f);  // a blend, not a branch: it vectorizes
    return use_small * small + (1.0f - use_small) * big;
}

inline double vexp(double x) { return std::exp(x); }
inline double vtanh(double x) { return std::tanh(x); }

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + vexp(-x)); }

// Sums in double over 16 lanes (element j goes to lane j % 16), the lanes added as a tree at the end: a fixed
// order (the same bits for any thread count) that the compiler vectorizes, which a single running sum is not
// (reassociating it is not allowed without -ffast-math).
constexpr int64_t kLanes = 16;

template <typename T, typename F>
inline double lane_sum(int64_t H, F term) {
    double acc[kLanes] = {0};
    int64_t j0 = 0;
    for (; j0 + kLanes <= H; j0 += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) acc[l] += term(j0 + l);
    for (int64_t l = 0; j0 + l < H; ++l) acc[l] += term(j0 + l);
    // the lanes added as a tree (8 + 8, 4 + 4, ...): vector adds, not a chain of 16 dependent scalar adds (the
    // chain cost as much as the sums themselves on rows of 128). The level loop is unrolled so that the partial
    // sums stay in registers between levels.
#pragma GCC unroll 4
    for (int64_t w = kLanes / 2; w >= 1; w /= 2)
        for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
    return acc[0];
}

// mean / rstd of x[0..H) (two-pass), writes xhat = (x - mean) * rstd.
template <typename T>
inline T normalize(const T* x, int64_t H, T eps, T* xhat) {
    const double mean = lane_sum<T>(H, [&](int64_t j) { return double(x[j]); }) / double(H);
    const double v = lane_sum<T>(H, [&](int64_t j) {
        const double d = double(x[j]) - mean;
        return d * d;
    });
    const double rstd = 1.0 / std::sqrt(v / double(H) + double(eps));
    const T m = T(mean), r = T(rstd);
    NS_SIMD
    for (int64_t j = 0; j < H; ++j) xhat[j] = (x[j] - m) * r;
    return r;
}

// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)); dx may alias dxhat.
template <typename T>
inline void normalize_bwd(const T* dxhat, const T* xhat, T rstd, int64_t H, T* dx) {
    const T a = T(lane_sum<T>(H, [&](int64_t j) { return double(dxhat[j]); }) / double(H));
    const T b = T(lane_sum<T>(H, [&](int64_t j) { return double(dxhat[j]) * double(xhat[j]); }) / double(H));
    NS_SIMD
    for (int64_t j = 0; j < H; ++j) dx[j] = rstd * (dxhat[j] - a - xhat[j] * b);
}

// LSTM forward step over the n running rows. xg (n,4,H): normalized input pre-activations + biases; p (k,4H):
// W_hh h_prev of the live rows; h, c (>= n rows, H): the state, updated in place. Writes out (n,H) = the new h,
// the previous state of each row to hprev / cprev (n,H), and what the backward needs: xhat (n,4,H) (zero for
// rows >= k), rstd (n,4), gates (n,4,H) = sigmoid(i), sigmoid(f), tanh(g), sigmoid(o), cn (n,H), rstd_c (n),
// th (n,H).
template <typename T>
void lstm_fwd(int64_t n, int64_t k, int64_t H, const T* xg, const T* p, T* h, T* c, const T* g_hh, const T* g_c,
              const T* b_c, T eps, T* out, T* hprev, T* cprev, T* xhat, T* rstd, T* gates, T* cn, T* rstd_c, T* th,
              int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < n; ++r) {
        const T* x = xg + r * 4 * H;
        T* xh = xhat + r * 4 * H;
        T* gt = gates + r * 4 * H;
        for (int64_t q = 0; q < 4; ++q) {
            T* a = gt + q * H;
            if (r < k) {
                rstd[r * 4 + q] = normalize(p + r * 4 * H + q * H, H, eps, xh + q * H);
                NS_SIMD
                for (int64_t j = 0; j < H; ++j) a[j] = x[q * H + j] + xh[q * H + j] * g_hh[q * H + j];
            } else {
                rstd[r * 4 + q] = 0;
                NS_SIMD
                for (int64_t j = 0; j < H; ++j) {
                    xh[q * H + j] = 0;
                    a[j] = x[q * H + j];
                }
            }
            if (q == 2) {
                NS_SIMD
                for (int64_t j = 0; j < H; ++j) a[j] = vtanh(a[j]);
            } else {
                NS_SIMD
                for (int64_t j = 0; j < H; ++j) a[j] = sigmoid(a[j]);
            }
        }
        const T* gi = gt;
        const T* gf = gt + H;
        const T* gg = gt + 2 * H;
        const T* go = gt + 3 * H;
        T* hr = h + r * H;
        T* cr = c + r * H;
        T* hp = hprev + r * H;
        T* cp = cprev + r * H;
        NS_SIMD
        for (int64_t j = 0; j < H; ++j) {
            hp[j] = hr[j];
            cp[j] = cr[j];
            cr[j] = gf[j] * cp[j] + gi[j] * gg[j];
        }
        T* cnr = cn + r * H;
        rstd_c[r] = normalize(cr, H, eps, cnr);
        NS_SIMD
        for (int64_t j = 0; j < H; ++j) {
            const T t = vtanh(cnr[j] * g_c[j] + b_c[j]);
            th[r * H + j] = t;
            out[r * H + j] = go[j] * t;
            hr[j] = go[j] * t;
        }
    }
}

// LSTM backward step over the n running rows. dout (n,H): dL/dh_t from the output; dh, dc (>= n rows, H): in
// dL/dh_t, dL/dc_t from the later steps, out dL/dc_{t-1} in dc and zeros in dh for rows >= k (the rows < k get
// dL/dh_{t-1} = dp W_hh from the caller). Writes dxg (n,4,H) (= dL/d gate pre-activation), dp (n,4H) (dL/d W_hh
// h_prev; zero for rows >= k) and dy (n,H) (dL/d (cn * g_c + b_c), for the cell-norm parameter gradients).
template <typename T>
void lstm_bwd(int64_t n, int64_t k, int64_t H, const T* dout, T* dh, T* dc, const T* c_prev, const T* g_hh,
              const T* g_c, const T* xhat, const T* rstd, const T* gates, const T* cn, const T* rstd_c, const T* th,
              T* dxg, T* dp, T* dy, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < n; ++r) {
        const T* gt = gates + r * 4 * H;
        const T* gi = gt;
        const T* gf = gt + H;
        const T* gg = gt + 2 * H;
        const T* go = gt + 3 * H;
        T* da = dxg + r * 4 * H;
        T* dyr = dy + r * H;
        T* dhr = dh + r * H;
        // through h = o * tanh(y), y = cn * g_c + b_c
        NS_SIMD
        for (int64_t j = 0; j < H; ++j) {
            const T t = th[r * H + j];
            const T d = dhr[j] + dout[r * H + j];
            da[3 * H + j] = d * t * go[j] * (T(1) - go[j]);
            dyr[j] = d * go[j] * (T(1) - t * t);
            da[j] = dyr[j] * g_c[j];  // dcn, staged in the i block
        }
        normalize_bwd(da, cn + r * H, rstd_c[r], H, da);  // dcn -> dc through the cell norm
        T* dcr = dc + r * H;
        NS_SIMD
        for (int64_t j = 0; j < H; ++j) {
            const T dct = dcr[j] + da[j];
            da[j] = dct * gg[j] * gi[j] * (T(1) - gi[j]);
            da[H + j] = dct * c_prev[r * H + j] * gf[j] * (T(1) - gf[j]);
            da[2 * H + j] = dct * gi[j] * (T(1) - gg[j] * gg[j]);
            dcr[j] = dct * gf[j];
        }
        if (r < k) {
            T* dpr = dp + r * 4 * H;
            for (int64_t q = 0; q < 4; ++q) {
                NS_SIMD
                for (int64_t j = 0; j < H; ++j) dpr[q * H + j] = da[q * H + j] * g_hh[q * H + j];
                normalize_bwd(dpr + q * H, xhat + r * 4 * H + q * H, rstd[r * 4 + q], H, dpr + q * H);
            }
        } else {
            T* dpr = dp + r * 4 * H;
            NS_SIMD
            for (int64_t j = 0; j < H; ++j) dhr[j] = 0;  // the zero initial state is a constant
            NS_SIMD
            for (int64_t j = 0; j < 4 * H; ++j) dpr[j] = 0;  // (and has no recurrent term)
        }
    }
}

// GRU forward step over the n running rows. xg (n,3,H): normalized input pre-activations + b_ih; p (k,3H);
// h (>= n rows, H): the state, updated in place; b_hh (3H) or null. Writes out (n,H) = the new h, hprev (n,H),
// xhat (n,3,H), rstd (n,3), gates (n,3,H) = r, z, n and hn (n,H) (the hidden term of n).
template <typename T>
void gru_fwd(int64_t n, int64_t k, int64_t H, const T* xg, const T* p, T* h, const T* g_hh, const T* b_hh, T eps,
             T* out, T* hprev, T* xhat, T* rstd, T* gates, T* hn, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < n; ++r) {
        const T* x = xg + r * 3 * H;
        T* xh = xhat + r * 3 * H;
        T* gt = gates + r * 3 * H;
        T* hnr = hn + r * H;
        T* hr = h + r * H;
        T* hp = hprev + r * H;
        for (int64_t q = 0; q < 3; ++q) {
            if (r < k) {
                rstd[r * 3 + q] = normalize(p + r * 3 * H + q * H, H, eps, xh + q * H);
            } else {
                rstd[r * 3 + q] = 0;
                NS_SIMD
                for (int64_t j = 0; j < H; ++j) xh[q * H + j] = 0;
            }
        }
        NS_SIMD
        for (int64_t j = 0; j < H; ++j) {
            T hrr = xh[j] * g_hh[j], hz = xh[H + j] * g_hh[H + j], hnn = xh[2 * H + j] * g_hh[2 * H + j];
            if (b_hh) {
                hrr += b_hh[j];
                hz += b_hh[H + j];
                hnn += b_hh[2 * H + j];
            }
            const T rg = sigmoid(x[j] + hrr);
            const T zg = sigmoid(x[H + j] + hz);
            const T ng = vtanh(x[2 * H + j] + rg * hnn);
            gt[j] = rg;
            gt[H + j] = zg;
            gt[2 * H + j] = ng;
            hnr[j] = hnn;
            hp[j] = hr[j];
            const T hnew = (T(1) - zg) * ng + zg * hp[j];
            out[r * H + j] = hnew;
            hr[j] = hnew;
        }
    }
}

// GRU backward step over the n running rows. dout (n,H): dL/dh_t from the output; dh (>= n rows, H): in dL/dh_t
// from the later steps, out the direct part of dL/dh_{t-1} (z * dL/dh_t; the caller adds dp W_hh for the live
// rows). Writes dxg (n,3,H), dhg (n,3,H) (dL/d hidden gate term, for b_hh and gamma_hh) and dp (n,3H) (zero
// for rows >= k).
template <typename T>
void gru_bwd(int64_t n, int64_t k, int64_t H, const T* dout, T* dh, const T* h_prev, const T* g_hh, const T* xhat,
             const T* rstd, const T* gates, const T* hn, T* dxg, T* dhg, T* dp, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < n; ++r) {
        const T* gt = gates + r * 3 * H;
        T* dx = dxg + r * 3 * H;
        T* dg = dhg + r * 3 * H;
        NS_SIMD
        for (int64_t j = 0; j < H; ++j) {
            const T rg = gt[j], zg = gt[H + j], ng = gt[2 * H + j];
            const T d = dh[r * H + j] + dout[r * H + j];
            const T dan = d * (T(1) - zg) * (T(1) - ng * ng);
            const T dar = dan * hn[r * H + j] * rg * (T(1) - rg);
            const T daz = d * (h_prev[r * H + j] - ng) * zg * (T(1) - zg);
            dx[j] = dar;
            dx[H + j] = daz;
            dx[2 * H + j] = dan;
            dg[j] = dar;
            dg[H + j] = daz;
            dg[2 * H + j] = dan * rg;
            dh[r * H + j] = d * zg;
        }
        if (r < k) {
            T* dpr = dp + r * 3 * H;
            for (int64_t q = 0; q < 3; ++q) {
                NS_SIMD
                for (int64_t j = 0; j < H; ++j) dpr[q * H + j] = dg[q * H + j] * g_hh[q * H + j];
                normalize_bwd(dpr + q * H, xhat + r * 3 * H + q * H, rstd[r * 3 + q], H, dpr + q * H);
            }
        } else {
            T* dpr = dp + r * 3 * H;
            NS_SIMD
            for (int64_t j = 0; j < 3 * H; ++j) dpr[j] = 0;  // the zero initial state has no recurrent term
        }
    }
}

// The input-gate norms of all steps at once: rows r of x (R rows of H; row r is gate block r % G of its time
// step) normalized over H, then y = xhat * gamma[g] + bias[g] (bias null: none). Writes mean and rstd (R): the
// backward recomputes xhat from x (kept by the caller) instead of reading a saved copy. One pass pair per row
// instead of a norm call, a multiply and an add over the whole tensor.
template <typename T>
void gate_norm_fwd(int64_t R, int64_t G, int64_t H, const T* x, const T* gamma, const T* bias, T eps, T* y,
                   T* mean, T* rstd, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < R; ++r) {
        const int64_t g = r % G;
        const T* gm = gamma + g * H;
        const T* xr = x + r * H;
        T* yr = y + r * H;
        const double mu = lane_sum<T>(H, [&](int64_t j) { return double(xr[j]); }) / double(H);
        const double v = lane_sum<T>(H, [&](int64_t j) {
            const double d = double(xr[j]) - mu;
            return d * d;
        });
        const T m = T(mu), rs = T(1.0 / std::sqrt(v / double(H) + double(eps)));
        mean[r] = m;
        rstd[r] = rs;
        if (bias) {
            const T* b = bias + g * H;
            NS_SIMD
            for (int64_t j = 0; j < H; ++j) {
                const T xh = (xr[j] - m) * rs;
                yr[j] = xh * gm[j] + b[j];
            }
        } else {
            NS_SIMD
            for (int64_t j = 0; j < H; ++j) {
                const T xh = (xr[j] - m) * rs;
                yr[j] = xh * gm[j];
            }
        }
    }
}

// xhat = (x - mean) * rstd per row, as the forward had it (for the gain gradients and the backward below).
template <typename T>
void gate_norm_xhat(int64_t R, int64_t H, const T* x, const T* mean, const T* rstd, T* xhat, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < R; ++r) {
        const T m = mean[r], rs = rstd[r];
        const T* xr = x + r * H;
        T* o = xhat + r * H;
        NS_SIMD
        for (int64_t j = 0; j < H; ++j) o[j] = (xr[j] - m) * rs;
    }
}

// Its backward: dx = normalize_bwd(dy * gamma[g]) per row (the parameter gradients by colsum); dx may alias xhat.
template <typename T>
void gate_norm_bwd(int64_t R, int64_t G, int64_t H, const T* dy, const T* gamma, const T* xhat, const T* rstd,
                   T* dx, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < R; ++r) {
        const T* gm = gamma + (r % G) * H;
        const T* d = dy + r * H;
        const T* xh = xhat + r * H;
        T* o = dx + r * H;
        const T a = T(lane_sum<T>(H, [&](int64_t j) { return double(d[j] * gm[j]); }) / double(H));
        const T b = T(lane_sum<T>(H, [&](int64_t j) { return double(d[j] * gm[j]) * double(xh[j]); }) / double(H));
        const T rs = rstd[r];
        NS_SIMD
        for (int64_t j = 0; j < H; ++j) o[j] = rs * (d[j] * gm[j] - a - xh[j] * b);
    }
}

// out[c] = sum over rows r (in order) of a[r, c] * b[r, c] (b null: a[r, c]), accumulated in double; out_a
// (not null, with b): also sum over r of a[r, c], from the same pass. The columns are cut into chunks of kChunk
// whose sums stay in registers while all rows stream by; threads take whole chunks. Every column is summed in
// row order by one thread, so the result does not depend on the number of threads.
constexpr int64_t kChunk = 32;

template <typename T, int64_t W, bool kFull, bool kB, bool kA>
inline void colsum_chunk(int64_t R, int64_t C, int64_t w, const T* a, const T* b, double* s, double* sa) {
    double acc[W] = {0}, acc_a[W] = {0};
    for (int64_t r = 0; r < R; ++r) {
        const T* ar = a + r * C;
        const T* br = kB ? b + r * C : nullptr;
        for (int64_t c = 0; c < W; ++c) {
            if (kFull || c < w) {
                const double v = double(ar[c]);
                acc[c] += kB ? v * double(br[c]) : v;
                if (kA) acc_a[c] += v;
            }
        }
    }
    for (int64_t c = 0; c < w; ++c) {
        s[c] = acc[c];
        if (kA) sa[c] = acc_a[c];
    }
}

template <typename T, bool kB, bool kA>
void colsum_impl(int64_t R, int64_t C, const T* a, const T* b, T* out, T* out_a, int threads) {
    const int64_t chunks = (C + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t q = 0; q < chunks; ++q) {
        const int64_t c0 = q * kChunk, w = std::min(kChunk, C - c0);
        double s[kChunk], sa[kChunk];
        if (w == kChunk)
            colsum_chunk<T, kChunk, true, kB, kA>(R, C, w, a + c0, kB ? b + c0 : nullptr, s, sa);
        else
            colsum_chunk<T, kChunk, false, kB, kA>(R, C, w, a + c0, kB ? b + c0 : nullptr, s, sa);
        for (int64_t c = 0; c < w; ++c) {
            out[c0 + c] = T(s[c]);
            if (kA) out_a[c0 + c] = T(sa[c]);
        }
    }
}

template <typename T>
void colsum(int64_t R, int64_t C, const T* a, const T* b, T* out, T* out_a, int threads) {
    if (!b)
        colsum_impl<T, false, false>(R, C, a, b, out, out_a, threads);
    else if (out_a)
        colsum_impl<T, true, true>(R, C, a, b, out, out_a, threads);
    else
        colsum_impl<T, true, false>(R, C, a, b, out, out_a, threads);
}

// Whole-sequence drivers: the time loop of one direction in C++ (one call per sequence and direction instead of
// a torch matmul and a kernel call per step). The recurrent matmul goes through the Fortran BLAS gemm whose
// address the caller passes (torch's own MKL sgemm_ / dgemm_, so no torch headers or link here). steps
// (nsteps x 3, int64): (row offset, running rows n, live rows k) in the order they run. Row-major tensors
// are column-major transposes: p^T (4H x k) = W_hh^T-as-stored ('T') times h^T.
template <typename T>
using gemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                         const int*, const T*, const int*, const T*, T*, const int*);

// The recurrent matmul of a thread's rows, y (R x M) = beta y + x (R x K) @ b with b (K x M) row-major: a few rows
// against a weight that stays in cache from step to step, where the BLAS spends as long packing the weight as
// multiplying (it copies it on every call). One 64-byte vector of output columns per accumulator, R rows at a
// time, the sum over K in order with fused multiply-adds: every row's result is the same whatever rows it is
// grouped with (the same bits for any number of threads).
template <typename T>
struct Vec64 {
    static constexpr int kLanes = 64 / int(sizeof(T));
    typedef T type __attribute__((vector_size(64)));
};

template <typename T>
inline typename Vec64<T>::type fma_vs(typename Vec64<T>::type acc, T a, typename Vec64<T>::type b) {
    typename Vec64<T>::type r;
    NS_SIMD
    for (int l = 0; l < Vec64<T>::kLanes; ++l) r[l] = std::fma(a, b[l], acc[l]);
    return r;
}

template <typename T, int R>
inline void gemm_rows(int64_t K, int64_t M, const T* x, int64_t ldx, const T* b, int64_t ldb, bool beta,
                      T* y, int64_t ldy) {
    using V = typename Vec64<T>::type;
    constexpr int L = Vec64<T>::kLanes;
    int64_t j = 0;
    for (; j + L <= M; j += L) {
        V acc[R];
        for (int r = 0; r < R; ++r) acc[r] = V{};
        for (int64_t q = 0; q < K; ++q) {
            V bv;
            std::memcpy(&bv, b + q * ldb + j, sizeof bv);
            for (int r = 0; r < R; ++r) acc[r] = fma_vs<T>(acc[r], x[r * ldx + q], bv);
        }
        for (int r = 0; r < R; ++r) {
            if (beta) {
                V yv;
                std::memcpy(&yv, y + r * ldy + j, sizeof yv);
                acc[r] += yv;
            }
            std::memcpy(y + r * ldy + j, &acc[r], sizeof acc[r]);
        }
    }
    for (; j < M; ++j)  // the last columns, fewer than a vector
        for (int r = 0; r < R; ++r) {
            T s = T(0);
            for (int64_t q = 0; q < K; ++q) s = std::fma(x[r * ldx + q], b[q * ldb + j], s);
            y[r * ldy + j] = beta ? y[r * ldy + j] + s : s;
        }
}

#ifdef __AVX512F__
constexpr int kGemmRows = 16;  // 32 vector registers: 16 accumulators and the weight vector
#else
constexpr int kGemmRows = 4;
#endif

// gemm_rows for R = n (1 <= n <= kGemmRows), chosen at run time.
template <typename T, int R = kGemmRows>
inline void gemm_rows_n(int n, int64_t K, int64_t M, const T* x, const T* b, bool beta, T* y) {
    if constexpr (R > 1) {
        if (n < R) return gemm_rows_n<T, R - 1>(n, K, M, x, b, beta, y);
    }
    gemm_rows<T, R>(K, M, x, K, b, M, beta, y, M);
}

template <typename T>
void gemm_small(int64_t k, int64_t K, int64_t M, const T* x, const T* b, bool beta, T* y) {
    // y (k x M) = beta y + x (k x K) @ b (K x M), all row-major and contiguous: rows in groups of kGemmRows
    // (one pass over b per group), the last group smaller.
    for (int64_t r = 0; r < k; r += kGemmRows)
        gemm_rows_n<T>(int(std::min<int64_t>(kGemmRows, k - r)), K, M, x + r * K, b, beta, y + r * M);
}

// w (rows x cols) row-major transposed into out (cols x rows), in tiles.
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* w, T* out) {
    constexpr int64_t kTile = 32;
    for (int64_t i0 = 0; i0 < rows; i0 += kTile)
        for (int64_t j0 = 0; j0 < cols; j0 += kTile)
            for (int64_t i = i0; i < std::min(rows, i0 + kTile); ++i)
                for (int64_t j = j0; j < std::min(cols, j0 + kTile); ++j) out[j * rows + i] = w[i * cols + j];
}

template <typename T>
inline void gemm_rm(gemm_fn<T> gemm, bool trans_w, int64_t k, int64_t M, int64_t K, const T* w, const T* x,
                    T beta, T* y) {
    // y (k, M) row-major = x (k, K) @ (trans_w ? w^T : w) with w stored (M, K) if trans_w else (K, M).
    const char ta = trans_w ? 'T' : 'N', tb = 'N';
    const int m = int(M), nn = int(k), kk = int(K), lda = trans_w ? int(K) : int(M), ldb = int(K), ldc = int(M);
    const T one = T(1);
    gemm(&ta, &tb, &m, &nn, &kk, &one, w, &lda, x, &ldb, &beta, y, &ldc);
}

// The threads of a time loop: each owns a fixed block of batch rows for the whole sequence. A row's recurrence
// (its matmul row, its norms, its state) never reads another row, so the threads run all steps without a
// barrier, each calling the single-threaded gemm on its own rows (inside the parallel region the BLAS does not
// start threads of its own). Rows are sorted longest first: at a step running n rows of which k are live, the
// block [lo, hi) runs rows [lo, min(hi, n)), the live ones [lo, max(lo, min(k, hi))). One thread when the whole
// sequence has fewer than par_min elements, or when a thread would get fewer than 2 rows.
inline int seq_threads(int threads, int64_t nsteps, const int64_t* steps, int64_t row_elems, int64_t par_min,
                       int64_t* rows) {
    int64_t B = 0;
    for (int64_t s = 0; s < nsteps; ++s) B = std::max(B, steps[3 * s + 1]);
    *rows = B;
    if (B * row_elems * nsteps < par_min) return 1;
    return int(std::max<int64_t>(1, std::min<int64_t>(threads, B / 2)));
}

// Whether the time loop's matmuls take gemm_small rather than the BLAS: while the weight, read once per group of
// kGemmRows rows at every step, stays in cache (measured on a 2-core AVX-512 CPU: 10-25% faster up to H = 256 at
// 16 rows a thread, about even at 32 rows with a 4 MiB weight, up to 37% slower at 64 rows with 16 MiB): at most
// 4 MiB of weight reads a step. NORMSCOPE_RNN_GEMM=blas (or =own) forces one.
inline bool own_gemm(int64_t nsteps, const int64_t* steps, int64_t row_elems, int threads, int64_t par_min,
                     int64_t weight_bytes) {
    const char* v = std::getenv("NORMSCOPE_RNN_GEMM");
    if (v && std::strcmp(v, "blas") == 0) return false;
    if (v && std::strcmp(v, "own") == 0) return true;
    int64_t B;
    const int nt = seq_threads(threads, nsteps, steps, row_elems, par_min, &B);
    const int64_t passes = ((B + nt - 1) / nt + kGemmRows - 1) / kGemmRows;
    return passes * weight_bytes <= (int64_t(4) << 20);
}

// The recurrent matmul of a time loop's steps, y (k x M) = beta y + x (k x K) @ (trans_w ? w^T : w), w stored
// (M, K) if trans_w else (K, M): through gemm_small (with w^T made once, for trans_w) or the BLAS, as own_gemm
// decides for the whole sequence.
template <typename T>
struct StepMatmul {
    StepMatmul(void* gemm_ptr, bool trans_w, int64_t K, int64_t M, const T* w, bool own)
        : gemm(reinterpret_cast<gemm_fn<T>>(gemm_ptr)), trans_w(trans_w), own(own), K(K), M(M), w(w),
          wt(own && trans_w ? K * M : 0) {
        if (own && trans_w) transpose(M, K, w, wt.data());
    }
    void operator()(int64_t k, const T* x, T beta, T* y) const {
        if (k == 0) return;
        if (own)
            gemm_small<T>(k, K, M, x, trans_w ? wt.data() : w, beta != T(0), y);
        else
            gemm_rm<T>(gemm, trans_w, k, M, K, w, x, beta, y);
    }
    gemm_fn<T> gemm;
    bool trans_w, own;
    int64_t K, M;
    const T* w;
    std::vector<T> wt;
};

struct Block {
    int64_t lo, n, k;  // first row, rows run, live rows (relative to lo)
};

inline bool block_of(int64_t B, int tid, int nth, int64_t n, int64_t k, Block* b) {
    const int64_t lo = B * tid / nth, hi = std::min(B * (tid + 1) / nth, n);
    if (hi <= lo) return false;
    *b = {lo, hi - lo, std::max(lo, std::min(k, hi)) - lo};
    return true;
}

// run(tid, nth) on nt threads; nt == 1: a plain call, no parallel region (even an inactive one would make the
// BLAS's own parallel regions nested ones, with threads started and stopped on every gemm call).
template <typename F>
inline void in_team(int nt, const F& run) {
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        run(omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    run(0, 1);
}

// The time loop of one direction: body(b, o) for every step (in order, or from the last with reverse) and every
// thread's block b of that step's rows, o the packed row offset of the block's first row; on the threads of
// seq_threads.
template <typename F>
inline void for_blocks(int64_t nsteps, const int64_t* steps, int64_t row_elems, int threads, int64_t par_min,
                       bool reverse, const F& body) {
    int64_t B;
    const int nt = seq_threads(threads, nsteps, steps, row_elems, par_min, &B);
    in_team(nt, [&](const int tid, const int nth) {
        for (int64_t i = 0; i < nsteps; ++i) {
            const int64_t s = reverse ? nsteps - 1 - i : i;
            Block b;
            if (block_of(B, tid, nth, steps[3 * s + 1], steps[3 * s + 2], &b)) body(b, steps[3 * s] + b.lo);
        }
    });
}

template <typename T>
void lstm_seq_fwd(int64_t nsteps, const int64_t* steps, int64_t H, void* gemm_ptr, const T* xg, const T* w_hh,
                  T* p, T* h, T* c, const T* g_hh, const T* g_c, const T* b_c, T eps, T* out, T* hprev, T* cprev,
                  T* xhat, T* rstd, T* gates, T* cn, T* rstd_c, T* th, int threads, int64_t par_min, int save) {
    const StepMatmul<T> mm(gemm_ptr, true, H, 4 * H, w_hh,
                           own_gemm(nsteps, steps, 4 * H, threads, par_min, 4 * H * H * int64_t(sizeof(T))));
    for_blocks(nsteps, steps, 4 * H, threads, par_min, false, [&](const Block& b, const int64_t o) {
        const int64_t lo = b.lo, v = save ? o : lo;  // not saved for a backward: one step's rows, overwritten
        mm(b.k, h + lo * H, T(0), p + lo * 4 * H);
        lstm_fwd<T>(b.n, b.k, H, xg + o * 4 * H, p + lo * 4 * H, h + lo * H, c + lo * H, g_hh, g_c, b_c, eps,
                    out + o * H, hprev + v * H, cprev + v * H, xhat + v * 4 * H, rstd + v * 4, gates + v * 4 * H,
                    cn + v * H, rstd_c + v, th + v * H, 1);
    });
}

template <typename T>
void lstm_seq_bwd(int64_t nsteps, const int64_t* steps, int64_t H, void* gemm_ptr, const T* w_hh, const T* dout,
                  T* dh, T* dc, const T* c_prev, const T* g_hh, const T* g_c, const T* xhat, const T* rstd,
                  const T* gates, const T* cn, const T* rstd_c, const T* th, T* dxg, T* dp, T* dy, int threads,
                  int64_t par_min) {
    const StepMatmul<T> mm(gemm_ptr, false, 4 * H, H, w_hh,
                           own_gemm(nsteps, steps, 4 * H, threads, par_min, 4 * H * H * int64_t(sizeof(T))));
    for_blocks(nsteps, steps, 4 * H, threads, par_min, true, [&](const Block& b, const int64_t o) {
        const int64_t lo = b.lo;
        lstm_bwd<T>(b.n, b.k, H, dout + o * H, dh + lo * H, dc + lo * H, c_prev + o * H, g_hh, g_c,
                    xhat + o * 4 * H, rstd + o * 4, gates + o * 4 * H, cn + o * H, rstd_c + o, th + o * H,
                    dxg + o * 4 * H, dp + o * 4 * H, dy + o * H, 1);
        mm(b.k, dp + o * 4 * H, T(0), dh + lo * H);
    });
}

template <typename T>
void gru_seq_fwd(int64_t nsteps, const int64_t* steps, int64_t H, void* gemm_ptr, const T* xg, const T* w_hh,
                 T* p, T* h, const T* g_hh, const T* b_hh, T eps, T* out, T* hprev, T* xhat, T* rstd, T* gates,
                 T* hn, int threads, int64_t par_min, int save) {
    const StepMatmul<T> mm(gemm_ptr, true, H, 3 * H, w_hh,
                           own_gemm(nsteps, steps, 3 * H, threads, par_min, 3 * H * H * int64_t(sizeof(T))));
    for_blocks(nsteps, steps, 3 * H, threads, par_min, false, [&](const Block& b, const int64_t o) {
        const int64_t lo = b.lo, v = save ? o : lo;  // as in lstm_seq_fwd
        mm(b.k, h + lo * H, T(0), p + lo * 3 * H);
        gru_fwd<T>(b.n, b.k, H, xg + o * 3 * H, p + lo * 3 * H, h + lo * H, g_hh, b_hh, eps, out + o * H,
                   hprev + v * H, xhat + v * 3 * H, rstd + v * 3, gates + v * 3 * H, hn + v * H, 1);
    });
}

template <typename T>
void gru_seq_bwd(int64_t nsteps, const int64_t* steps, int64_t H, void* gemm_ptr, const T* w_hh, const T* dout,
                 T* dh, const T* h_prev, const T* g_hh, const T* xhat, const T* rstd, const T* gates, const T* hn,
                 T* dxg, T* dhg, T* dp, int threads, int64_t par_min) {
    const StepMatmul<T> mm(gemm_ptr, false, 3 * H, H, w_hh,
                           own_gemm(nsteps, steps, 3 * H, threads, par_min, 3 * H * H * int64_t(sizeof(T))));
    for_blocks(nsteps, steps, 3 * H, threads, par_min, true, [&](const Block& b, const int64_t o) {
        const int64_t lo = b.lo;
        gru_bwd<T>(b.n, b.k, H, dout + o * H, dh + lo * H, h_prev + o * H, g_hh, xhat + o * 3 * H, rstd + o * 3,
                   gates + o * 3 * H, hn + o * H, dxg + o * 3 * H, dhg + o * 3 * H, dp + o * 3 * H, 1);
        mm(b.k, dp + o * 3 * H, T(1), dh + lo * H);
    });
}

}  // namespace

extern "C" {

int ns_rnn_abi_version() { return 7; }

#define NS_RNN_ENTRY(SFX, T)                                                                                      \
    void ns_lstm_fwd_##SFX(int64_t n, int64_t k, int64_t H, const T* xg, const T* p, T* h, T* c, const T* g_hh,  \
                           const T* g_c, const T* b_c, double eps, T* out, T* hprev, T* cprev, T* xhat, T* rstd,  \
                           T* gates, T* cn, T* rstd_c, T* th, int threads) {                                      \
        lstm_fwd<T>(n, k, H, xg, p, h, c, g_hh, g_c, b_c, T(eps), out, hprev, cprev, xhat, rstd, gates, cn,      \
                    rstd_c, th, threads);                                                                         \
    }                                                                                                             \
    void ns_lstm_bwd_##SFX(int64_t n, int64_t k, int64_t H, const T* dout, T* dh, T* dc, const T* c_prev,        \
                           const T* g_hh, const T* g_c, const T* xhat, const T* rstd, const T* gates, const T* cn, \
                           const T* rstd_c, const T* th, T* dxg, T* dp, T* dy, int threads) {                     \
        lstm_bwd<T>(n, k, H, dout, dh, dc, c_prev, g_hh, g_c, xhat, rstd, gates, cn, rstd_c, th, dxg, dp, dy,    \
                    threads);                                                                                     \
    }                                                                                                             \
    void ns_gru_fwd_##SFX(int64_t n, int64_t k, int64_t H, const T* xg, const T* p, T* h, const T* g_hh,         \
                          const T* b_hh, double eps, T* out, T* hprev, T* xhat, T* rstd, T* gates, T* hn,         \
                          int threads) {                                                                          \
        gru_fwd<T>(n, k, H, xg, p, h, g_hh, b_hh, T(eps), out, hprev, xhat, rstd, gates, hn, threads);           \
    }                                                                                                             \
    void ns_gru_bwd_##SFX(int64_t n, int64_t k, int64_t H, const T* dout, T* dh, const T* h_prev,                \
                          const T* g_hh, const T* xhat, const T* rstd, const T* gates, const T* hn, T* dxg,       \
                          T* dhg, T* dp, int threads) {                                                           \
        gru_bwd<T>(n, k, H, dout, dh, h_prev, g_hh, xhat, rstd, gates, hn, dxg, dhg, dp, threads);               \
    }                                                                                                             \
    void ns_gate_norm_fwd_##SFX(int64_t R, int64_t G, int64_t H, const T* x, const T* gamma, const T* bias,      \
                                double eps, T* y, T* mean, T* rstd, int threads) {                                \
        gate_norm_fwd<T>(R, G, H, x, gamma, bias, T(eps), y, mean, rstd, threads);                                \
    }                                                                                                             \
    void ns_gate_norm_xhat_##SFX(int64_t R, int64_t H, const T* x, const T* mean, const T* rstd, T* xhat,        \
                                 int threads) {                                                                   \
        gate_norm_xhat<T>(R, H, x, mean, rstd, xhat, threads);                                                    \
    }                                                                                                             \
    void ns_gate_norm_bwd_##SFX(int64_t R, int64_t G, int64_t H, const T* dy, const T* gamma, const T* xhat,     \
                                const T* rstd, T* dx, int threads) {                                              \
        gate_norm_bwd<T>(R, G, H, dy, gamma, xhat, rstd, dx, threads);                                            \
    }                                                                                                             \
    void ns_rnn_colsum_##SFX(int64_t R, int64_t C, const T* a, const T* b, T* out, T* out_a, int threads) {       \
        colsum<T>(R, C, a, b, out, out_a, threads);                                                               \
    }                                                                                                             \
    void ns_lstm_seq_fwd_##SFX(int64_t ns, const int64_t* st, int64_t H, void* gemm, const T* xg, const T* w,    \
                               T* p, T* h, T* c, const T* g_hh, const T* g_c, const T* b_c, double eps, T* out,   \
                               T* hprev, T* cprev, T* xhat, T* rstd, T* gates, T* cn, T* rstd_c, T* th,           \
                               int threads, int64_t par_min, int save) {                                          \
        lstm_seq_fwd<T>(ns, st, H, gemm, xg, w, p, h, c, g_hh, g_c, b_c, T(eps), out, hprev, cprev, xhat, rstd,  \
                        gates, cn, rstd_c, th, threads, par_min, save);                                           \
    }                                                                                                             \
    void ns_lstm_seq_bwd_##SFX(int64_t ns, const int64_t* st, int64_t H, void* gemm, const T* w, const T* dout,  \
                               T* dh, T* dc, const T* c_prev, const T* g_hh, const T* g_c, const T* xhat,         \
                               const T* rstd, const T* gates, const T* cn, const T* rstd_c, const T* th, T* dxg,  \
                               T* dp, T* dy, int threads, int64_t par_min) {                                      \
        lstm_seq_bwd<T>(ns, st, H, gemm, w, dout, dh, dc, c_prev, g_hh, g_c, xhat, rstd, gates, cn, rstd_c, th,  \
                        dxg, dp, dy, threads, par_min);                                                           \
    }                                                                                                             \
    void ns_gru_seq_fwd_##SFX(int64_t ns, const int64_t* st, int64_t H, void* gemm, const T* xg, const T* w,     \
                              T* p, T* h, const T* g_hh, const T* b_hh, double eps, T* out, T* hprev, T* xhat,    \
                              T* rstd, T* gates, T* hn, int threads, int64_t par_min, int save) {                 \
        gru_seq_fwd<T>(ns, st, H, gemm, xg, w, p, h, g_hh, b_hh, T(eps), out, hprev, xhat, rstd, gates, hn,      \
                       threads, par_min, save);                                                                   \
    }                                                                                                             \
    void ns_gru_seq_bwd_##SFX(int64_t ns, const int64_t* st, int64_t H, void* gemm, const T* w, const T* dout,   \
                              T* dh, const T* h_prev, const T* g_hh, const T* xhat, const T* rstd,                \
                              const T* gates, const T* hn, T* dxg, T* dhg, T* dp, int threads, int64_t par_min) { \
        gru_seq_bwd<T>(ns, st, H, gemm, w, dout, dh, h_prev, g_hh, xhat, rstd, gates, hn, dxg, dhg, dp, threads, \
                       par_min);                                                                                  \
    }

NS_RNN_ENTRY(f32, float)
NS_RNN_ENTRY(f64, double)

}  // extern "C"
