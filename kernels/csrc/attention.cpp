// CPU attention kernel for modegpt-rt (pybind11; no link to torch; OpenMP where available).
//
// One call does what kernels/reference.py::attention does (see kernels/__init__.py for the
// interface): RoPE on the new queries and keys with the cos/sin rows of each KV group's kept
// rotary frequencies, append of the rotated keys and raw values to the KV cache (in place), and
// causal GQA attention over the cache with value heads of any width d_v (online softmax).
//
// Shapes (B batch, T new tokens, H query heads, H_kv KV heads, S cache capacity):
//   q [B,T,H,d_qk]  k [B,T,H_kv,d_qk]  v [B,T,H_kv,d_v]
//   k_cache [B,H_kv,S,d_qk]  v_cache [B,H_kv,S,d_v]
//   cos, sin [P,R] (R = full head_dim/2)  freq_idx [H_kv,d_qk/2] int32
//   cache_lens [B] int32  new_lens [B] int32  out [B,T,H,d_v] (written completely)
// Token t of sequence b sits at position cache_lens[b] + t; rows t >= new_lens[b] of `out` are
// zero and those tokens are not written to the cache. The reduced head layout is
// [first halves of the kept pairs | second halves]: y1 = x1*c - x2*s, y2 = x2*c + x1*s.
//
// Float buffers are taken as the caller's numpy arrays (C-contiguous, no conversion), so the
// caches are written in place. float32 inputs accumulate in float, float64 in double.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "attention_core.h"

namespace py = pybind11;

namespace {

// ---- argument checking ------------------------------------------------------------------------

std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  if (a.ndim() == 1) os << ",";
  os << ")";
  return os.str();
}

std::string shape_str(std::initializer_list<i64> dims) {
  std::ostringstream os;
  os << "(";
  size_t i = 0;
  for (i64 d : dims) os << (i++ ? ", " : "") << d;
  if (dims.size() == 1) os << ",";
  os << ")";
  return os.str();
}

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

void check_shape(const py::array& a, const char* name, const char* layout, std::initializer_list<i64> dims) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(dims.size());
  if (ok) {
    py::ssize_t i = 0;
    for (i64 d : dims) ok = ok && a.shape(i++) == d;
  }
  if (!ok)
    fail(std::string(name) + ": expected shape " + layout + " = " + shape_str(dims) + ", got " + shape_str(a));
}

void check_layout(const py::array& a, const char* name, bool writeable) {
  if (!(a.flags() & py::array::c_style))
    fail(std::string(name) + ": must be C-contiguous (shape " + shape_str(a) + ")");
  if (writeable && !a.writeable())
    fail(std::string(name) + ": must be writeable (it is written in place; shape " + shape_str(a) + ")");
}

void check_dtype(const py::array& a, const char* name, const py::dtype& want, const char* want_name) {
  if (!a.dtype().equal(want))
    fail(std::string(name) + ": expected dtype " + want_name + ", got " + std::string(py::str(a.dtype())) +
         " (shape " + shape_str(a) + ")");
}

template <typename T>
void attention_typed(py::array& q, py::array& k, py::array& v, py::array& k_cache, py::array& v_cache,
                     py::array& cos, py::array& sin, py::array& freq_idx, py::array& cache_lens,
                     py::array& new_lens, double scale, py::array& out, const char* dtype_name) {
  const py::dtype dt = py::dtype::of<T>();
  check_dtype(k, "k", dt, dtype_name);
  check_dtype(v, "v", dt, dtype_name);
  check_dtype(k_cache, "k_cache", dt, dtype_name);
  check_dtype(v_cache, "v_cache", dt, dtype_name);
  check_dtype(cos, "cos", dt, dtype_name);
  check_dtype(sin, "sin", dt, dtype_name);
  check_dtype(out, "out", dt, dtype_name);

  const py::dtype it = py::dtype::of<std::int32_t>();
  check_dtype(freq_idx, "freq_idx", it, "int32");
  check_dtype(cache_lens, "cache_lens", it, "int32");
  check_dtype(new_lens, "new_lens", it, "int32");

  if (q.ndim() != 4) fail("q: expected shape (B, T, H, d_qk) with 4 dims, got " + shape_str(q));
  const i64 B = q.shape(0), T_ = q.shape(1), H = q.shape(2), d_qk = q.shape(3);
  if (d_qk % 2 != 0) fail("q: d_qk must be even (pairs of rotary halves), got shape " + shape_str(q));
  if (k.ndim() != 4) fail("k: expected shape (B, T, H_kv, d_qk) with 4 dims, got " + shape_str(k));
  const i64 H_kv = k.shape(2);
  if (H_kv <= 0 || H % H_kv != 0)
    fail("k: H_kv = " + std::to_string(H_kv) + " must divide H = " + std::to_string(H) + " (q shape " +
         shape_str(q) + ", k shape " + shape_str(k) + ")");
  check_shape(k, "k", "(B, T, H_kv, d_qk)", {B, T_, H_kv, d_qk});
  if (v.ndim() != 4) fail("v: expected shape (B, T, H_kv, d_v) with 4 dims, got " + shape_str(v));
  const i64 d_v = v.shape(3);
  check_shape(v, "v", "(B, T, H_kv, d_v)", {B, T_, H_kv, d_v});
  if (k_cache.ndim() != 4) fail("k_cache: expected shape (B, H_kv, S, d_qk) with 4 dims, got " + shape_str(k_cache));
  const i64 S = k_cache.shape(2);
  check_shape(k_cache, "k_cache", "(B, H_kv, S, d_qk)", {B, H_kv, S, d_qk});
  check_shape(v_cache, "v_cache", "(B, H_kv, S, d_v)", {B, H_kv, S, d_v});
  if (cos.ndim() != 2) fail("cos: expected shape (P, head_dim/2) with 2 dims, got " + shape_str(cos));
  const i64 P = cos.shape(0), R = cos.shape(1);
  check_shape(sin, "sin", "(P, head_dim/2) like cos", {P, R});
  const i64 half = d_qk / 2;
  check_shape(freq_idx, "freq_idx", "(H_kv, d_qk/2)", {H_kv, half});
  check_shape(cache_lens, "cache_lens", "(B,)", {B});
  check_shape(new_lens, "new_lens", "(B,)", {B});
  check_shape(out, "out", "(B, T, H, d_v)", {B, T_, H, d_v});

  check_layout(q, "q", false);
  check_layout(k, "k", false);
  check_layout(v, "v", false);
  check_layout(k_cache, "k_cache", true);
  check_layout(v_cache, "v_cache", true);
  check_layout(cos, "cos", false);
  check_layout(sin, "sin", false);
  check_layout(freq_idx, "freq_idx", false);
  check_layout(cache_lens, "cache_lens", false);
  check_layout(new_lens, "new_lens", false);
  check_layout(out, "out", true);

  const auto* fi = static_cast<const std::int32_t*>(freq_idx.data());
  for (i64 i = 0; i < H_kv * half; ++i)
    if (fi[i] < 0 || fi[i] >= R)
      fail("freq_idx: entry " + std::to_string(fi[i]) + " out of range for cos/sin with " + std::to_string(R) +
           " frequencies (freq_idx shape " + shape_str(freq_idx) + ", cos shape " + shape_str(cos) + ")");

  const auto* cl = static_cast<const std::int32_t*>(cache_lens.data());
  const auto* nl_in = static_cast<const std::int32_t*>(new_lens.data());
  // new_lens beyond T behave like T (as in the reference); clamp into a small local copy.
  constexpr i64 kStackB = 64;
  std::int32_t nl_stack[kStackB];
  std::vector<std::int32_t> nl_heap;
  std::int32_t* nl = nl_stack;
  if (B > kStackB) {
    nl_heap.resize(static_cast<size_t>(B));
    nl = nl_heap.data();
  }
  bool any_valid = false;
  for (i64 b = 0; b < B; ++b) {
    if (cl[b] < 0) fail("cache_lens: entry " + std::to_string(b) + " is negative (" + std::to_string(cl[b]) + ")");
    if (nl_in[b] < 0) fail("new_lens: entry " + std::to_string(b) + " is negative (" + std::to_string(nl_in[b]) + ")");
    const i64 n = std::min<i64>(nl_in[b], T_);
    nl[b] = static_cast<std::int32_t>(n);
    if (static_cast<i64>(cl[b]) + n > S)
      fail("k_cache: sequence " + std::to_string(b) + " needs " + std::to_string(cl[b]) + " cached + " +
           std::to_string(n) + " new positions but the cache holds S = " + std::to_string(S) + " (k_cache shape " +
           shape_str(k_cache) + ", q shape " + shape_str(q) + ")");
    any_valid = any_valid || n > 0;
  }
  if (any_valid && (P == 0 || R == 0))
    fail("cos: empty rotary table, shape " + shape_str(cos) + " (sin shape " + shape_str(sin) + ")");

  Problem<T> pb;
  pb.q = static_cast<const T*>(q.data());
  pb.k = static_cast<const T*>(k.data());
  pb.v = static_cast<const T*>(v.data());
  pb.k_cache = static_cast<T*>(k_cache.mutable_data());
  pb.v_cache = static_cast<T*>(v_cache.mutable_data());
  pb.cos = static_cast<const T*>(cos.data());
  pb.sin = static_cast<const T*>(sin.data());
  pb.freq_idx = fi;
  pb.cache_lens = cl;
  pb.new_lens = nl;
  pb.out = static_cast<T*>(out.mutable_data());
  pb.scale = static_cast<T>(scale);
  pb.B = B;
  pb.T_ = T_;
  pb.H = H;
  pb.H_kv = H_kv;
  pb.G = H / H_kv;
  pb.d_qk = d_qk;
  pb.half = half;
  pb.d_v = d_v;
  pb.S = S;
  pb.P = P;
  pb.R = R;

  py::gil_scoped_release release;
  run(pb);
}

void attention(py::array q, py::array k, py::array v, py::array k_cache, py::array v_cache, py::array cos,
               py::array sin, py::array freq_idx, py::array cache_lens, py::array new_lens, double scale,
               py::array out) {
  const py::dtype dt = q.dtype();
  if (dt.equal(py::dtype::of<float>())) {
    attention_typed<float>(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale, out,
                           "float32");
  } else if (dt.equal(py::dtype::of<double>())) {
    attention_typed<double>(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale, out,
                            "float64");
  } else {
    throw py::value_error("q: unsupported dtype " + std::string(py::str(dt)) +
                         "; the CPU attention kernel handles float32 and float64 (q shape " + shape_str(q) + ")");
  }
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_cpu_attention, m) {
  m.doc() = "CPU attention kernel (RoPE + KV-cache append + causal GQA attention) for modegpt-rt";
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("cos"), py::arg("sin"), py::arg("freq_idx"), py::arg("cache_lens"), py::arg("new_lens"),
        py::arg("scale"), py::arg("out"),
        "RoPE the new q/k, append k (rotated) and v to the caches in place, and write causal GQA attention to "
        "`out` [B, T, H, d_v] (rows t >= new_lens[b] zero). float32 or float64 numpy arrays, C-contiguous; "
        "freq_idx, cache_lens, new_lens int32.");
  m.def("max_threads", &max_threads, "OpenMP threads a call may use (1 without OpenMP).");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
