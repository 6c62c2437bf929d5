// CPU sampling head: draws token ~ softmax((h·Wᵀ + b)/τ) per row and records its log-prob, one
// vocabulary tile at a time, without materialising the [B, V] logits.
//
// Threads own vocabulary tiles of a fixed width (not derived from the thread count, so a seed gives the
// same draw on any number of threads). Per tile and row: the tile's max m, mass s = Σ e^(z−m) (and entropy term t), and one
// candidate drawn from the tile's softmax by inverse CDF (one uniform). Across tiles the token is taken
// from the tile that wins a Gumbel-max race on log(s) + m, i.e. with probability (tile mass)/(total
// mass), so the result is exactly softmax-distributed with two random numbers per row and tile. Uniforms
// come from a counter-based hash of (seed, row, tile, stream).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "row_stats.h"

namespace hypo_fast {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Uniform in (0, 1), a pure function of its key.
float uniform(int64_t seed, int64_t row, int64_t tile, int64_t stream) {
  const uint64_t h = splitmix64(splitmix64(splitmix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(row)) ^
                                static_cast<uint64_t>(tile * 2 + stream));
  return (static_cast<float>(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

struct TileDraw {
  SegmentStats stats;
  int64_t candidate;  // column within the tile
  float z_candidate;  // its logit
};

// Inverse CDF over e = e^(z−m) already stored in the row: the first column whose running sum reaches
// u·s (the last column with e > 0 if rounding leaves the running sum short).
int64_t inverse_cdf(const float* e, int64_t n, float target) {
  float running = 0.f;
  int64_t last_positive = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (e[i] > 0.f) last_positive = i;
    running += e[i];
    if (running >= target && e[i] > 0.f) return i;
  }
  return last_positive;
}

TileDraw draw_from_tile(float* row, int64_t cols, bool greedy, bool want_t, float u) {
  if (greedy) {
    const int64_t best = std::max_element(row, row + cols) - row;  // first maximum, as torch.argmax
    const float z_best = row[best];
    return {segment_stats(row, cols, want_t, /*store_exp=*/false), best, z_best};
  }
  const SegmentStats stats = segment_stats(row, cols, want_t, /*store_exp=*/true);
  const int64_t pick = inverse_cdf(row, cols, u * stats.s);
  return {stats, pick, stats.m + std::log(row[pick])};  // z = m + log e^(z−m)
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_head(const at::Tensor& hidden, const at::Tensor& weight,
                                                           const c10::optional<at::Tensor>& bias, double temperature,
                                                           int64_t seed, bool greedy, bool return_entropy,
                                                           int64_t tile_columns) {
  const at::NoGradGuard no_grad;  // sampling has no gradient
  TORCH_CHECK(tile_columns > 0, "tile must be positive");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden must be [B, D] and weight [V, D], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)), "bias must be [V]");
  TORCH_CHECK(greedy || temperature > 0, "temperature must be positive");
  const int64_t B = hidden.size(0), V = weight.size(0), tiles = (V + tile_columns - 1) / tile_columns;
  const float inv_temp = greedy ? 1.f : static_cast<float>(1.0 / temperature);
  const at::Tensor h = hidden.to(at::kFloat).contiguous();
  std::vector<TileDraw> draws(B * tiles);  // [B, tiles]

  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    const at::NoGradGuard no_grad;  // grad mode is thread-local: the workers need their own guard
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t lo = tile * tile_columns, hi = std::min(V, lo + tile_columns), cols = hi - lo;
      at::Tensor z = at::mm(h, weight.slice(0, lo, hi).to(at::kFloat).t()).contiguous();  // [B, cols]
      at::Tensor shift;
      if (bias.has_value()) shift = (bias->slice(0, lo, hi).to(at::kFloat) * inv_temp).contiguous();
      for (int64_t r = 0; r < B; ++r) {
        float* row = z.data_ptr<float>() + r * cols;
        scale_and_shift(row, shift.defined() ? shift.data_ptr<float>() : nullptr, inv_temp, cols);
        draws[r * tiles + tile] = draw_from_tile(row, cols, greedy, return_entropy, uniform(seed, r, tile, 0));
      }
    }
  });

  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor tokens = at::empty({B}, hidden.options().dtype(at::kLong));
  at::Tensor logp = at::empty({B}, f32), entropy = at::empty({return_entropy ? B : 0}, f32);
  int64_t* tokens_p = tokens.data_ptr<int64_t>();
  float *logp_p = logp.data_ptr<float>(), *entropy_p = entropy.data_ptr<float>();
  for (int64_t r = 0; r < B; ++r) {
    SegmentStats total{-std::numeric_limits<float>::infinity(), 0.f, 0.f};
    int64_t winner = 0;
    float best_key = -std::numeric_limits<float>::infinity();
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const TileDraw& d = draws[r * tiles + tile];
      merge_stats(total, d.stats);
      // greedy: the largest logit; sampling: Gumbel-max on the tile's log-mass log(s) + m
      const float key = greedy ? d.z_candidate
                               : d.stats.m + std::log(d.stats.s) - std::log(-std::log(uniform(seed, r, tile, 1)));
      if (key > best_key) best_key = key, winner = tile;
    }
    const TileDraw& d = draws[r * tiles + winner];
    const float log_s = std::log(total.s);
    tokens_p[r] = winner * tile_columns + d.candidate;
    logp_p[r] = d.z_candidate - (total.m + log_s);
    if (return_entropy) entropy_p[r] = total.t / total.s + log_s;
  }
  return {tokens, logp, entropy};
}

}  // namespace

TORCH_LIBRARY_IMPL(hypo_fast, CPU, m) {
  m.impl("sample_head", &sample_head);
}

}  // namespace hypo_fast
