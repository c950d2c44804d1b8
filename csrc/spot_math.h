// Shared math of the megatron_spot kernels: torch-free, `__host__ __device__` inline functions.
//
// Both the CUDA kernels (spot_kernels.cu) and the CPU kernels (spot_ops_cpu.cpp) call exactly these
// functions, so the two implementations cannot drift apart. Nothing here may include a torch
// header: that keeps `nvcc -c spot_kernels.cu` a 2-second, torch-free compile-check.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define SPOT_HD __host__ __device__ __forceinline__
#else
#define SPOT_HD inline
#endif

namespace spot {

// Pairwise objectives computed by the fused pair kernel. The order is part of the op's contract
// (megatron_spot/ops/_api.py PAIR_OBJECTIVES mirrors it).
enum PairObjective : int {
  kSpotBco = 0,    // -log s(r+ - delta) - log s(-(r- - delta))
  kSpotBce = 1,    // -log s(r+) - log s(-r-)
  kDpo = 2,        // -(1-eps) log s(r+ - r-) - eps log s(-(r+ - r-))
  kRewardSft = 3,  // -log s(r+)
  kNumPairObjectives = 4,
};

struct PairWeights {
  double w[kNumPairObjectives];
};

// ---------------------------------------------------------------------------------------------
// exp / log in the accumulation type. Device float uses the fast hardware exp (the kernels are
// memory-bound; relative error ~2^-21 on the range used, x <= 0). Host float uses std::exp for
// scalar merges; the vectorised CPU loops use cpu_exp_f32 below.
SPOT_HD float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return expf(x);
#endif
}
SPOT_HD double exp_acc(double x) { return exp(x); }
SPOT_HD float log_acc(float x) { return logf(x); }
SPOT_HD double log_acc(double x) { return log(x); }
SPOT_HD float log1p_acc(float x) { return log1pf(x); }
SPOT_HD double log1p_acc(double x) { return log1p(x); }

template <typename acc_t>
SPOT_HD acc_t neg_inf() {
  return static_cast<acc_t>(-INFINITY);
}

// Online log-sum-exp state: (m, s) stands for sum_j exp(x_j) = s * exp(m). m == -inf (s == 0) is
// the empty set. Merging is associative and commutative, so per-thread / per-chunk states can be
// combined in any order (warp shuffles, block reductions, CPU chunks, TP ranks).
template <typename acc_t>
SPOT_HD void lse_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  if (!(m2 > neg_inf<acc_t>())) return;  // other side empty (or NaN max: cannot happen with s2 set)
  if (!(m > neg_inf<acc_t>())) {
    m = m2;
    s = s2;
    return;
  }
  if (m2 > m) {
    s = s * exp_acc(m - m2) + s2;
    m = m2;
  } else {
    s = s + s2 * exp_acc(m2 - m);
  }
}

// Final per-token log-prob from global max m, global sum s (relative to m), and the target logit.
template <typename acc_t>
SPOT_HD acc_t logprob_from_stats(acc_t m, acc_t s, acc_t target_logit) {
  return target_logit - m - log_acc(s);
}

// Whether target t is a real (non-ignored) vocabulary entry that lives in this rank's shard
// [vocab_start, vocab_start + valid_local). valid_local already excludes vocabulary padding.
SPOT_HD bool target_in_shard(int64_t t, int64_t ignore_index, int64_t vocab_start, int64_t valid_local) {
  return t != ignore_index && t >= vocab_start && t < vocab_start + valid_local;
}

// ---------------------------------------------------------------------------------------------
// Numerically stable logistic helpers.
template <typename T>
SPOT_HD T softplus(T x) {  // log(1 + exp(x))
  const T ax = x < T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + log1p_acc(exp_acc(-ax));
}
template <typename T>
SPOT_HD T sigmoid(T x) {
  if (x >= T(0)) {
    return T(1) / (T(1) + exp_acc(-x));
  }
  const T e = exp_acc(x);
  return e / (T(1) + e);
}

// Per-pair losses and their derivatives with respect to the chosen reward rc = r+ and the rejected
// reward rr = r-. -log s(x) = softplus(-x), d/dx = -s(-x).
template <typename T>
SPOT_HD void pair_objectives(T rc, T rr, T delta, T eps, T* loss, T* d_rc, T* d_rr) {
  // spot-bco
  {
    const T a = rc - delta, b = rr - delta;
    loss[kSpotBco] = softplus(-a) + softplus(b);
    d_rc[kSpotBco] = -sigmoid(-a);
    d_rr[kSpotBco] = sigmoid(b);
  }
  // spot-bce
  {
    loss[kSpotBce] = softplus(-rc) + softplus(rr);
    d_rc[kSpotBce] = -sigmoid(-rc);
    d_rr[kSpotBce] = sigmoid(rr);
  }
  // dpo (sigmoid) with label smoothing eps
  {
    const T mgn = rc - rr;
    loss[kDpo] = (T(1) - eps) * softplus(-mgn) + eps * softplus(mgn);
    const T dm = -(T(1) - eps) * sigmoid(-mgn) + eps * sigmoid(mgn);
    d_rc[kDpo] = dm;
    d_rr[kDpo] = -dm;
  }
  // reward-sft (positive term only)
  {
    loss[kRewardSft] = softplus(-rc);
    d_rc[kRewardSft] = -sigmoid(-rc);
    d_rr[kRewardSft] = T(0);
  }
}

// Everything the pair kernel computes for pair p once the two masked sequence sums are known.
// losses is [kNumPairObjectives, B] (row-major), seq/rewards/coef are [2B] with chosen rows first.
// coef[i] = d(sum_k w_k loss_k[p]) / d seq_logp[i] (beta included).
template <typename T>
SPOT_HD void pair_finish(int64_t p, int64_t B, T seq_c, T seq_r, T ref_c, T ref_r, T beta, T delta, T eps,
                         const PairWeights& w, T* losses, T* seq, T* rewards, T* coef) {
  const T rc = beta * (seq_c - ref_c);
  const T rr = beta * (seq_r - ref_r);
  T loss[kNumPairObjectives], d_rc[kNumPairObjectives], d_rr[kNumPairObjectives];
  pair_objectives<T>(rc, rr, delta, eps, loss, d_rc, d_rr);
  T gc = T(0), gr = T(0);
  for (int k = 0; k < kNumPairObjectives; ++k) {
    losses[k * B + p] = loss[k];
    gc += static_cast<T>(w.w[k]) * d_rc[k];
    gr += static_cast<T>(w.w[k]) * d_rr[k];
  }
  seq[p] = seq_c;
  seq[B + p] = seq_r;
  rewards[p] = rc;
  rewards[B + p] = rr;
  coef[p] = beta * gc;
  coef[B + p] = beta * gr;
}

// Masked contribution of one token to its sequence sum (a masked-out -inf log-prob adds 0, not NaN).
template <typename T>
SPOT_HD T masked_term(T logp, T mask) {
  return mask != T(0) ? logp * mask : T(0);
}

// ---------------------------------------------------------------------------------------------
// bf16 <-> fp32 bit conversions (host side; the device uses cuda_bf16.h intrinsics).
#if !defined(__CUDACC__) && defined(__GNUC__)
__attribute__((always_inline))
#endif
SPOT_HD float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
#if !defined(__CUDACC__) && defined(__GNUC__)
__attribute__((always_inline))
#endif
SPOT_HD uint16_t float_to_bf16_bits(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  const uint32_t r = u + 0x7FFFu + ((u >> 16) & 1u);
  const uint16_t h = static_cast<uint16_t>(r >> 16);
  return (f != f) ? static_cast<uint16_t>(0x7FC0u) : h;
}

#if !defined(__CUDA_ARCH__)
// Branch-free exp for the vectorised CPU loops (GCC/Clang auto-vectorise it under `omp simd`).
// Cody-Waite range reduction + degree-6 Taylor polynomial on |r| <= ln2/2: relative error < 2e-7.
// Returns exactly 0 for x < -87.3 (so -inf -> 0) and propagates NaN.
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline float cpu_exp_f32(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;
  const float kLn2Lo = 1.42860682030941723212e-6f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float nf = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - nf * kLn2Hi) - nf * kLn2Lo;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(nf) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x < -87.3f ? 0.0f : y;
}
#endif

}  // namespace spot
