// Core of the CPU attention kernel (no Python): RoPE with gathered cos/sin rows, KV-cache
// append and causal GQA attention over the cache, on raw buffers described by Problem<T>.
// Included by attention.cpp (the numpy-facing entry point) and by linear.cpp (the fused
// decode step). Everything lives in an unnamed namespace: each extension gets its own copy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

using i64 = std::int64_t;

namespace {

constexpr int kKC = 128;          // keys per online-softmax chunk
constexpr i64 kMaxStackD = 256;   // d_qk, d_v up to this use stack scratch buffers
constexpr double kParallelWork = 1.0e5;  // below this many multiply-adds (a few us), stay on one thread

template <typename T>
struct Problem {
  const T* q;
  const T* k;
  const T* v;
  T* k_cache;
  T* v_cache;
  const T* cos;
  const T* sin;
  const std::int32_t* freq_idx;
  const std::int32_t* cache_lens;
  const std::int32_t* new_lens;  // already clamped to [0, T] by the caller of run()
  T* out;
  T scale;
  i64 B, T_, H, H_kv, G, d_qk, half, d_v, S, P, R;
};

// ---- primitives ---------------------------------------------------------------------------------
// Elementwise loops are plain C++ that -O3 -march=native vectorizes. The dot products are the one
// exception: compilers finish a vectorized reduction with in-order scalar adds through the stack
// (they may not reassociate), which dominated the profile, so with AVX-512 / AVX2 they use
// intrinsics; other targets get the portable lane-sum version.

template <typename T>
struct Lanes {
  static constexpr int value = 64 / static_cast<int>(sizeof(T));  // one 512-bit register
};

// dot(a, b): L independent lane sums (vectorizable without reassociation) + pairwise reduction.
template <typename T>
inline T dot_portable(const T* __restrict a, const T* __restrict b, i64 n) {
  constexpr int L = Lanes<T>::value;
  T acc[L] = {};
  i64 i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) acc[l] += a[i + l] * b[i + l];
  T s = T(0);
  for (; i < n; ++i) s += a[i] * b[i];
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return s + acc[0];
}

#if defined(__AVX2__) && defined(__FMA__)
// Four sums at once: lanes of c0..c3 -> [sum c0, sum c1, sum c2, sum c3].
inline __m128 hsum4(__m256 c0, __m256 c1, __m256 c2, __m256 c3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(c0, c1), _mm256_hadd_ps(c2, c3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
inline __m256d hsum4(__m256d c0, __m256d c1, __m256d c2, __m256d c3) {
  const __m256d h01 = _mm256_hadd_pd(c0, c1);  // [c0 01, c1 01, c0 23, c1 23]
  const __m256d h23 = _mm256_hadd_pd(c2, c3);
  return _mm256_add_pd(_mm256_permute2f128_pd(h01, h23, 0x20), _mm256_permute2f128_pd(h01, h23, 0x31));
}
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline double hsum(__m256d v) {
  __m128d x = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  x = _mm_add_sd(x, _mm_unpackhi_pd(x, x));
  return _mm_cvtsd_f64(x);
}
#endif

#if defined(__AVX512F__)
// 512 -> 256 bits by adding the halves. Zero-masked extracts: GCC 12 implements the unmasked
// ones (and the 512->256 casts) from an undefined register, which trips -Wmaybe-uninitialized.
inline __m256d fold(__m512d v) {
  return _mm256_add_pd(_mm512_maskz_extractf64x4_pd(0xF, v, 0), _mm512_maskz_extractf64x4_pd(0xF, v, 1));
}
inline __m256 fold(__m512 v) {
  const __m512d d = _mm512_castps_pd(v);  // bit casts only: the halves are added as floats
  return _mm256_add_ps(_mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, d, 0)),
                       _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, d, 1)));
}

inline float dot(const float* a, const float* b, i64 n) {
  __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
  i64 i = 0;
  for (; i + 32 <= n; i += 32) {
    c0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), c0);
    c1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), c1);
  }
  if (i + 16 <= n) {
    c0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), c0);
    i += 16;
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    c1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), c1);
  }
  return hsum(fold(_mm512_add_ps(c0, c1)));
}
inline double dot(const double* a, const double* b, i64 n) {
  __m512d c0 = _mm512_setzero_pd(), c1 = _mm512_setzero_pd();
  i64 i = 0;
  for (; i + 16 <= n; i += 16) {
    c0 = _mm512_fmadd_pd(_mm512_loadu_pd(a + i), _mm512_loadu_pd(b + i), c0);
    c1 = _mm512_fmadd_pd(_mm512_loadu_pd(a + i + 8), _mm512_loadu_pd(b + i + 8), c1);
  }
  if (i + 8 <= n) {
    c0 = _mm512_fmadd_pd(_mm512_loadu_pd(a + i), _mm512_loadu_pd(b + i), c0);
    i += 8;
  }
  if (i < n) {
    const __mmask8 m = static_cast<__mmask8>((1u << (n - i)) - 1u);
    c1 = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(m, a + i), _mm512_maskz_loadu_pd(m, b + i), c1);
  }
  return hsum(fold(_mm512_add_pd(c0, c1)));
}
// out[r] = dot(a_r, b_r), r < 4 (pass the same pointer several times to share a row).
inline void dot4(const float* a0, const float* a1, const float* a2, const float* a3, const float* b0,
                 const float* b1, const float* b2, const float* b3, i64 n, float* out) {
  __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps(), c2 = _mm512_setzero_ps(), c3 = _mm512_setzero_ps();
  i64 i = 0;
  for (; i + 16 <= n; i += 16) {
    c0 = _mm512_fmadd_ps(_mm512_loadu_ps(a0 + i), _mm512_loadu_ps(b0 + i), c0);
    c1 = _mm512_fmadd_ps(_mm512_loadu_ps(a1 + i), _mm512_loadu_ps(b1 + i), c1);
    c2 = _mm512_fmadd_ps(_mm512_loadu_ps(a2 + i), _mm512_loadu_ps(b2 + i), c2);
    c3 = _mm512_fmadd_ps(_mm512_loadu_ps(a3 + i), _mm512_loadu_ps(b3 + i), c3);
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    c0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a0 + i), _mm512_maskz_loadu_ps(m, b0 + i), c0);
    c1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a1 + i), _mm512_maskz_loadu_ps(m, b1 + i), c1);
    c2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a2 + i), _mm512_maskz_loadu_ps(m, b2 + i), c2);
    c3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a3 + i), _mm512_maskz_loadu_ps(m, b3 + i), c3);
  }
  _mm_storeu_ps(out, hsum4(fold(c0), fold(c1), fold(c2), fold(c3)));
}
inline void dot4(const double* a0, const double* a1, const double* a2, const double* a3, const double* b0,
                 const double* b1, const double* b2, const double* b3, i64 n, double* out) {
  __m512d c0 = _mm512_setzero_pd(), c1 = _mm512_setzero_pd(), c2 = _mm512_setzero_pd(), c3 = _mm512_setzero_pd();
  i64 i = 0;
  for (; i + 8 <= n; i += 8) {
    c0 = _mm512_fmadd_pd(_mm512_loadu_pd(a0 + i), _mm512_loadu_pd(b0 + i), c0);
    c1 = _mm512_fmadd_pd(_mm512_loadu_pd(a1 + i), _mm512_loadu_pd(b1 + i), c1);
    c2 = _mm512_fmadd_pd(_mm512_loadu_pd(a2 + i), _mm512_loadu_pd(b2 + i), c2);
    c3 = _mm512_fmadd_pd(_mm512_loadu_pd(a3 + i), _mm512_loadu_pd(b3 + i), c3);
  }
  if (i < n) {
    const __mmask8 m = static_cast<__mmask8>((1u << (n - i)) - 1u);
    c0 = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(m, a0 + i), _mm512_maskz_loadu_pd(m, b0 + i), c0);
    c1 = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(m, a1 + i), _mm512_maskz_loadu_pd(m, b1 + i), c1);
    c2 = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(m, a2 + i), _mm512_maskz_loadu_pd(m, b2 + i), c2);
    c3 = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(m, a3 + i), _mm512_maskz_loadu_pd(m, b3 + i), c3);
  }
  _mm256_storeu_pd(out, hsum4(fold(c0), fold(c1), fold(c2), fold(c3)));
}

#elif defined(__AVX2__) && defined(__FMA__)
inline float dot(const float* a, const float* b, i64 n) {
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
  i64 i = 0;
  for (; i + 16 <= n; i += 16) {
    c0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), c0);
    c1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), c1);
  }
  if (i + 8 <= n) {
    c0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), c0);
    i += 8;
  }
  float s = hsum(_mm256_add_ps(c0, c1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
inline double dot(const double* a, const double* b, i64 n) {
  __m256d c0 = _mm256_setzero_pd(), c1 = _mm256_setzero_pd();
  i64 i = 0;
  for (; i + 8 <= n; i += 8) {
    c0 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i), _mm256_loadu_pd(b + i), c0);
    c1 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i + 4), _mm256_loadu_pd(b + i + 4), c1);
  }
  if (i + 4 <= n) {
    c0 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i), _mm256_loadu_pd(b + i), c0);
    i += 4;
  }
  double s = hsum(_mm256_add_pd(c0, c1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
inline void dot4(const float* a0, const float* a1, const float* a2, const float* a3, const float* b0,
                 const float* b1, const float* b2, const float* b3, i64 n, float* out) {
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
  i64 i = 0;
  for (; i + 8 <= n; i += 8) {
    c0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + i), _mm256_loadu_ps(b0 + i), c0);
    c1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + i), _mm256_loadu_ps(b1 + i), c1);
    c2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + i), _mm256_loadu_ps(b2 + i), c2);
    c3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + i), _mm256_loadu_ps(b3 + i), c3);
  }
  _mm_storeu_ps(out, hsum4(c0, c1, c2, c3));
  for (; i < n; ++i) {
    out[0] += a0[i] * b0[i];
    out[1] += a1[i] * b1[i];
    out[2] += a2[i] * b2[i];
    out[3] += a3[i] * b3[i];
  }
}
inline void dot4(const double* a0, const double* a1, const double* a2, const double* a3, const double* b0,
                 const double* b1, const double* b2, const double* b3, i64 n, double* out) {
  __m256d c0 = _mm256_setzero_pd(), c1 = _mm256_setzero_pd(), c2 = _mm256_setzero_pd(), c3 = _mm256_setzero_pd();
  i64 i = 0;
  for (; i + 4 <= n; i += 4) {
    c0 = _mm256_fmadd_pd(_mm256_loadu_pd(a0 + i), _mm256_loadu_pd(b0 + i), c0);
    c1 = _mm256_fmadd_pd(_mm256_loadu_pd(a1 + i), _mm256_loadu_pd(b1 + i), c1);
    c2 = _mm256_fmadd_pd(_mm256_loadu_pd(a2 + i), _mm256_loadu_pd(b2 + i), c2);
    c3 = _mm256_fmadd_pd(_mm256_loadu_pd(a3 + i), _mm256_loadu_pd(b3 + i), c3);
  }
  _mm256_storeu_pd(out, hsum4(c0, c1, c2, c3));
  for (; i < n; ++i) {
    out[0] += a0[i] * b0[i];
    out[1] += a1[i] * b1[i];
    out[2] += a2[i] * b2[i];
    out[3] += a3[i] * b3[i];
  }
}

#else
template <typename T>
inline T dot(const T* a, const T* b, i64 n) {
  return dot_portable(a, b, n);
}
template <typename T>
inline void dot4(const T* a0, const T* a1, const T* a2, const T* a3, const T* b0, const T* b1, const T* b2,
                 const T* b3, i64 n, T* out) {
  out[0] = dot_portable(a0, b0, n);
  out[1] = dot_portable(a1, b1, n);
  out[2] = dot_portable(a2, b2, n);
  out[3] = dot_portable(a3, b3, n);
}
#endif

// a[0:d_v] += sum_j p[j] * V[j, 0:d_v] for j < n, V rows ldv apart. The output row is blocked
// into register-sized pieces held across the key loop (no store/reload of `a` per key).
template <typename T>
inline void pv_accumulate(T* __restrict a, const T* __restrict p, const T* __restrict V, i64 ldv, int n, i64 d_v) {
  constexpr int L = Lanes<T>::value;
  constexpr int W = 4 * L;
  i64 i0 = 0;
  for (; i0 + W <= d_v; i0 += W) {
    T acc[W];
    for (int l = 0; l < W; ++l) acc[l] = a[i0 + l];
    for (int j = 0; j < n; ++j) {
      const T pj = p[j];
      const T* vr = V + j * ldv + i0;
      for (int l = 0; l < W; ++l) acc[l] += pj * vr[l];
    }
    for (int l = 0; l < W; ++l) a[i0 + l] = acc[l];
  }
  for (; i0 + L <= d_v; i0 += L) {
    T acc[L];
    for (int l = 0; l < L; ++l) acc[l] = a[i0 + l];
    for (int j = 0; j < n; ++j) {
      const T pj = p[j];
      const T* vr = V + j * ldv + i0;
      for (int l = 0; l < L; ++l) acc[l] += pj * vr[l];
    }
    for (int l = 0; l < L; ++l) a[i0 + l] = acc[l];
  }
  if (i0 < d_v) {
    for (int j = 0; j < n; ++j) {
      const T pj = p[j];
      const T* vr = V + j * ldv;
      for (i64 i = i0; i < d_v; ++i) a[i] += pj * vr[i];
    }
  }
}

template <typename T>
inline void scal(T* __restrict y, T a, i64 n) {
  for (i64 i = 0; i < n; ++i) y[i] *= a;
}

template <typename T>
inline void zero(T* __restrict y, i64 n) {
  for (i64 i = 0; i < n; ++i) y[i] = T(0);
}

// max(init, s[0..n)) with lane-wise partial maxima (vectorizes; `a > b ? a : b` is exactly maxps).
template <typename T>
inline T max_of(const T* __restrict s, int n, T init) {
  constexpr int L = Lanes<T>::value;
  T mx[L];
  for (int l = 0; l < L; ++l) mx[l] = init;
  int j = 0;
  for (; j + L <= n; j += L)
    for (int l = 0; l < L; ++l) mx[l] = s[j + l] > mx[l] ? s[j + l] : mx[l];
  T m = init;
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  for (int l = 0; l < L; ++l) m = mx[l] > m ? mx[l] : m;
  return m;
}

// sum of s[0..n) with lane-wise partial sums (vectorizes) and a pairwise reduction.
template <typename T>
inline T sum_of(const T* __restrict s, int n) {
  constexpr int L = Lanes<T>::value;
  T acc[L] = {};
  int j = 0;
  for (; j + L <= n; j += L)
    for (int l = 0; l < L; ++l) acc[l] += s[j + l];
  T tail = T(0);
  for (; j < n; ++j) tail += s[j];
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0] + tail;
}

// s[j] = exp(s[j] - m) in place (s[j] <= m). float: a branch-free polynomial exp that the
// compiler vectorizes (about 2 ulp); double: std::exp (exactness over speed).
inline void exp_sub(float* __restrict s, int n, float m) {
  for (int j = 0; j < n; ++j) {
    float x = s[j] - m;
    const bool under = x < -87.0f;
    x = under ? -87.0f : x;
    // x = k*ln2 + r with |r| <= ln2/2; k rounded to nearest with the 1.5*2^23 trick
    const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const std::int32_t e = (static_cast<std::int32_t>(k) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &e, sizeof(two_k));
    s[j] = under ? 0.0f : p * two_k;
  }
}

inline void exp_sub(double* __restrict s, int n, double m) {
  for (int j = 0; j < n; ++j) s[j] = std::exp(s[j] - m);
}

// Rotate one head row x [d_qk] into y with the gathered cos/sin of its group's kept frequencies.
// Products and sums are rounded separately, as in the reference (no fused multiply-add), so the
// rotated keys in the cache are bit-identical to the reference's.
#if defined(__GNUC__) && !defined(__clang__)
#define MODEGPT_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define MODEGPT_NO_CONTRACT  // clang (-ffp-contract=on) does not fuse across statements
#endif
template <typename T>
MODEGPT_NO_CONTRACT void rope_row(const T* __restrict x, T* __restrict y, const T* __restrict crow, const T* __restrict srow,
                     const std::int32_t* __restrict fidx, i64 half) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (i64 p = 0; p < half; ++p) {
    const T c = crow[fidx[p]];
    const T s = srow[fidx[p]];
    const T x1 = x[p];
    const T x2 = x[half + p];
    const T a = x1 * c;
    const T b = x2 * s;
    const T d = x2 * c;
    const T e = x1 * s;
    y[p] = a - b;
    y[half + p] = d + e;
  }
}

// Rotate key (b, t, g), store it at k_cache[b, g, pos]; copy v (b, t, g) to v_cache[b, g, pos].
template <typename T>
inline void write_cache_row(const Problem<T>& pb, i64 b, i64 t, i64 g) {
  const i64 pos = static_cast<i64>(pb.cache_lens[b]) + t;
  const i64 prow = std::min(pos, pb.P - 1);
  const T* x = pb.k + ((b * pb.T_ + t) * pb.H_kv + g) * pb.d_qk;
  T* kdst = pb.k_cache + ((b * pb.H_kv + g) * pb.S + pos) * pb.d_qk;
  rope_row(x, kdst, pb.cos + prow * pb.R, pb.sin + prow * pb.R, pb.freq_idx + g * pb.half, pb.half);
  const T* vs = pb.v + ((b * pb.T_ + t) * pb.H_kv + g) * pb.d_v;
  T* vdst = pb.v_cache + ((b * pb.H_kv + g) * pb.S + pos) * pb.d_v;
  std::memcpy(vdst, vs, sizeof(T) * static_cast<size_t>(pb.d_v));
}

// pv for four rows sharing the value rows: a_r[0:d_v] += sum_j p[r][j] * V[j, 0:d_v], j < n.
// Each value row is loaded once per register block and used by all four rows.
template <typename T>
inline void pv_accumulate4(T* const* a, const T (*p)[kKC], const T* __restrict V, i64 ldv, int n, i64 d_v) {
  constexpr int L = Lanes<T>::value;
  T* __restrict a0 = a[0];
  T* __restrict a1 = a[1];
  T* __restrict a2 = a[2];
  T* __restrict a3 = a[3];
  i64 i0 = 0;
  for (; i0 + L <= d_v; i0 += L) {
    T c0[L], c1[L], c2[L], c3[L];
    for (int l = 0; l < L; ++l) {
      c0[l] = a0[i0 + l];
      c1[l] = a1[i0 + l];
      c2[l] = a2[i0 + l];
      c3[l] = a3[i0 + l];
    }
    for (int j = 0; j < n; ++j) {
      const T* vr = V + j * ldv + i0;
      const T p0 = p[0][j], p1 = p[1][j], p2 = p[2][j], p3 = p[3][j];
      for (int l = 0; l < L; ++l) {
        c0[l] += p0 * vr[l];
        c1[l] += p1 * vr[l];
        c2[l] += p2 * vr[l];
        c3[l] += p3 * vr[l];
      }
    }
    for (int l = 0; l < L; ++l) {
      a0[i0 + l] = c0[l];
      a1[i0 + l] = c1[l];
      a2[i0 + l] = c2[l];
      a3[i0 + l] = c3[l];
    }
  }
  if (i0 < d_v) {
    for (int j = 0; j < n; ++j) {
      const T* vr = V + j * ldv;
      for (i64 i = i0; i < d_v; ++i) {
        a0[i] += p[0][j] * vr[i];
        a1[i] += p[1][j] * vr[i];
        a2[i] += p[2][j] * vr[i];
        a3[i] += p[3][j] * vr[i];
      }
    }
  }
}

// Rotated, pre-scaled query row of (b, t, h) at position pos into qr.
template <typename T>
inline void load_query(const Problem<T>& pb, i64 b, i64 t, i64 h, i64 pos, T* qr) {
  const i64 g = h / pb.G;
  const i64 prow = std::min(pos, pb.P - 1);
  const T* x = pb.q + ((b * pb.T_ + t) * pb.H + h) * pb.d_qk;
  rope_row(x, qr, pb.cos + prow * pb.R, pb.sin + prow * pb.R, pb.freq_idx + g * pb.half, pb.half);
  scal(qr, pb.scale, pb.d_qk);
}

// Online-softmax update of one row for a chunk: s[0:jr) are its visible scores (jr >= 1), turned
// into probabilities in place; rescales the row's accumulator when the running max grows.
template <typename T>
inline void softmax_chunk(T* s, int jr, T& m, T& l, T* acc, i64 d_v) {
  const T cm = max_of(s, jr, m);
  const T alpha = std::exp(m - cm);  // 0 on the first chunk (m = -inf)
  exp_sub(s, jr, cm);
  const T sum = sum_of(s, jr);
  if (l != T(0) && alpha != T(1)) scal(acc, alpha, d_v);
  l = l * alpha + sum;
  m = cm;
}

// One query row (b, t, h): the decode path. Keys are scored four at a time.
template <typename T>
void attend_row(const Problem<T>& pb, i64 b, i64 t, i64 h, T* __restrict qbuf) {
  const i64 g = h / pb.G;
  const i64 d_qk = pb.d_qk, d_v = pb.d_v;
  const i64 pos = static_cast<i64>(pb.cache_lens[b]) + t;
  load_query(pb, b, t, h, pos, qbuf);
  T* acc = pb.out + ((b * pb.T_ + t) * pb.H + h) * d_v;
  zero(acc, d_v);
  T m = -std::numeric_limits<T>::infinity(), l = T(0);
  const T* kbase = pb.k_cache + (b * pb.H_kv + g) * pb.S * d_qk;
  const T* vbase = pb.v_cache + (b * pb.H_kv + g) * pb.S * d_v;
  const i64 nkeys = pos + 1;
  alignas(64) T s[kKC];
  for (i64 j0 = 0; j0 < nkeys; j0 += kKC) {
    const int jn = static_cast<int>(std::min<i64>(kKC, nkeys - j0));
    const T* kc = kbase + j0 * d_qk;
    int j = 0;
    for (; j + 4 <= jn; j += 4)
      dot4(qbuf, qbuf, qbuf, qbuf, kc + j * d_qk, kc + (j + 1) * d_qk, kc + (j + 2) * d_qk, kc + (j + 3) * d_qk, d_qk,
           s + j);
    for (; j < jn; ++j) s[j] = dot(qbuf, kc + j * d_qk, d_qk);
    softmax_chunk(s, jn, m, l, acc, d_v);
    pv_accumulate(acc, s, vbase + j0 * d_v, d_v, jn, d_v);
  }
  scal(acc, T(1) / l, d_v);
}

// Up to four query rows of one KV group (b, g), given as (t, h) pairs: each key and value row is
// loaded once for all of them. Rows r >= nr are padding (zero query, zero probabilities, and
// their own scratch accumulator rows: scratch holds 3 rows of d_v).
template <typename T>
void attend_rows4(const Problem<T>& pb, i64 b, i64 g, const i64* t_of, const i64* h_of, int nr,
                  T* __restrict qbuf, T* __restrict scratch) {
  const i64 d_qk = pb.d_qk, d_v = pb.d_v;
  T* acc[4];
  i64 pos[4];
  T m[4], l[4];
  i64 max_pos = 0;
  for (int r = 0; r < 4; ++r) {
    T* qr = qbuf + r * d_qk;
    if (r < nr) {
      pos[r] = static_cast<i64>(pb.cache_lens[b]) + t_of[r];
      load_query(pb, b, t_of[r], h_of[r], pos[r], qr);
      acc[r] = pb.out + ((b * pb.T_ + t_of[r]) * pb.H + h_of[r]) * d_v;
      max_pos = std::max(max_pos, pos[r]);
    } else {
      pos[r] = -1;
      zero(qr, d_qk);
      acc[r] = scratch + (r - 1) * d_v;  // nr >= 1, so r - 1 is in 0..2
    }
    zero(acc[r], d_v);
    m[r] = -std::numeric_limits<T>::infinity();
    l[r] = T(0);
  }

  const T* kbase = pb.k_cache + (b * pb.H_kv + g) * pb.S * d_qk;
  const T* vbase = pb.v_cache + (b * pb.H_kv + g) * pb.S * d_v;
  const i64 nkeys = max_pos + 1;
  alignas(64) T sc[4][kKC];
  const T* q0 = qbuf;
  const T* q1 = qbuf + d_qk;
  const T* q2 = qbuf + 2 * d_qk;
  const T* q3 = qbuf + 3 * d_qk;

  for (i64 j0 = 0; j0 < nkeys; j0 += kKC) {
    const int jn = static_cast<int>(std::min<i64>(kKC, nkeys - j0));
    const T* kc = kbase + j0 * d_qk;
    for (int j = 0; j < jn; ++j) {
      const T* kr = kc + j * d_qk;
      T res[4];
      dot4(q0, q1, q2, q3, kr, kr, kr, kr, d_qk, res);
      sc[0][j] = res[0];
      sc[1][j] = res[1];
      sc[2][j] = res[2];
      sc[3][j] = res[3];
    }
    for (int r = 0; r < 4; ++r) {
      const int jr = static_cast<int>(std::max<i64>(0, std::min<i64>(jn, pos[r] - j0 + 1)));  // visible keys
      if (jr > 0) softmax_chunk(sc[r], jr, m[r], l[r], acc[r], d_v);
      for (int j = jr; j < jn; ++j) sc[r][j] = T(0);  // masked (causal) or padding
    }
    pv_accumulate4(acc, sc, vbase + j0 * d_v, d_v, jn, d_v);
  }
  for (int r = 0; r < nr; ++r) scal(acc[r], T(1) / l[r], d_v);
}

template <typename T>
void run(const Problem<T>& pb) {
  const i64 B = pb.B, T_ = pb.T_, H = pb.H, G = pb.G, H_kv = pb.H_kv;
  if (B == 0 || T_ == 0 || H == 0) return;

  // Rough multiply-add count, to keep tiny calls on one thread.
  double work = 0.0;
  for (i64 b = 0; b < B; ++b) {
    const double n = pb.new_lens[b];
    work += n * (static_cast<double>(pb.cache_lens[b]) + 0.5 * n + 1.0);
  }
  work *= static_cast<double>(H) * static_cast<double>(pb.d_qk + pb.d_v);

  int max_threads = 1;
#ifdef _OPENMP
  max_threads = omp_get_max_threads();
#endif
  const bool parallel = max_threads > 1 && work >= kParallelWork;
  (void)parallel;  // unused without OpenMP

  // Work items. Prefill: tiles of 4 rows (t, head-in-group), t-major, of one KV group, so each
  // key and value row is loaded once per tile. Decode: one item per (b, h); grouping the heads of
  // a KV group did not pay off there (the dot products are FMA-bound, and a padded 4th row costs
  // more than the shared loads save), and per-head items keep two threads busy at batch 1.
  const i64 rows_per_group = T_ * G;
  const i64 tiles = (rows_per_group + 3) / 4;
  const bool grouped = T_ > 1;
  const i64 n_items = grouped ? B * H_kv * tiles : B * H;
  const i64 n_rows = B * H_kv * T_;

  const size_t scratch_per_thread = static_cast<size_t>(4 * pb.d_qk + 3 * pb.d_v);
  std::vector<T> heap;  // only when the rows are too wide for the stack buffer
  if (pb.d_qk > kMaxStackD || pb.d_v > kMaxStackD) heap.resize(static_cast<size_t>(max_threads) * scratch_per_thread);

#pragma omp parallel if (parallel)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    alignas(64) T stack_buf[7 * kMaxStackD];  // 4 query rows + 3 padding accumulators
    T* qbuf = heap.empty() ? stack_buf : heap.data() + static_cast<size_t>(tid) * scratch_per_thread;
    T* scratch = qbuf + 4 * pb.d_qk;

    // Phase 1: rotate the new keys and append keys/values to the cache.
#pragma omp for schedule(static)
    for (i64 i = 0; i < n_rows; ++i) {
      const i64 t = i % T_;
      const i64 bg = i / T_;
      const i64 b = bg / H_kv, g = bg % H_kv;
      if (t < pb.new_lens[b]) write_cache_row(pb, b, t, g);
    }
    // (implicit barrier: every key is in the cache before anyone attends)

    // Phase 2: attention.
#pragma omp for schedule(dynamic, 1)
    for (i64 i = 0; i < n_items; ++i) {
      if (grouped) {
        const i64 tile = tiles - 1 - i % tiles;  // the longest (latest) rows first: better balance
        const i64 bg = i / tiles;
        const i64 b = bg / H_kv, g = bg % H_kv;
        const i64 n = pb.new_lens[b];
        i64 t_of[4], h_of[4];
        int nr = 0;
        for (i64 rho = tile * 4; rho < std::min(tile * 4 + 4, rows_per_group); ++rho) {
          const i64 t = rho / G, h = g * G + rho % G;
          if (t < n) {
            t_of[nr] = t;
            h_of[nr] = h;
            ++nr;
          } else {
            zero(pb.out + ((b * T_ + t) * H + h) * pb.d_v, pb.d_v);
          }
        }
        if (nr > 0) attend_rows4(pb, b, g, t_of, h_of, nr, qbuf, scratch);
      } else {
        const i64 b = i / H, h = i % H;
        if (pb.new_lens[b] > 0)
          attend_row(pb, b, 0, h, qbuf);
        else
          zero(pb.out + (b * H + h) * pb.d_v, pb.d_v);
      }
    }
  }
}

}  // namespace
