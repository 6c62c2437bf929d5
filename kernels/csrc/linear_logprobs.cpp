// CPU forward and backward of linear_logprobs: the same two-pass algorithm as the Triton kernels
// (kernels/linear_logprobs.py), on cache-resident row blocks.
//
// The vocabulary is walked in chunks of C rows of W (the chunk is small enough to stay in the
// last-level cache). Per chunk, threads own blocks of BN token rows: each computes its [BN, C] logits
// block with one single-threaded GEMM and folds it into per-row statistics while the block is still
// in L2, so the elementwise work never leaves the cache. The backward turns the block into
// dz = g·(onehot − p) − g_H·p·(log p + H) in place, adds dz·W_c into its own rows of dh, and, after the
// chunk, one multithreaded GEMM forms dW_c = dzᵀ·h. Statistics and accumulation are fp32; GEMMs run in
// fp32 (bf16/fp16 inputs are widened one chunk at a time, as in the PyTorch path).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "row_stats.h"

namespace hypo_fast {
namespace {

constexpr int64_t kMaxBlockRows = 128;

// Columns per vocabulary chunk: about chunk_elements logits for all rows (the PyTorch path's rule).
int64_t chunk_columns(int64_t rows, int64_t vocab, int64_t chunk_elements, int64_t min_chunk) {
  TORCH_CHECK(chunk_elements > 0 && min_chunk > 0, "chunk_elements and min_chunk must be positive");
  return std::min(vocab, std::max(min_chunk, chunk_elements / std::max<int64_t>(rows, 1)));
}

// Rows per block: enough blocks for every thread, at most kMaxBlockRows, a multiple of 8.
int64_t block_rows(int64_t rows) {
  const int64_t per_thread = (rows + at::get_num_threads() - 1) / at::get_num_threads();
  return std::max<int64_t>(8, std::min(kMaxBlockRows, (per_thread + 7) / 8 * 8));
}

// Everything both passes need about the non-ignored rows.
struct ValidRows {
  at::Tensor index;   // [n] positions in the input
  at::Tensor hidden;  // [n, D] fp32, unscaled
  at::Tensor target;  // [n] int64
};

ValidRows gather_valid_rows(const at::Tensor& hidden, const at::Tensor& targets, int64_t ignore_index) {
  at::Tensor index = targets.ne(ignore_index).nonzero().squeeze(1);
  return {index, hidden.index_select(0, index).to(at::kFloat).contiguous(),
          targets.index_select(0, index).to(at::kLong)};
}

// z_y = (h·W[y] + b[y]) / τ for each valid row, in fp32.
at::Tensor target_logits(const ValidRows& rows, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         double inv_temp) {
  at::Tensor z = (rows.hidden * weight.index_select(0, rows.target).to(at::kFloat)).sum(-1);  // [n]
  if (bias.has_value()) z = z + bias->index_select(0, rows.target).to(at::kFloat);
  return z * inv_temp;
}

at::Tensor scatter_rows(const at::Tensor& values, const at::Tensor& index, int64_t total) {
  return at::zeros({total}, values.options()).index_copy_(0, index, values);
}

// The chunk's bias, pre-scaled by 1/τ, as fp32 (undefined without a bias).
at::Tensor chunk_shift(const c10::optional<at::Tensor>& bias, int64_t lo, int64_t hi, double inv_temp) {
  if (!bias.has_value()) return at::Tensor();
  return (bias->slice(0, lo, hi).to(at::kFloat) * inv_temp).contiguous();
}

// The Python entry (hypo_fast.linear_logprobs) validates arguments with messages that name them; these
// checks keep direct torch.ops.hypo_fast calls from reading out of bounds.
void check_shapes(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden must be [N, D] and weight [V, D], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "targets must be [N=", hidden.size(0),
              "], got ", targets.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)), "bias must be [V=",
              weight.size(0), "]");
}

// Calls fn(r0, r1) for row blocks of the valid rows, one thread per block range (ATen/OpenMP).
template <typename Fn>
void for_row_blocks(int64_t rows, int64_t block, const Fn& fn) {
  const int64_t blocks = (rows + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const at::NoGradGuard no_grad;  // grad mode is thread-local: the workers need their own guard
    for (int64_t b = b0; b < b1; ++b) fn(b * block, std::min(rows, (b + 1) * block));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const c10::optional<at::Tensor>& bias, double temperature, int64_t ignore_index, bool return_entropy,
    bool return_logit_mean, bool return_top1, int64_t chunk_elements, int64_t min_chunk) {
  const at::NoGradGuard no_grad;  // differentiated by its autograd.Function (ops/linear_logprobs.py)
  check_shapes(hidden, weight, targets, bias);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const ValidRows rows = gather_valid_rows(hidden, targets, ignore_index);
  const int64_t n = rows.hidden.size(0);

  std::vector<SegmentStats> stats(n, SegmentStats{-std::numeric_limits<float>::infinity(), 0.f, 0.f});
  std::vector<float> sum_z(return_logit_mean ? n : 0, 0.f);
  std::vector<float> z_tgt(return_top1 ? n : 0, 0.f);  // the target's logit as its chunk holds it (vs stats.m)
  const int64_t* tgt = rows.target.data_ptr<int64_t>();
  const int64_t C = chunk_columns(n, V, chunk_elements, min_chunk), BN = block_rows(n);
  for (int64_t lo = 0; lo < V && n > 0; lo += C) {
    const int64_t hi = std::min(V, lo + C), cols = hi - lo;
    const at::Tensor w_chunk = weight.slice(0, lo, hi).to(at::kFloat).contiguous();  // [cols, D]
    const at::Tensor shift = chunk_shift(bias, lo, hi, inv_temp);
    const float* shift_ptr = shift.defined() ? shift.data_ptr<float>() : nullptr;
    for_row_blocks(n, BN, [&](int64_t r0, int64_t r1) {
      at::Tensor z = at::mm(rows.hidden.slice(0, r0, r1), w_chunk.t());  // [r1−r0, cols], single-threaded here
      float* zp = z.data_ptr<float>();
      for (int64_t r = r0; r < r1; ++r) {
        float* row = zp + (r - r0) * cols;
        scale_and_shift(row, shift_ptr, inv_temp, cols);
        if (return_logit_mean) sum_z[r] += row_sum(row, cols);
        if (return_top1 && tgt[r] >= lo && tgt[r] < hi) z_tgt[r] = row[tgt[r] - lo];
        merge_stats(stats[r], segment_stats(row, cols, return_entropy, /*store_exp=*/false));
      }
    });
  }

  at::Tensor lse = at::empty({n}, hidden.options().dtype(at::kFloat));
  at::Tensor entropy = at::empty({return_entropy ? n : 0}, lse.options());
  float *lse_p = lse.data_ptr<float>(), *entropy_p = entropy.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    const float log_s = std::log(stats[r].s);
    lse_p[r] = stats[r].m + log_s;
    if (return_entropy) entropy_p[r] = stats[r].t / stats[r].s + log_s;
  }
  at::Tensor logp = target_logits(rows, weight, bias, inv_temp) - lse;
  at::Tensor logit_mean, is_top1;
  if (return_logit_mean) {
    logit_mean = scatter_rows(at::tensor(sum_z, lse.options()) / static_cast<double>(V), rows.index, N);
  }
  if (return_top1) {  // exact: stats.m is the max of the same chunk values the target's logit was read from
    at::Tensor top1 = at::empty({n}, lse.options().dtype(at::kBool));
    bool* top1_p = top1.data_ptr<bool>();
    for (int64_t r = 0; r < n; ++r) top1_p[r] = z_tgt[r] >= stats[r].m;
    is_top1 = scatter_rows(top1, rows.index, N);
  }
  return {scatter_rows(logp, rows.index, N), scatter_rows(lse, rows.index, N),
          return_entropy ? scatter_rows(entropy, rows.index, N) : at::empty({0}, lse.options()),
          return_logit_mean ? logit_mean : at::empty({0}, lse.options()),
          return_top1 ? is_top1 : at::empty({0}, lse.options().dtype(at::kBool))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const c10::optional<at::Tensor>& bias, const at::Tensor& lse_all, const at::Tensor& grad_logp,
    const c10::optional<at::Tensor>& entropy_all, const c10::optional<at::Tensor>& grad_entropy,
    double temperature, int64_t ignore_index, bool want_h, bool want_w, bool want_b, bool fp32_weight_grad,
    int64_t chunk_elements, int64_t min_chunk) {
  const at::NoGradGuard no_grad;  // differentiated by its autograd.Function (ops/linear_logprobs.py)
  (void)fp32_weight_grad;  // CPU accumulates dW in fp32 always (cast once at the end)
  check_shapes(hidden, weight, targets, bias);
  TORCH_CHECK(lse_all.numel() == hidden.size(0) && grad_logp.numel() == hidden.size(0), "lse and grad_logp must be [N]");
  want_b = want_b && bias.has_value();
  const int64_t V = weight.size(0), D = weight.size(1);
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const ValidRows rows = gather_valid_rows(hidden, targets, ignore_index);
  const int64_t n = rows.hidden.size(0);
  const at::Tensor lse = lse_all.index_select(0, rows.index).contiguous();
  const at::Tensor g = (grad_logp.index_select(0, rows.index).to(at::kFloat) * inv_temp).contiguous();  // 1/τ folded in
  const bool with_entropy = grad_entropy.has_value();
  at::Tensor g_ent, ent;
  if (with_entropy) {
    g_ent = (grad_entropy->index_select(0, rows.index).to(at::kFloat) * inv_temp).contiguous();
    ent = entropy_all->index_select(0, rows.index).contiguous();
  }
  const float *lse_p = lse.data_ptr<float>(), *g_p = g.data_ptr<float>();
  const float* g_ent_p = with_entropy ? g_ent.data_ptr<float>() : nullptr;
  const float* ent_p = with_entropy ? ent.data_ptr<float>() : nullptr;

  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor dh = want_h ? at::zeros({n, D}, f32) : at::Tensor();
  at::Tensor dw = want_w ? at::zeros({V, D}, f32) : at::Tensor();
  at::Tensor db = want_b ? at::zeros({V}, f32) : at::Tensor();
  const int64_t C = chunk_columns(n, V, chunk_elements, min_chunk), BN = block_rows(n);
  at::Tensor dz_buffer = at::empty({n * C}, f32);  // the chunk's dz, read again by the dW GEMM
  for (int64_t lo = 0; lo < V && n > 0; lo += C) {
    const int64_t hi = std::min(V, lo + C), cols = hi - lo;
    const at::Tensor w_chunk = weight.slice(0, lo, hi).to(at::kFloat).contiguous();  // [cols, D]
    const at::Tensor shift = chunk_shift(bias, lo, hi, inv_temp);
    const float* shift_ptr = shift.defined() ? shift.data_ptr<float>() : nullptr;
    at::Tensor dz = dz_buffer.narrow(0, 0, n * cols).view({n, cols});
    for_row_blocks(n, BN, [&](int64_t r0, int64_t r1) {
      at::Tensor dz_rows = dz.slice(0, r0, r1);  // contiguous [r1−r0, cols]
      at::mm_out(dz_rows, rows.hidden.slice(0, r0, r1), w_chunk.t());
      for (int64_t r = r0; r < r1; ++r) {
        float* row = dz_rows.data_ptr<float>() + (r - r0) * cols;
        scale_and_shift(row, shift_ptr, inv_temp, cols);
        // dz = −p·(g + g_H·(log p + H)), with log p = z − lse
        const Vec vlse(lse_p[r]), vg(g_p[r]), vgh(with_entropy ? g_ent_p[r] : 0.f), vh(with_entropy ? ent_p[r] : 0.f);
        int64_t i = 0;
        for (; i + Vec::size() <= cols; i += Vec::size()) {
          const Vec log_p = Vec::loadu(row + i) - vlse;
          const Vec coef = with_entropy ? at::vec::fmadd(vgh, log_p + vh, vg) : vg;
          (log_p.exp() * coef).neg().store(row + i);
        }
        for (; i < cols; ++i) {
          const float log_p = row[i] - lse_p[r];
          const float coef = with_entropy ? g_p[r] + g_ent_p[r] * (log_p + ent_p[r]) : g_p[r];
          row[i] = -std::exp(log_p) * coef;
        }
      }
      if (want_h) dh.slice(0, r0, r1).addmm_(dz_rows, w_chunk);  // these rows are this thread's alone
    });
    if (want_w) {
      at::Tensor dw_chunk = dw.slice(0, lo, hi);
      at::mm_out(dw_chunk, dz.t(), rows.hidden);  // multithreaded GEMM, outside the row-block region
    }
    if (want_b) db.slice(0, lo, hi).copy_(dz.sum(0));
  }

  // the true-class term +g·onehot, exactly and once
  if (want_h && n > 0) dh.add_(g.unsqueeze(1) * weight.index_select(0, rows.target).to(at::kFloat));
  if (want_w && n > 0) dw.index_add_(0, rows.target, g.unsqueeze(1) * rows.hidden);
  if (want_b && n > 0) db.index_add_(0, rows.target, g);

  at::Tensor d_hidden = want_h ? at::zeros_like(hidden).index_copy_(0, rows.index, dh.to(hidden.scalar_type()))
                               : at::empty({0}, hidden.options());
  at::Tensor d_weight = want_w ? dw.to(weight.scalar_type()) : at::empty({0}, weight.options());
  at::Tensor d_bias = want_b ? db.to(bias->scalar_type()) : at::empty({0}, weight.options());
  return {d_hidden, d_weight, d_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(hypo_fast, CPU, m) {
  m.impl("linear_logprobs_fwd", &linear_logprobs_fwd);
  m.impl("linear_logprobs_bwd", &linear_logprobs_bwd);
}

}  // namespace hypo_fast
