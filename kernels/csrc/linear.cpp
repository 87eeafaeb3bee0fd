// Skinny matrix products for the decode step: y[m, n] = sum_k x[m, k] * W[n, k].
//
// At decode time m (batch rows) is small and the cost is reading W from memory once.
// MKL's sgemm reaches ~11 GB/s on these shapes on the 2-core CI machine (DRAM ~25 GB/s);
// here every row of W is streamed once and dotted with all m inputs while it is in
// registers/L1, rows split across OpenMP threads.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

constexpr int kMaxRows = 8;  // inputs handled per pass over W

#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// Two rows of W at a time against M (<= 8) inputs: 2*M independent accumulators.
template <int M>
void rows_block(const float* x, int64_t K, const float* W, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t kfull = K & ~int64_t(15);
  const __mmask16 tail = (__mmask16)((1u << (K - kfull)) - 1u);
  int64_t n = n0;
  for (; n + 1 < n1; n += 2) {
    const float* w0 = W + n * K;
    const float* w1 = w0 + K;
    __m512 a0[M], a1[M];
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kfull; k += 16) {
      _mm_prefetch((const char*)(w0 + k + 4 * K), _MM_HINT_T0);
      _mm_prefetch((const char*)(w1 + k + 4 * K), _MM_HINT_T0);
      const __m512 v0 = _mm512_loadu_ps(w0 + k), v1 = _mm512_loadu_ps(w1 + k);
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + k);
        a0[m] = _mm512_fmadd_ps(v0, xv, a0[m]);
        a1[m] = _mm512_fmadd_ps(v1, xv, a1[m]);
      }
    }
    if (tail) {
      const __m512 v0 = _mm512_maskz_loadu_ps(tail, w0 + kfull), v1 = _mm512_maskz_loadu_ps(tail, w1 + kfull);
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * K + kfull);
        a0[m] = _mm512_fmadd_ps(v0, xv, a0[m]);
        a1[m] = _mm512_fmadd_ps(v1, xv, a1[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      y[m * ldy + n] = hsum(a0[m]);
      y[m * ldy + n + 1] = hsum(a1[m]);
    }
  }
  for (; n < n1; ++n) {
    const float* w0 = W + n * K;
    __m512 a0[M];
    for (int m = 0; m < M; ++m) a0[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kfull; k += 16) {
      const __m512 v0 = _mm512_loadu_ps(w0 + k);
      for (int m = 0; m < M; ++m) a0[m] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + m * K + k), a0[m]);
    }
    if (tail) {
      const __m512 v0 = _mm512_maskz_loadu_ps(tail, w0 + kfull);
      for (int m = 0; m < M; ++m)
        a0[m] = _mm512_fmadd_ps(v0, _mm512_maskz_loadu_ps(tail, x + m * K + kfull), a0[m]);
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = hsum(a0[m]);
  }
}
#else
template <int M>
void rows_block(const float* x, int64_t K, const float* W, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = W + n * K;
    float acc[M] = {};
    for (int m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += w[k] * xm[k];
      acc[m] = s;
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = acc[m];
  }
}
#endif

using BlockFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, int64_t);
constexpr BlockFn kBlocks[kMaxRows + 1] = {nullptr,         rows_block<1>, rows_block<2>, rows_block<3>, rows_block<4>,
                                           rows_block<5>, rows_block<6>, rows_block<7>, rows_block<8>};

void linear(std::uintptr_t x_ptr, std::uintptr_t w_ptr, std::uintptr_t y_ptr, int64_t M, int64_t K, int64_t N) {
  if (M < 1 || K < 1 || N < 1) throw std::invalid_argument("linear: empty shape");
  const float* x = reinterpret_cast<const float*>(x_ptr);
  const float* W = reinterpret_cast<const float*>(w_ptr);
  float* y = reinterpret_cast<float*>(y_ptr);
  py::gil_scoped_release nogil;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t mb = (M - m0 < kMaxRows) ? (M - m0) : kMaxRows;
    const BlockFn fn = kBlocks[mb];
    const float* xb = x + m0 * K;
    float* yb = y + m0 * N;
    const int64_t chunk = 16;  // rows per work item (even: keeps the 2-row pairing)
    const int64_t items = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (N * K > 32768)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n0 = it * chunk, n1 = (n0 + chunk < N) ? n0 + chunk : N;
      fn(xb, K, W, yb, N, n0, n1);
    }
  }
}

// out[r] = h[r] * rsqrt(mean(h[r]^2) + eps) * w; with `delta`, first h[r] += delta[r] (residual add).
void add_rms_norm(std::uintptr_t h_ptr, std::uintptr_t delta_ptr, std::uintptr_t w_ptr, std::uintptr_t out_ptr,
                  int64_t rows, int64_t dim, double eps) {
  float* h = reinterpret_cast<float*>(h_ptr);
  const float* delta = reinterpret_cast<const float*>(delta_ptr);
  const float* w = reinterpret_cast<const float*>(w_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  py::gil_scoped_release nogil;
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

// out[r, :k] = silu(gu[r, :k]) * gu[r, k:2k]
void silu_mul(std::uintptr_t gu_ptr, std::uintptr_t out_ptr, int64_t rows, int64_t k) {
  const float* gu = reinterpret_cast<const float*>(gu_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  py::gil_scoped_release nogil;
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gu + r * 2 * k;
    const float* u = g + k;
    float* o = out + r * k;
    for (int64_t i = 0; i < k; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

}  // namespace

PYBIND11_MODULE(_cpu_linear, m) {
  m.doc() = "skinny float32 matrix products y = x W^T for the decode step (raw pointers, contiguous rows)";
  m.def("linear", &linear, "y[M, N] = x[M, K] @ W[N, K]^T; pointers to contiguous float32 buffers",
        py::arg("x_ptr"), py::arg("w_ptr"), py::arg("y_ptr"), py::arg("M"), py::arg("K"), py::arg("N"));
  m.def("add_rms_norm", &add_rms_norm, "h += delta (if delta_ptr != 0); out = RMSNorm(h) * w (float32 rows)");
  m.def("silu_mul", &silu_mul, "out = silu(gu[:, :k]) * gu[:, k:] (float32 rows)");
}
