// Schemas of hypo_fast's native CPU ops. Each is one op to the dispatcher (and to torch.compile, with
// the fake implementations in hypo_fast/native.py); the CPU kernels live beside this file.
// Optional outputs that were not requested come back as empty tensors. The chunk and tile sizes are
// arguments so that Python owns the defaults (and tests can force many chunks at small shapes).
#include <torch/library.h>

#include <string>

namespace {
// The torch version this library was compiled against (its C++ ABI is only stable within one).
std::string built_with() { return HYPO_FAST_TORCH_VERSION; }
}  // namespace

TORCH_LIBRARY(hypo_fast, m) {
  m.def("built_with() -> str", &built_with);
  m.def(
      "linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, float temperature, "
      "int ignore_index, bool return_entropy, bool return_logit_mean, bool return_top1, int chunk_elements, "
      "int min_chunk) -> (Tensor logp, Tensor lse, Tensor entropy, Tensor logit_mean, Tensor is_top1)");
  m.def(
      "linear_logprobs_bwd(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor lse, "
      "Tensor grad_logp, Tensor? entropy, Tensor? grad_entropy, float temperature, int ignore_index, "
      "bool want_hidden, bool want_weight, bool want_bias, bool fp32_weight_grad, int chunk_elements, "
      "int min_chunk) "
      "-> (Tensor d_hidden, Tensor d_weight, Tensor d_bias)");
  m.def(
      "sample_head(Tensor hidden, Tensor weight, Tensor? bias, float temperature, int seed, bool greedy, "
      "bool return_entropy, int tile) -> (Tensor tokens, Tensor logp, Tensor entropy)");
}
