// Row-wise softmax statistics over one cache-resident block of logits, vectorised with ATen's
// Vectorized<float> (AVX2/AVX-512 when the build enables them, scalar otherwise).
//
// A "row block" is the [rows, cols] result of one small GEMM; every helper here reads it while it is
// still in L1/L2, which is the whole point of the native path (the PyTorch chunked path makes several
// passes over an [N, chunk] block that lives in L3 or DRAM).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace hypo_fast {

using Vec = at::vec::Vectorized<float>;

// z[i] = z[i]·scale + shift[i] (shift may be null): applies 1/τ and the pre-scaled bias in one pass.
inline void scale_and_shift(float* z, const float* shift, float scale, int64_t n) {
  const Vec vscale(scale);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec v = Vec::loadu(z + i) * vscale;
    if (shift != nullptr) v = v + Vec::loadu(shift + i);
    v.store(z + i);
  }
  for (; i < n; ++i) z[i] = z[i] * scale + (shift != nullptr ? shift[i] : 0.f);
}

inline float row_max(const float* z, int64_t n) {
  Vec acc(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(z + i));
  float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
  for (; i < n; ++i) m = std::max(m, z[i]);
  return m;
}

inline float row_sum(const float* z, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + Vec::loadu(z + i);
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) s += z[i];
  return s;
}

// Softmax statistics of one row segment, shifted by its own max m (exact differences, so the
// entropy keeps naive log_softmax's accuracy at large logits):
//   s = Σ e^(z−m),   t = Σ e^(z−m)·(m − z)   (t only when want_t).
// With store_exp, z is overwritten by e^(z−m) (the sampler's inverse-CDF scan reads it).
struct SegmentStats {
  float m, s, t;
};

inline SegmentStats segment_stats(float* z, int64_t n, bool want_t, bool store_exp) {
  const float m = row_max(z, n);
  const Vec vm(m);
  Vec vs(0.f), vt(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec d = vm - Vec::loadu(z + i);  // m − z ≥ 0
    const Vec e = d.neg().exp();
    vs = vs + e;
    if (want_t) vt = at::vec::fmadd(e, d, vt);
    if (store_exp) e.store(z + i);
  }
  auto sum = [](Vec& a, Vec& b) { return a + b; };
  float s = at::vec::vec_reduce_all<float>(sum, vs), t = want_t ? at::vec::vec_reduce_all<float>(sum, vt) : 0.f;
  for (; i < n; ++i) {
    const float d = m - z[i], e = std::exp(-d);
    s += e;
    t += e * d;
    if (store_exp) z[i] = e;
  }
  return {m, s, t};
}

// Running (m, s, t) of a row over vocabulary segments: the same merge as the Triton kernel's
// online-softmax update. An empty state has m = −inf and s = t = 0.
inline void merge_stats(SegmentStats& acc, const SegmentStats& seg) {
  if (seg.s == 0.f) return;
  if (acc.s == 0.f) {
    acc = seg;
    return;
  }
  const float m = std::max(acc.m, seg.m);
  const float a = std::exp(acc.m - m), a_seg = std::exp(seg.m - m);
  acc.t = a * (acc.t + (m - acc.m) * acc.s) + a_seg * (seg.t + (m - seg.m) * seg.s);
  acc.s = a * acc.s + a_seg * seg.s;
  acc.m = m;
}

}  // namespace hypo_fast
