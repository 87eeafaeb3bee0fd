// Skinny matrix products for the decode step: y[m, n] = sum_k x[m, k] * W[n, k].
//
// At decode time m (batch rows) is small and the cost is reading W from memory once.
// MKL's sgemm reaches ~11 GB/s on these shapes on the 2-core CI machine (DRAM ~25 GB/s);
// here every row of W is streamed once and dotted with all m inputs while it is in
// registers/L1, rows split across OpenMP threads.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "attention_core.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

constexpr int kMaxRows = 8;  // inputs handled per pass over W
// With this many inputs or more, each row of W prefetches the next one into L1 as it goes (a line per 16
// float32 / 32 bfloat16 weights). At 8 inputs a row takes long enough in the FMAs that the hardware prefetcher
// alone leaves the next row's lines late; at 1-2 the stream runs at DRAM speed without help and the extra
// instruction only costs (a standalone copy of this loop, two threads, weights from DRAM, time without / with:
// 3072x576 1.30 at 8 inputs, 0.99 at 4; 576x1536 1.25 and 1.17; 49152x576 1.39 and 1.04; 0.92-1.07 at 1-2).
// SmolLM2 decoding, `python -m modegpt_rt.bench.prefetch_ab` (bench/results/prefetch_ab_dense.json): float32
// batch 8 1.17x, batch 4 1.05x, batch 1 1.00x. Settable at run time (`set_prefetch_from`) for that A/B.
int g_prefetch_from = 4;
// Products of 8 inputs with float32 weights and at least g_rows3_min_k inputs per row (8 input rows of 32 KB
// or more: L1's size) use rows_block3, three weight rows at a time. Where it pays, one-row -> three-row
// kernel through cpu_linear.linear, two threads, weights from DRAM (`python -m modegpt_rt.bench.rows3_shapes`,
// bench/results/rows3_shapes.json): the down projections with long rows gain (576 x 1536 about 1.5x), rows of
// 576, whose inputs stay in L1, do not. Settable at run time (`set_rows3_min_k`; 0 = always, 1 << 30 =
// never) for the benches.
int64_t g_rows3_min_k = 1024;

// Weights are float32, or bfloat16 (the upper half of a float32: a 16-bit shift widens it exactly).
// bfloat16 weights halve the bytes a decode step reads; inputs, accumulators and outputs stay float32.
struct bf16 {
  std::uint16_t bits;
};
inline float to_float(float w) { return w; }
inline float to_float(bf16 w) {
  const std::uint32_t u = static_cast<std::uint32_t>(w.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// fn(n0, n1) over the N output rows in chunks of 16, split statically across the OpenMP threads (each
// thread one contiguous range of W) when the product is large enough to be worth a parallel region.
template <typename Fn>
void over_row_chunks(int64_t N, int64_t K, Fn&& fn) {
  const int64_t chunk = 16;
  const int64_t items = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (N * K > 32768)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t n0 = it * chunk, n1 = (n0 + chunk < N) ? n0 + chunk : N;
    fn(n0, n1);
  }
}

#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16_masked(const float* w, __mmask16 m) { return _mm512_maskz_loadu_ps(m, w); }

// One row of W at a time, in memory order, against M (<= 8) inputs. Reading W as a single
// sequential stream per thread is what lets the hardware prefetcher run at full DRAM speed:
// interleaving two or four rows (short streams 4*K bytes apart) measured ~12 GB/s per core on
// the CI machine, one row at a time ~30 GB/s. U accumulators per input hide the FMA latency.
template <int M, typename Wt, bool prefetch>
void rows_block(const float* x, int64_t K, const Wt* W, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int U = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  constexpr int64_t step = 16 * U;
  const int64_t kmain = K - K % step;
  const int64_t kfull = K & ~int64_t(15);
  const __mmask16 tail = (__mmask16)((1u << (K - kfull)) - 1u);
  for (int64_t n = n0; n < n1; ++n) {
    const Wt* w = W + n * K;
    __m512 acc[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kmain; k += step) {
      for (int u = 0; u < U; ++u) {
        if constexpr (prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + K + k + 16 * u), _MM_HINT_T0);
        const __m512 wv = load16(w + k + 16 * u);
        for (int m = 0; m < M; ++m) acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + 16 * u), acc[m][u]);
      }
    }
    for (int64_t k = kmain; k < kfull; k += 16) {
      const __m512 wv = load16(w + k);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
    }
    if (tail) {
      const __m512 wv = load16_masked(w + kfull, tail);
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, x + m * K + kfull), acc[m][0]);
    }
    for (int m = 0; m < M; ++m) {
      __m512 s = acc[m][0];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[m][u]);
      y[m * ldy + n] = hsum(s);
    }
  }
}

// float32 weights, three rows of W at a time against M inputs: each input vector is loaded once for three
// rows, not three times. At 8 inputs of a long row the one-row kernel is bound by those loads, not by memory
// (the inputs of a K = 1536 down projection, 48 KB, do not fit L1): see g_rows3_min_k for where it pays. Per
// output the sum runs in the same order as rows_block<M, float, prefetch> with U = 1 (16 at a time, then the
// masked tail), so the results are bit for bit the same. Rows left over after the triples go through rows_block.
template <int M, bool prefetch>
void rows_block3(const float* x, int64_t K, const float* W, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int R = 3;
  const int64_t kfull = K & ~int64_t(15);
  const __mmask16 tail = (__mmask16)((1u << (K - kfull)) - 1u);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    const float* w = W + n * K;
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kfull; k += 16) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r) {
        if constexpr (prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * K + k), _MM_HINT_T0);
        wv[r] = load16(w + r * K + k);
      }
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
      }
    }
    if (tail) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load16_masked(w + r * K + kfull, tail);
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * K + kfull);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[m * ldy + n + r] = hsum(acc[m][r]);
  }
  if (n < n1) rows_block<M, float, prefetch>(x, K, W, y, ldy, n, n1);
}

// bfloat16 weights, 32 at a time: one 64-byte load holds 16 (even, odd) pairs; a 16-bit shift widens the even
// ones, masking the low half the odd ones (exactly). The inputs come de-interleaved to match (`xe`: per block of
// 32, the 16 even-indexed values then the 16 odd-indexed ones, zero-padded to Kp, a multiple of 32), so a
// weight costs half an integer op instead of a 16-to-32-bit widening and a shift. With the widening, one core
// streamed bfloat16 rows at 16.6 GB/s against 23.9 for float32 rows (LM-head shape, in cache); in pairs it
// keeps up with memory: `python -m modegpt_rt.bench.skinny_linear --shape 49152x576 --rows 1` gave 24.9 GB/s
// against 21.0 on one thread, 30.4 against 28.1 on two (bench/results/skinny_linear_bf16_lmhead.json).
template <int M, bool prefetch>
void rows_block_bf16(const float* xe, int64_t Kp, int64_t K, const bf16* W, float* y, int64_t ldy, int64_t n0,
                     int64_t n1) {
  constexpr int U = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t kfull = K & ~int64_t(31), kmain = K - K % (32 * U);
  const __m512i odd_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t n = n0; n < n1; ++n) {
    const bf16* w = W + n * K;
    __m512 acc[M][2 * U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < 2 * U; ++u) acc[m][u] = _mm512_setzero_ps();
    auto block = [&](const void* src, int64_t k, int u) {
      const __m512i v = _mm512_loadu_si512(src);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, odd_mask));
      for (int m = 0; m < M; ++m) {
        acc[m][2 * u] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xe + m * Kp + k), acc[m][2 * u]);
        acc[m][2 * u + 1] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xe + m * Kp + k + 16), acc[m][2 * u + 1]);
      }
    };
    int64_t k = 0;
    for (; k < kmain; k += 32 * U)
      for (int u = 0; u < U; ++u) {
        if constexpr (prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + K + k + 32 * u), _MM_HINT_T0);
        block(w + k + 32 * u, k + 32 * u, u);
      }
    for (; k < kfull; k += 32) block(w + k, k, 0);
    if (k < K) {
      alignas(64) bf16 tail[32] = {};
      std::memcpy(tail, w + k, sizeof(bf16) * (K - k));
      block(tail, k, 0);
    }
    for (int m = 0; m < M; ++m) {
      __m512 s = acc[m][0];
      for (int u = 1; u < 2 * U; ++u) s = _mm512_add_ps(s, acc[m][u]);
      y[m * ldy + n] = hsum(s);
    }
  }
}

using BlockBf16Fn = void (*)(const float*, int64_t, int64_t, const bf16*, float*, int64_t, int64_t, int64_t);
template <bool PF>
constexpr BlockBf16Fn kBlocksBf16[kMaxRows + 1] = {
    nullptr,                   rows_block_bf16<1, PF>, rows_block_bf16<2, PF>, rows_block_bf16<3, PF>,
    rows_block_bf16<4, PF>, rows_block_bf16<5, PF>, rows_block_bf16<6, PF>, rows_block_bf16<7, PF>,
    rows_block_bf16<8, PF>};

// y[M, N] = x[M, K] W[N, K]^T for bfloat16 W (see rows_block_bf16).
void gemv_bf16(const float* x, const bf16* W, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t Kp = (K + 31) / 32 * 32;
  thread_local std::vector<float> xe;  // reused across calls: this runs ~120 times a decode step
  xe.assign(std::min<int64_t>(M, kMaxRows) * Kp, 0.f);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t mb = (M - m0 < kMaxRows) ? (M - m0) : kMaxRows;
    for (int64_t m = 0; m < mb; ++m)
      for (int64_t k = 0; k < K; ++k) xe[m * Kp + (k & ~int64_t(31)) + (k & 1) * 16 + (k & 31) / 2] = x[(m0 + m) * K + k];
    const BlockBf16Fn fn = mb >= g_prefetch_from ? kBlocksBf16<true>[mb] : kBlocksBf16<false>[mb];
    const float* xb = xe.data();
    float* yb = y + m0 * N;
    over_row_chunks(N, K, [&](int64_t n0, int64_t n1) { fn(xb, Kp, K, W, yb, N, n0, n1); });
  }
}
#else
template <int M, typename Wt, bool prefetch>
void rows_block(const float* x, int64_t K, const Wt* W, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const Wt* w = W + n * K;
    float acc[M] = {};
    for (int m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += to_float(w[k]) * xm[k];
      acc[m] = s;
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = acc[m];
  }
}
#endif

template <typename Wt>
using BlockFn = void (*)(const float*, int64_t, const Wt*, float*, int64_t, int64_t, int64_t);
template <typename Wt, bool PF>
constexpr BlockFn<Wt> kBlocks[kMaxRows + 1] = {
    nullptr,                   rows_block<1, Wt, PF>, rows_block<2, Wt, PF>, rows_block<3, Wt, PF>,
    rows_block<4, Wt, PF>, rows_block<5, Wt, PF>, rows_block<6, Wt, PF>, rows_block<7, Wt, PF>,
    rows_block<8, Wt, PF>};

// y[M, N] = x[M, K] W[N, K]^T (all contiguous).
template <typename Wt>
void gemv(const float* x, const Wt* W, float* y, int64_t M, int64_t K, int64_t N) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Wt, bf16>) {
    gemv_bf16(x, W, y, M, K, N);
  } else
#endif
  {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int64_t mb = (M - m0 < kMaxRows) ? (M - m0) : kMaxRows;
      const bool pf = mb >= g_prefetch_from;
      BlockFn<Wt> fn = pf ? kBlocks<Wt, true>[mb] : kBlocks<Wt, false>[mb];
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<Wt, float>) {  // the prefetch switch holds for the three-row blocks too
        if (mb == kMaxRows && K >= g_rows3_min_k) fn = pf ? rows_block3<kMaxRows, true> : rows_block3<kMaxRows, false>;
      }
#endif
      const float* xb = x + m0 * K;
      float* yb = y + m0 * N;
      over_row_chunks(N, K, [&](int64_t n0, int64_t n1) { fn(xb, K, W, yb, N, n0, n1); });
    }
  }
}

// W points to float32 or (bf16_weights) bfloat16 rows.
void gemv_any(const float* x, const void* W, bool bf16_weights, float* y, int64_t M, int64_t K, int64_t N) {
  if (bf16_weights)
    gemv(x, static_cast<const bf16*>(W), y, M, K, N);
  else
    gemv(x, static_cast<const float*>(W), y, M, K, N);
}

void linear(std::uintptr_t x_ptr, std::uintptr_t w_ptr, std::uintptr_t y_ptr, int64_t M, int64_t K, int64_t N,
            bool bf16_weights) {
  if (M < 1 || K < 1 || N < 1) throw std::invalid_argument("linear: empty shape");
  py::gil_scoped_release nogil;
  gemv_any(reinterpret_cast<const float*>(x_ptr), reinterpret_cast<const void*>(w_ptr), bf16_weights,
           reinterpret_cast<float*>(y_ptr), M, K, N);
}

// out[r] = h[r] * rsqrt(mean(h[r]^2) + eps) * w; with `delta`, first h[r] += delta[r] (residual add).
void add_rms_norm_rows(float* h, const float* delta, const float* w, float* out, int64_t rows, int64_t dim,
                       double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float* hr = h + r * dim;
    if (delta) {
      const float* dr = delta + r * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) hr[i] += dr[i];
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; ++i) ss += hr[i] * hr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + static_cast<float>(eps));
    float* o = out + r * dim;
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) o[i] = w[i] * (hr[i] * inv);
  }
}

void add_rms_norm(std::uintptr_t h_ptr, std::uintptr_t delta_ptr, std::uintptr_t w_ptr, std::uintptr_t out_ptr,
                  int64_t rows, int64_t dim, double eps) {
  py::gil_scoped_release nogil;
  add_rms_norm_rows(reinterpret_cast<float*>(h_ptr), reinterpret_cast<const float*>(delta_ptr),
                    reinterpret_cast<const float*>(w_ptr), reinterpret_cast<float*>(out_ptr), rows, dim, eps);
}

// out[r, :k] = silu(gu[r, :k]) * gu[r, k:2k]
void silu_mul_rows(const float* gu, float* out, int64_t rows, int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gu + r * 2 * k;
    const float* u = g + k;
    float* o = out + r * k;
    for (int64_t i = 0; i < k; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void silu_mul(std::uintptr_t gu_ptr, std::uintptr_t out_ptr, int64_t rows, int64_t k) {
  py::gil_scoped_release nogil;
  silu_mul_rows(reinterpret_cast<const float*>(gu_ptr), reinterpret_cast<float*>(out_ptr), rows, k);
}

// ---- the whole decode step in one call ----------------------------------------------------------
// Every layer of a float32 model for a few new tokens per sequence: RMSNorm, fused q|k|v product,
// RoPE + cache append + attention (attention_core.h), output product with the residual add,
// RMSNorm, gate|up product, SiLU·up, down product with the residual add. The Python side builds
// a plan of raw pointers once per (model, cache) and keeps the tensors alive; a step is then one
// call instead of ~10 per layer, which is what batch-1 decoding spent its time between.

struct LayerPlan {
  const float *attn_norm;
  const void *wqkv, *wo;  // float32 or bfloat16 (DecodePlan's weights_bf16)
  const float* mlp_norm;
  const void *w_gate_up, *w_down;
  float *k_cache, *v_cache;
  const std::int32_t* freq_idx;
  int64_t d_qk, d_v, k_mlp;
};

class DecodePlan {
 public:
  DecodePlan(const std::vector<std::vector<std::uintptr_t>>& ptrs, const std::vector<std::vector<int64_t>>& widths,
             std::uintptr_t final_norm, std::uintptr_t cos, std::uintptr_t sin, int64_t batch, int64_t hidden,
             int64_t heads, int64_t kv_heads, int64_t capacity, int64_t positions, int64_t rot, double eps, double scale,
             bool weights_bf16)
      : final_norm_(reinterpret_cast<const float*>(final_norm)),
        cos_(reinterpret_cast<const float*>(cos)),
        sin_(reinterpret_cast<const float*>(sin)),
        B_(batch), d_(hidden), H_(heads), H_kv_(kv_heads), S_(capacity), P_(positions), R_(rot), eps_(eps),
        scale_(static_cast<float>(scale)), bf16_(weights_bf16) {
    if (ptrs.size() != widths.size()) throw std::invalid_argument("DecodePlan: one pointer list and one width list per layer");
    if (H_kv_ < 1 || H_ % H_kv_ != 0) throw std::invalid_argument("DecodePlan: heads must be a multiple of kv_heads");
    for (size_t i = 0; i < ptrs.size(); ++i) {
      const auto& p = ptrs[i];
      const auto& w = widths[i];
      if (p.size() != 9 || w.size() != 3) throw std::invalid_argument("DecodePlan: a layer needs 9 pointers and 3 widths");
      if (w[0] < 2 || w[0] % 2 || w[1] < 1 || w[2] < 1) throw std::invalid_argument("DecodePlan: bad layer widths");
      LayerPlan l{reinterpret_cast<const float*>(p[0]), reinterpret_cast<const void*>(p[1]),
                  reinterpret_cast<const void*>(p[2]),  reinterpret_cast<const float*>(p[3]),
                  reinterpret_cast<const void*>(p[4]),  reinterpret_cast<const void*>(p[5]),
                  reinterpret_cast<float*>(p[6]),       reinterpret_cast<float*>(p[7]),
                  reinterpret_cast<const std::int32_t*>(p[8]), w[0], w[1], w[2]};
      layers_.push_back(l);
      max_qkv_ = std::max(max_qkv_, H_ * w[0] + H_kv_ * (w[0] + w[1]));
      max_attn_ = std::max(max_attn_, H_ * w[1]);
      max_k_ = std::max(max_k_, w[2]);
    }
  }

  // h [B, T, d]: embeddings of the new tokens, used as the residual stream (overwritten);
  // out [B, T, d]: final-normed hidden states. cache_lens / new_lens [B] int32 (not updated here).
  void step(std::uintptr_t h_ptr, std::uintptr_t out_ptr, std::uintptr_t cache_lens_ptr, std::uintptr_t new_lens_ptr,
            int64_t T) {
    if (T < 1) throw std::invalid_argument("DecodePlan.step: no new tokens");
    float* h = reinterpret_cast<float*>(h_ptr);
    float* out = reinterpret_cast<float*>(out_ptr);
    const auto* cache_lens = reinterpret_cast<const std::int32_t*>(cache_lens_ptr);
    const auto* new_lens = reinterpret_cast<const std::int32_t*>(new_lens_ptr);
    const int64_t M = B_ * T;
    for (int64_t b = 0; b < B_; ++b)
      if (new_lens[b] < 0 || new_lens[b] > T || cache_lens[b] < 0 || cache_lens[b] + new_lens[b] > S_ ||
          cache_lens[b] + new_lens[b] > P_)
        throw std::invalid_argument("DecodePlan.step: cache lengths out of range");
    py::gil_scoped_release nogil;
    qkv_.resize(M * max_qkv_);
    q_.resize(M * max_qkv_);
    attn_.resize(M * max_attn_);
    x_.resize(M * d_);
    delta_.resize(M * d_);
    gu_.resize(M * 2 * max_k_);
    act_.resize(M * max_k_);
    float* x = x_.data();
    add_rms_norm_rows(h, nullptr, layers_.empty() ? final_norm_ : layers_[0].attn_norm, x, M, d_, eps_);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerPlan& l = layers_[i];
      const int64_t nq = H_ * l.d_qk, nk = H_kv_ * l.d_qk, nv = H_kv_ * l.d_v, n = nq + nk + nv;
      gemv_any(x, l.wqkv, bf16_, qkv_.data(), M, d_, n);
      // split the fused rows into contiguous q [M, nq], k [M, nk], v [M, nv]
      float* q = q_.data();
      float* k = q + M * nq;
      float* v = k + M * nk;
      for (int64_t r = 0; r < M; ++r) {
        const float* src = qkv_.data() + r * n;
        std::memcpy(q + r * nq, src, sizeof(float) * nq);
        std::memcpy(k + r * nk, src + nq, sizeof(float) * nk);
        std::memcpy(v + r * nv, src + nq + nk, sizeof(float) * nv);
      }
      Problem<float> pb{};
      pb.q = q;
      pb.k = k;
      pb.v = v;
      pb.k_cache = l.k_cache;
      pb.v_cache = l.v_cache;
      pb.cos = cos_;
      pb.sin = sin_;
      pb.freq_idx = l.freq_idx;
      pb.cache_lens = cache_lens;
      pb.new_lens = new_lens;
      pb.out = attn_.data();
      pb.scale = scale_;
      pb.B = B_;
      pb.T_ = T;
      pb.H = H_;
      pb.H_kv = H_kv_;
      pb.G = H_ / H_kv_;
      pb.d_qk = l.d_qk;
      pb.half = l.d_qk / 2;
      pb.d_v = l.d_v;
      pb.S = S_;
      pb.P = P_;
      pb.R = R_;
      run(pb);
      gemv_any(attn_.data(), l.wo, bf16_, delta_.data(), M, H_ * l.d_v, d_);
      add_rms_norm_rows(h, delta_.data(), l.mlp_norm, x, M, d_, eps_);
      gemv_any(x, l.w_gate_up, bf16_, gu_.data(), M, d_, 2 * l.k_mlp);
      silu_mul_rows(gu_.data(), act_.data(), M, l.k_mlp);
      gemv_any(act_.data(), l.w_down, bf16_, delta_.data(), M, l.k_mlp, d_);
      const float* next_norm = i + 1 < layers_.size() ? layers_[i + 1].attn_norm : final_norm_;
      add_rms_norm_rows(h, delta_.data(), next_norm, i + 1 < layers_.size() ? x : out, M, d_, eps_);
    }
    if (layers_.empty()) std::memcpy(out, x, sizeof(float) * M * d_);
  }

  int64_t batch() const { return B_; }
  bool weights_bf16() const { return bf16_; }

 private:
  std::vector<LayerPlan> layers_;
  const float *final_norm_, *cos_, *sin_;
  int64_t B_, d_, H_, H_kv_, S_, P_, R_;
  double eps_;
  float scale_;
  bool bf16_;
  int64_t max_qkv_ = 0, max_attn_ = 0, max_k_ = 0;
  std::vector<float> qkv_, q_, attn_, x_, delta_, gu_, act_;
};

}  // namespace

PYBIND11_MODULE(_cpu_linear, m) {
  m.doc() = "skinny matrix products y = x W^T for the decode step (raw pointers, contiguous rows)";
  m.def("linear", &linear,
        "y[M, N] = x[M, K] @ W[N, K]^T; contiguous float32 x and y, W float32 or (bf16_weights) bfloat16",
        py::arg("x_ptr"), py::arg("w_ptr"), py::arg("y_ptr"), py::arg("M"), py::arg("K"), py::arg("N"),
        py::arg("bf16_weights") = false);
  m.def(
      "set_prefetch_from", [](int rows) { g_prefetch_from = rows; },
      "products with at least this many input rows prefetch the next weight row (default 4; 9 = never)",
      py::arg("rows"));
  m.def("get_prefetch_from", [] { return g_prefetch_from; });
  m.def(
      "set_rows3_min_k", [](int64_t k) { g_rows3_min_k = k; },
      "products of 8 inputs with float32 weights and rows of at least k read three weight rows at a time "
      "(default 1024; 0 = always, 1 << 30 = never)",
      py::arg("k"));
  m.def("get_rows3_min_k", [] { return g_rows3_min_k; });
  m.def("add_rms_norm", &add_rms_norm, "h += delta (if delta_ptr != 0); out = RMSNorm(h) * w (float32 rows)");
  m.def("silu_mul", &silu_mul, "out = silu(gu[:, :k]) * gu[:, k:] (float32 rows)");
  py::class_<DecodePlan>(m, "DecodePlan", "all layers of a float32 decode step in one call (raw pointers; weights float32 or bfloat16)")
      .def(py::init<const std::vector<std::vector<std::uintptr_t>>&, const std::vector<std::vector<int64_t>>&,
                    std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int64_t, double, double, bool>(),
           py::arg("layer_ptrs"), py::arg("layer_widths"), py::arg("final_norm"), py::arg("cos"), py::arg("sin"),
           py::arg("batch"), py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("capacity"),
           py::arg("positions"), py::arg("rot"), py::arg("eps"), py::arg("scale"), py::arg("weights_bf16") = false)
      .def("step", &DecodePlan::step, py::arg("h_ptr"), py::arg("out_ptr"), py::arg("cache_lens_ptr"),
           py::arg("new_lens_ptr"), py::arg("T"))
      .def_property_readonly("batch", &DecodePlan::batch)
      .def_property_readonly("weights_bf16", &DecodePlan::weights_bf16);
}
