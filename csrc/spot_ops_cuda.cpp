// CUDA implementations of the megatron_spot ops: validation + allocation here (host C++), the
// kernels behind raw-pointer launchers in spot_kernels.cu. Built only by the CUDA extension.
//
// Only c10/cuda/CUDAStream.h and CUDAGuard.h are included (not ATen/cuda/CUDAContext.h, which drags
// in cuSPARSE/cuBLAS headers); see csrc/README.md.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "spot_kernels.h"
#include "spot_ops.h"

namespace spot {
namespace cuda_glue {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kHalf:
      return cuda::DType::kFloat16;
    default:
      TORCH_CHECK(false, "megatron_spot: unsupported dtype ", t);
  }
}

void* stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void check_launch(const char* op, const char* err) {
  TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err);
}

void check_rows(const char* op, int64_t n) {
  TORCH_CHECK(n <= 2147483647LL, op, ": at most 2^31-1 token rows per call, got ", n);
}

at::Tensor token_logprobs_stats_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                                     int64_t valid_local, int64_t ignore_index) {
  const char* op = "megatron_spot::token_logprobs_stats";
  check_token_inputs(op, logits, targets, vocab_start, valid_local);
  check_rows(op, logits.size(0));
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), V = logits.size(1);
  at::Tensor out = at::empty({3, n}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  check_launch(op, cuda::launch_token_stats(to_dtype(logits.scalar_type()), logits.data_ptr(),
                                            targets.data_ptr<int64_t>(), n, V, valid_local, vocab_start,
                                            ignore_index, out.data_ptr(), stream_of(logits)));
  return out;
}

void grad_into(const char* op, const at::Tensor& logits, const at::Tensor& out, const at::Tensor& targets,
               const at::Tensor& g, const at::Tensor& m, const at::Tensor& logs, int64_t vocab_start, int64_t valid_local,
               int64_t ignore_index) {
  check_rows(op, logits.size(0));
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(op, cuda::launch_token_grad(to_dtype(logits.scalar_type()), logits.data_ptr(), out.data_ptr(),
                                           targets.data_ptr<int64_t>(), g.data_ptr(), m.data_ptr(), logs.data_ptr(),
                                           logits.size(0), logits.size(1), valid_local, vocab_start, ignore_index,
                                           stream_of(logits)));
}

at::Tensor token_logprobs_grad_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& g,
                                    const at::Tensor& m, const at::Tensor& logs, int64_t vocab_start, int64_t valid_local,
                                    int64_t ignore_index) {
  const char* op = "megatron_spot::token_logprobs_grad";
  check_grad_inputs(op, logits, targets, g, m, logs, vocab_start, valid_local);
  at::Tensor out = at::empty_like(logits);
  grad_into(op, logits, out, targets, g, m, logs, vocab_start, valid_local, ignore_index);
  return out;
}

void token_logprobs_grad_inplace_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& g,
                                      const at::Tensor& m, const at::Tensor& logs, int64_t vocab_start, int64_t valid_local,
                                      int64_t ignore_index) {
  const char* op = "megatron_spot::token_logprobs_grad_";
  check_grad_inputs(op, logits, targets, g, m, logs, vocab_start, valid_local);
  grad_into(op, logits, logits, targets, g, m, logs, vocab_start, valid_local, ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_loss_cuda(const at::Tensor& lp,
                                                                          const at::Tensor& mask,
                                                                          const at::Tensor& ref,
                                                                          const at::Tensor& delta, double beta,
                                                                          double label_smoothing,
                                                                          c10::ArrayRef<double> weights) {
  const char* op = "megatron_spot::pair_loss";
  check_pair_inputs(op, lp, mask, ref, delta);
  const PairWeights w = pair_weights(op, weights);
  const c10::cuda::CUDAGuard guard(lp.device());
  const int64_t B = lp.size(0) / 2, L = lp.size(1);
  at::Tensor losses = at::empty({kNumPairObjectives, B}, lp.options());
  at::Tensor seq = at::empty({2 * B}, lp.options());
  at::Tensor rewards = at::empty({2 * B}, lp.options());
  at::Tensor coef = at::empty({2 * B}, lp.options());
  const at::Tensor d = delta.contiguous();
  check_launch(op, cuda::launch_pair_loss(to_dtype(lp.scalar_type()), lp.data_ptr(), mask.data_ptr(), ref.data_ptr(),
                                          d.data_ptr(), B, L, beta, label_smoothing, w, losses.data_ptr(),
                                          seq.data_ptr(), rewards.data_ptr(), coef.data_ptr(), stream_of(lp)));
  return {losses, seq, rewards, coef};
}

at::Tensor pair_loss_grad_cuda(const at::Tensor& gp, const at::Tensor& coef, const at::Tensor& mask) {
  const char* op = "megatron_spot::pair_loss_grad";
  check_pair_grad_inputs(op, gp, coef, mask);
  const c10::cuda::CUDAGuard guard(mask.device());
  at::Tensor out = at::empty_like(mask);
  check_launch(op, cuda::launch_pair_grad(to_dtype(mask.scalar_type()), gp.data_ptr(), coef.data_ptr(),
                                          mask.data_ptr(), mask.size(0) / 2, mask.size(1), out.data_ptr(),
                                          stream_of(mask)));
  return out;
}

}  // namespace
}  // namespace cuda_glue
}  // namespace spot

TORCH_LIBRARY_IMPL(megatron_spot, CUDA, m) {
  m.impl("token_logprobs_stats", &spot::cuda_glue::token_logprobs_stats_cuda);
  m.impl("token_logprobs_grad", &spot::cuda_glue::token_logprobs_grad_cuda);
  m.impl("token_logprobs_grad_", &spot::cuda_glue::token_logprobs_grad_inplace_cuda);
  m.impl("pair_loss", &spot::cuda_glue::pair_loss_cuda);
  m.impl("pair_loss_grad", &spot::cuda_glue::pair_loss_grad_cuda);
}
