// CUDA kernels of megatron_spot: vocab-parallel token log-prob statistics and gradient, and the
// fused pairwise (SPoT / DPO) loss. Torch-free: raw pointers in, error string out.
//
// Memory traffic: the statistics kernel reads every logit once (one online max + sum-exp pass);
// the gradient kernel reads every logit once and writes the gradient once (in place if asked).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "spot_kernels.h"
#include "spot_math.h"

namespace spot {
namespace cuda {
namespace {

constexpr int kRowThreads = 512;
constexpr int kPairThreads = 256;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half(x); }
template <typename T>
__device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Block-wide merge of per-thread (max, sum-exp) states; the result is valid in thread 0.
template <typename acc_t>
__device__ void block_lse(acc_t& m, acc_t& s) {
  __shared__ acc_t sh_m[32];
  __shared__ acc_t sh_s[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < nwarps ? sh_m[lane] : neg_inf<acc_t>();
    s = lane < nwarps ? sh_s[lane] : acc_t(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
      lse_merge(m, s, m2, s2);
    }
  }
}

// Block-wide sum of two values; valid in thread 0.
template <typename acc_t>
__device__ void block_sum2(acc_t& a, acc_t& b) {
  __shared__ acc_t sh_a[32];
  __shared__ acc_t sh_b[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  if (lane == 0) {
    sh_a[warp] = a;
    sh_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < nwarps ? sh_a[lane] : acc_t(0);
    b = lane < nwarps ? sh_b[lane] : acc_t(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, off);
      b += __shfl_xor_sync(0xffffffffu, b, off);
    }
  }
}

// One block per token row. Each thread keeps an online (max, sum-exp) over its packs of N logits.
template <typename T, int N>
__global__ void __launch_bounds__(kRowThreads)
    token_stats_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets, int64_t n, int64_t V,
                       int64_t valid, int64_t vocab_start, int64_t ignore_index,
                       typename Acc<T>::type* __restrict__ out) {
  using acc_t = typename Acc<T>::type;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  acc_t m = neg_inf<acc_t>(), s = acc_t(0);
  const int64_t npack = (valid + N - 1) / N;  // V % N == 0, so the last pack stays inside the row
  for (int64_t p = threadIdx.x; p < npack; p += blockDim.x) {
    const Pack<T, N> pk = reinterpret_cast<const Pack<T, N>*>(x)[p];
    acc_t v[N];
    acc_t pm = neg_inf<acc_t>();
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v[k] = (p * N + k < valid) ? to_acc(pk.v[k]) : neg_inf<acc_t>();
      pm = v[k] > pm ? v[k] : pm;
    }
    if (!(pm > neg_inf<acc_t>())) continue;
    const acc_t nm = pm > m ? pm : m;
    acc_t ps = acc_t(0);
#pragma unroll
    for (int k = 0; k < N; ++k) ps += exp_acc(v[k] - nm);
    s = s * exp_acc(m - nm) + ps;
    m = nm;
  }
  block_lse(m, s);
  if (threadIdx.x == 0) {
    const int64_t t = targets[row];
    acc_t tl = acc_t(0);
    if (target_in_shard(t, ignore_index, vocab_start, valid)) tl = to_acc(x[t - vocab_start]);
    out[row] = m;
    out[n + row] = s;
    out[2 * n + row] = tl;
  }
}

// One block per token row; out may alias logits: every element is read and written by the same
// thread, and the one-hot term is applied per element, so there is no cross-thread hazard.
template <typename T, int N>
__global__ void __launch_bounds__(kRowThreads)
    token_grad_kernel(const T* logits, T* out, const int64_t* __restrict__ targets,
                      const typename Acc<T>::type* __restrict__ g, const typename Acc<T>::type* __restrict__ mx,
                      const typename Acc<T>::type* __restrict__ logs,
                      int64_t V, int64_t valid, int64_t vocab_start, int64_t ignore_index) {
  using acc_t = typename Acc<T>::type;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  T* y = out + row * V;
  const acc_t gi = g[row];
  const int64_t t = targets[row];
  const int64_t tloc = target_in_shard(t, ignore_index, vocab_start, valid) ? t - vocab_start : int64_t(-1);
  const int64_t npack = V / N;
  if (gi == acc_t(0)) {  // ignored token (or zero upstream gradient): a zero row
    Pack<T, N> z;
#pragma unroll
    for (int k = 0; k < N; ++k) z.v[k] = from_acc<T>(acc_t(0));
    for (int64_t p = threadIdx.x; p < npack; p += blockDim.x) reinterpret_cast<Pack<T, N>*>(y)[p] = z;
    return;
  }
  const acc_t m = mx[row], l = logs[row];
  for (int64_t p = threadIdx.x; p < npack; p += blockDim.x) {
    const Pack<T, N> pk = reinterpret_cast<const Pack<T, N>*>(x)[p];
    Pack<T, N> r;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int64_t col = p * N + k;
      acc_t gv = acc_t(0);
      if (col < valid) {
        const acc_t prob = exp_acc((to_acc(pk.v[k]) - m) - l);
        gv = col == tloc ? gi * (acc_t(1) - prob) : -gi * prob;
      }
      r.v[k] = from_acc<T>(gv);
    }
    reinterpret_cast<Pack<T, N>*>(y)[p] = r;
  }
}

// One block per pair p: masked sums of rows p (chosen) and B + p (rejected), then the pair math.
template <typename T>
__global__ void __launch_bounds__(kPairThreads)
    pair_loss_kernel(const T* __restrict__ lp, const T* __restrict__ mask, const T* __restrict__ ref,
                     const T* __restrict__ delta, int64_t B, int64_t L, T beta, T eps, PairWeights w,
                     T* __restrict__ losses, T* __restrict__ seq, T* __restrict__ rewards, T* __restrict__ coef) {
  const int64_t p = blockIdx.x;
  const T* lc = lp + p * L;
  const T* lr = lp + (B + p) * L;
  const T* mc = mask + p * L;
  const T* mr = mask + (B + p) * L;
  T sc = T(0), sr = T(0);
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    sc += masked_term(lc[j], mc[j]);
    sr += masked_term(lr[j], mr[j]);
  }
  block_sum2(sc, sr);
  if (threadIdx.x == 0) {
    pair_finish<T>(p, B, sc, sr, ref[p], ref[B + p], beta, delta[0], eps, w, losses, seq, rewards, coef);
  }
}

template <typename T>
__global__ void pair_grad_kernel(const T* __restrict__ grad_pair, const T* __restrict__ coef,
                                 const T* __restrict__ mask, int64_t B, int64_t L, T* __restrict__ out) {
  const int64_t total = 2 * B * L;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / L;
    const T mk = mask[i];
    out[i] = mk != T(0) ? grad_pair[row % B] * coef[row] * mk : T(0);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <typename T>
const char* stats_typed(const void* logits, const int64_t* targets, int64_t n, int64_t V, int64_t valid,
                        int64_t vocab_start, int64_t ignore_index, void* out, cudaStream_t st) {
  using acc_t = typename Acc<T>::type;
  constexpr int N = 16 / sizeof(T);
  if (n == 0) return nullptr;
  const T* x = static_cast<const T*>(logits);
  acc_t* o = static_cast<acc_t*>(out);
  if (V % N == 0 && aligned16(x)) {
    token_stats_kernel<T, N><<<n, kRowThreads, 0, st>>>(x, targets, n, V, valid, vocab_start, ignore_index, o);
  } else {
    token_stats_kernel<T, 1><<<n, kRowThreads, 0, st>>>(x, targets, n, V, valid, vocab_start, ignore_index, o);
  }
  return last_error();
}

template <typename T>
const char* grad_typed(const void* logits, void* out, const int64_t* targets, const void* g, const void* mx,
                       const void* logs, int64_t n, int64_t V, int64_t valid, int64_t vocab_start, int64_t ignore_index,
                       cudaStream_t st) {
  using acc_t = typename Acc<T>::type;
  constexpr int N = 16 / sizeof(T);
  if (n == 0) return nullptr;
  const T* x = static_cast<const T*>(logits);
  T* y = static_cast<T*>(out);
  const acc_t* gp = static_cast<const acc_t*>(g);
  const acc_t* mp = static_cast<const acc_t*>(mx);
  const acc_t* lp = static_cast<const acc_t*>(logs);
  if (V % N == 0 && aligned16(x) && aligned16(y)) {
    token_grad_kernel<T, N><<<n, kRowThreads, 0, st>>>(x, y, targets, gp, mp, lp, V, valid, vocab_start, ignore_index);
  } else {
    token_grad_kernel<T, 1><<<n, kRowThreads, 0, st>>>(x, y, targets, gp, mp, lp, V, valid, vocab_start, ignore_index);
  }
  return last_error();
}

template <typename T>
const char* pair_loss_typed(const void* lp, const void* mask, const void* ref, const void* delta, int64_t B,
                            int64_t L, double beta, double eps, PairWeights w, void* losses, void* seq,
                            void* rewards, void* coef, cudaStream_t st) {
  if (B == 0) return nullptr;
  pair_loss_kernel<T><<<B, kPairThreads, 0, st>>>(
      static_cast<const T*>(lp), static_cast<const T*>(mask), static_cast<const T*>(ref),
      static_cast<const T*>(delta), B, L, static_cast<T>(beta), static_cast<T>(eps), w, static_cast<T*>(losses),
      static_cast<T*>(seq), static_cast<T*>(rewards), static_cast<T*>(coef));
  return last_error();
}

template <typename T>
const char* pair_grad_typed(const void* grad_pair, const void* coef, const void* mask, int64_t B, int64_t L,
                            void* out, cudaStream_t st) {
  const int64_t total = 2 * B * L;
  if (total == 0) return nullptr;
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;
  pair_grad_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, st>>>(
      static_cast<const T*>(grad_pair), static_cast<const T*>(coef), static_cast<const T*>(mask), B, L,
      static_cast<T*>(out));
  return last_error();
}

}  // namespace

const char* launch_token_stats(DType dt, const void* logits, const int64_t* targets, int64_t n, int64_t V,
                               int64_t valid_local, int64_t vocab_start, int64_t ignore_index, void* out,
                               void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32:
      return stats_typed<float>(logits, targets, n, V, valid_local, vocab_start, ignore_index, out, st);
    case DType::kFloat64:
      return stats_typed<double>(logits, targets, n, V, valid_local, vocab_start, ignore_index, out, st);
    case DType::kBFloat16:
      return stats_typed<__nv_bfloat16>(logits, targets, n, V, valid_local, vocab_start, ignore_index, out, st);
    case DType::kFloat16:
      return stats_typed<__half>(logits, targets, n, V, valid_local, vocab_start, ignore_index, out, st);
  }
  return "megatron_spot: unsupported logits dtype";
}

const char* launch_token_grad(DType dt, const void* logits, void* out, const int64_t* targets, const void* g,
                              const void* m, const void* logs, int64_t n, int64_t V, int64_t valid_local, int64_t vocab_start,
                              int64_t ignore_index, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32:
      return grad_typed<float>(logits, out, targets, g, m, logs, n, V, valid_local, vocab_start, ignore_index, st);
    case DType::kFloat64:
      return grad_typed<double>(logits, out, targets, g, m, logs, n, V, valid_local, vocab_start, ignore_index, st);
    case DType::kBFloat16:
      return grad_typed<__nv_bfloat16>(logits, out, targets, g, m, logs, n, V, valid_local, vocab_start, ignore_index,
                                       st);
    case DType::kFloat16:
      return grad_typed<__half>(logits, out, targets, g, m, logs, n, V, valid_local, vocab_start, ignore_index, st);
  }
  return "megatron_spot: unsupported logits dtype";
}

const char* launch_pair_loss(DType dt, const void* token_logps, const void* loss_mask, const void* ref_logps,
                             const void* delta, int64_t B, int64_t L, double beta, double label_smoothing,
                             PairWeights weights, void* losses, void* seq, void* rewards, void* coef, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dt == DType::kFloat32)
    return pair_loss_typed<float>(token_logps, loss_mask, ref_logps, delta, B, L, beta, label_smoothing, weights,
                                  losses, seq, rewards, coef, st);
  if (dt == DType::kFloat64)
    return pair_loss_typed<double>(token_logps, loss_mask, ref_logps, delta, B, L, beta, label_smoothing, weights,
                                   losses, seq, rewards, coef, st);
  return "megatron_spot: pair_loss supports float32 and float64";
}

const char* launch_pair_grad(DType dt, const void* grad_pair, const void* coef, const void* loss_mask, int64_t B,
                             int64_t L, void* out, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dt == DType::kFloat32) return pair_grad_typed<float>(grad_pair, coef, loss_mask, B, L, out, st);
  if (dt == DType::kFloat64) return pair_grad_typed<double>(grad_pair, coef, loss_mask, B, L, out, st);
  return "megatron_spot: pair_loss supports float32 and float64";
}

}  // namespace cuda
}  // namespace spot
