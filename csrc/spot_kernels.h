// Raw-pointer launchers of the CUDA kernels (implemented in spot_kernels.cu).
//
// Torch-free and CUDA-header-free on purpose: the torch glue (spot_ops_cuda.cpp) includes this,
// and spot_kernels.cu compiles with plain nvcc in seconds (see csrc/README.md, "compile check").
// Every launcher returns nullptr on success or a static error string from the CUDA runtime.
#pragma once

#include <stdint.h>

#include "spot_math.h"

namespace spot {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// logits [n, V] (dtype dt, contiguous), targets [n] int64. out is [3, n] in the accumulation type
// (double for kFloat64, float otherwise): rows = local max, local sum exp(x - max), target logit
// (0 where the target is not in this shard). Columns >= valid_local are vocabulary padding.
const char* launch_token_stats(DType dt, const void* logits, const int64_t* targets, int64_t n, int64_t V,
                               int64_t valid_local, int64_t vocab_start, int64_t ignore_index, void* out,
                               void* stream);

// grad_logits[i, j] = g[i] * (onehot(t_i)[j] - exp((x[i, j] - m[i]) - logs[i])) for j < valid_local, 0 beyond,
// where m is the global max and logs = log(global sum exp(x - m)); subtracting m first keeps the
// softmax exact for large-magnitude logits. g, m, logs are [n] in the accumulation type. out may alias
// logits (in-place backward).
const char* launch_token_grad(DType dt, const void* logits, void* out, const int64_t* targets, const void* g,
                              const void* m, const void* logs, int64_t n, int64_t V, int64_t valid_local, int64_t vocab_start,
                              int64_t ignore_index, void* stream);

// token_logps, loss_mask [2B, L]; ref_logps [2B]; delta: a 1-element device tensor. dt is kFloat32
// or kFloat64 for all of them. Outputs: losses [4, B], seq [2B], rewards [2B], coef [2B].
const char* launch_pair_loss(DType dt, const void* token_logps, const void* loss_mask, const void* ref_logps,
                             const void* delta, int64_t B, int64_t L, double beta, double label_smoothing,
                             PairWeights weights, void* losses, void* seq, void* rewards, void* coef, void* stream);

// grad_token[i, l] = grad_pair[i mod B] * coef[i] * mask[i, l] (0 where mask == 0).
const char* launch_pair_grad(DType dt, const void* grad_pair, const void* coef, const void* loss_mask, int64_t B,
                             int64_t L, void* out, void* stream);

}  // namespace cuda
}  // namespace spot
