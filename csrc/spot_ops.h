// Input validation and output allocation shared by the CPU (spot_ops.cpp) and CUDA
// (spot_ops_cuda.cpp) implementations of the megatron_spot ops. ATen-dependent, kernel-free.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "spot_math.h"

namespace spot {

inline bool is_logits_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_token_inputs(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                               int64_t vocab_start, int64_t valid_local) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [tokens, vocab_shard], got shape ", logits.sizes());
  TORCH_CHECK(is_logits_dtype(logits.scalar_type()), op,
              ": logits must be float32, bfloat16, float16 or float64, got ", logits.scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must be [", logits.size(0),
              "] to match logits ", logits.sizes(), ", got ", targets.sizes());
  TORCH_CHECK(targets.device() == logits.device(), op, ": targets are on ", targets.device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous (got strides ", logits.strides(), ")");
  TORCH_CHECK(targets.is_contiguous(), op, ": targets must be contiguous");
  TORCH_CHECK(valid_local >= 0 && valid_local <= logits.size(1), op, ": valid_local=", valid_local,
              " must lie in [0, ", logits.size(1), "]");
  TORCH_CHECK(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", vocab_start);
}

inline void check_grad_inputs(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                              const at::Tensor& g, const at::Tensor& m, const at::Tensor& logs, int64_t vocab_start,
                              int64_t valid_local) {
  check_token_inputs(op, logits, targets, vocab_start, valid_local);
  const auto acc = acc_dtype(logits.scalar_type());
  for (const at::Tensor* t : {&g, &m, &logs}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == logits.size(0), op, ": g, m and logs must be [", logits.size(0),
                "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == acc, op, ": g, m and logs must be ", acc, ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == logits.device(), op, ": g/m/logs are on ", t->device(), " but logits are on ",
                logits.device());
    TORCH_CHECK(t->is_contiguous(), op, ": g, m and logs must be contiguous");
  }
}

inline void check_pair_inputs(const char* op, const at::Tensor& lp, const at::Tensor& mask, const at::Tensor& ref,
                              const at::Tensor& delta) {
  TORCH_CHECK(lp.dim() == 2 && lp.size(0) % 2 == 0, op,
              ": token_logps must be [2B, L] (B chosen rows then B rejected rows), got ", lp.sizes());
  TORCH_CHECK(lp.scalar_type() == at::kFloat || lp.scalar_type() == at::kDouble, op,
              ": token_logps must be float32 or float64, got ", lp.scalar_type());
  TORCH_CHECK(mask.sizes() == lp.sizes(), op, ": loss_mask ", mask.sizes(), " must match token_logps ", lp.sizes());
  TORCH_CHECK(ref.dim() == 1 && ref.size(0) == lp.size(0), op, ": ref_logps must be [", lp.size(0), "], got ",
              ref.sizes());
  TORCH_CHECK(delta.numel() == 1, op, ": delta must have one element, got ", delta.sizes());
  for (const at::Tensor* t : {&mask, &ref, &delta}) {
    TORCH_CHECK(t->scalar_type() == lp.scalar_type(), op, ": loss_mask, ref_logps and delta must be ",
                lp.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == lp.device(), op, ": inputs on different devices (", t->device(), " vs ",
                lp.device(), ")");
  }
  TORCH_CHECK(lp.is_contiguous() && mask.is_contiguous() && ref.is_contiguous(), op,
              ": token_logps, loss_mask and ref_logps must be contiguous");
}

inline PairWeights pair_weights(const char* op, c10::ArrayRef<double> w) {
  TORCH_CHECK(w.size() == kNumPairObjectives, op, ": weights must have ", int(kNumPairObjectives),
              " entries (spot-bco, spot-bce, dpo, reward-sft), got ", w.size());
  PairWeights pw;
  for (int k = 0; k < kNumPairObjectives; ++k) pw.w[k] = w[k];
  return pw;
}

inline void check_pair_grad_inputs(const char* op, const at::Tensor& gp, const at::Tensor& coef,
                                   const at::Tensor& mask) {
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) % 2 == 0, op, ": loss_mask must be [2B, L], got ", mask.sizes());
  const int64_t B = mask.size(0) / 2;
  TORCH_CHECK(gp.dim() == 1 && gp.size(0) == B, op, ": grad must be [", B, "], got ", gp.sizes());
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == 2 * B, op, ": coef must be [", 2 * B, "], got ", coef.sizes());
  for (const at::Tensor* t : {&gp, &coef}) {
    TORCH_CHECK(t->scalar_type() == mask.scalar_type() && t->device() == mask.device() && t->is_contiguous(), op,
                ": grad and coef must be contiguous ", mask.scalar_type(), " on ", mask.device());
  }
  TORCH_CHECK(mask.is_contiguous(), op, ": loss_mask must be contiguous");
}

}  // namespace spot
