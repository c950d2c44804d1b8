// megatron_spot._C: op schemas (TORCH_LIBRARY), the CPU kernels, and the Python module stub.
//
// CPU kernels: one token row per task of at::parallel_for; each row is streamed once in L1-sized
// chunks (chunk max, then sum-exp against the running max: an online log-sum-exp), with
// `omp simd` loops that GCC/Clang vectorise. On x86-64 GCC the hot row functions are compiled for
// AVX-512F, AVX2 and baseline and picked at load time (target_clones).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "spot_math.h"
#include "spot_ops.h"

#if defined(__GNUC__)
#define SPOT_INLINE inline __attribute__((always_inline))
#else
#define SPOT_INLINE inline
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(SPOT_NO_CLONES)
#define SPOT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPOT_CLONES
#endif

namespace spot {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // 8 KiB of fp32 per chunk: stays in L1

// Converting loaders/storers between the storage type and fp32 chunks.
SPOT_INLINE void load_chunk(const float* src, int64_t len, float* buf) { std::memcpy(buf, src, len * sizeof(float)); }
SPOT_INLINE void load_chunk(const uint16_t* src, int64_t len, float* buf) {  // bfloat16 bits
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) buf[j] = bf16_bits_to_float(src[j]);
}
SPOT_INLINE void load_chunk(const c10::Half* src, int64_t len, float* buf) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<float>(src[j]);
}
SPOT_INLINE void store_chunk(const float* buf, int64_t len, float* dst) { std::memcpy(dst, buf, len * sizeof(float)); }
SPOT_INLINE void store_chunk(const float* buf, int64_t len, uint16_t* dst) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) dst[j] = float_to_bf16_bits(buf[j]);
}
SPOT_INLINE void store_chunk(const float* buf, int64_t len, c10::Half* dst) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) dst[j] = c10::Half(buf[j]);
}
SPOT_INLINE float load_one(const float* p) { return *p; }
SPOT_INLINE float load_one(const uint16_t* p) { return bf16_bits_to_float(*p); }
SPOT_INLINE float load_one(const c10::Half* p) { return static_cast<float>(*p); }
SPOT_INLINE void store_one(float v, float* p) { *p = v; }
SPOT_INLINE void store_one(float v, uint16_t* p) { *p = float_to_bf16_bits(v); }
SPOT_INLINE void store_one(float v, c10::Half* p) { *p = c10::Half(v); }

// ---- statistics: fp32 accumulation for fp32/bf16/fp16 storage ------------------------------------
template <typename T>
SPOT_INLINE void stats_rows_f32acc(const T* logits, const int64_t* targets, int64_t r0, int64_t r1, int64_t n, int64_t V,
                              int64_t valid, int64_t vocab_start, int64_t ignore_index, float* out) {
  alignas(64) float buf[kChunk];
  for (int64_t row = r0; row < r1; ++row) {
    const T* x = logits + row * V;
    float m = -INFINITY, s = 0.0f;
    for (int64_t c0 = 0; c0 < valid; c0 += kChunk) {
      const int64_t len = std::min(kChunk, valid - c0);
      load_chunk(x + c0, len, buf);
      float cm = -INFINITY;
#pragma omp simd reduction(max : cm)
      for (int64_t j = 0; j < len; ++j) cm = buf[j] > cm ? buf[j] : cm;
      if (!(cm > -INFINITY)) continue;  // an all -inf chunk adds nothing
      const float nm = cm > m ? cm : m;
      float cs = 0.0f;
#pragma omp simd reduction(+ : cs)
      for (int64_t j = 0; j < len; ++j) cs += cpu_exp_f32(buf[j] - nm);
      s = s * std::exp(m - nm) + cs;  // m == -inf: exp(-inf) = 0 and s == 0
      m = nm;
    }
    const int64_t t = targets[row];
    out[row] = m;
    out[n + row] = s;
    out[2 * n + row] = target_in_shard(t, ignore_index, vocab_start, valid) ? load_one(x + (t - vocab_start)) : 0.0f;
  }
}

SPOT_CLONES void stats_rows_float(const float* x, const int64_t* t, int64_t r0, int64_t r1, int64_t n, int64_t V,
                                  int64_t valid, int64_t vs, int64_t ign, float* out) {
  stats_rows_f32acc(x, t, r0, r1, n, V, valid, vs, ign, out);
}
SPOT_CLONES void stats_rows_bf16(const uint16_t* x, const int64_t* t, int64_t r0, int64_t r1, int64_t n, int64_t V,
                                 int64_t valid, int64_t vs, int64_t ign, float* out) {
  stats_rows_f32acc(x, t, r0, r1, n, V, valid, vs, ign, out);
}
SPOT_CLONES void stats_rows_half(const c10::Half* x, const int64_t* t, int64_t r0, int64_t r1, int64_t n, int64_t V,
                                 int64_t valid, int64_t vs, int64_t ign, float* out) {
  stats_rows_f32acc(x, t, r0, r1, n, V, valid, vs, ign, out);
}

// float64: exact libm exp; used by tests (gradcheck) rather than for speed.
void stats_rows_double(const double* logits, const int64_t* targets, int64_t r0, int64_t r1, int64_t n, int64_t V,
                       int64_t valid, int64_t vocab_start, int64_t ignore_index, double* out) {
  for (int64_t row = r0; row < r1; ++row) {
    const double* x = logits + row * V;
    double m = -INFINITY, s = 0.0;
    for (int64_t c0 = 0; c0 < valid; c0 += kChunk) {
      const int64_t len = std::min(kChunk, valid - c0);
      double cm = -INFINITY;
      for (int64_t j = 0; j < len; ++j) cm = x[c0 + j] > cm ? x[c0 + j] : cm;
      if (!(cm > -INFINITY)) continue;
      const double nm = cm > m ? cm : m;
      double cs = 0.0;
      for (int64_t j = 0; j < len; ++j) cs += std::exp(x[c0 + j] - nm);
      s = s * std::exp(m - nm) + cs;
      m = nm;
    }
    const int64_t t = targets[row];
    out[row] = m;
    out[n + row] = s;
    out[2 * n + row] = target_in_shard(t, ignore_index, vocab_start, valid) ? x[t - vocab_start] : 0.0;
  }
}

// ---- gradient: y = g * (onehot - exp((x - m) - logs)); y may alias x -------------------------------------
template <typename T>
SPOT_INLINE void grad_rows_f32acc(const T* logits, T* out, const int64_t* targets, const float* g, const float* mx,
                             const float* logs, int64_t r0, int64_t r1, int64_t V, int64_t valid, int64_t vocab_start,
                             int64_t ignore_index) {
  alignas(64) float buf[kChunk];
  for (int64_t row = r0; row < r1; ++row) {
    const T* x = logits + row * V;
    T* y = out + row * V;
    const float gi = g[row];
    if (gi == 0.0f) {  // ignored token: zero row
      std::memset(static_cast<void*>(y), 0, V * sizeof(T));
      continue;
    }
    const float mr = mx[row], l = logs[row];
    const int64_t t = targets[row];
    const bool has_t = target_in_shard(t, ignore_index, vocab_start, valid);
    const float xt = has_t ? load_one(x + (t - vocab_start)) : 0.0f;  // read before an in-place overwrite
    for (int64_t c0 = 0; c0 < valid; c0 += kChunk) {
      const int64_t len = std::min(kChunk, valid - c0);
      load_chunk(x + c0, len, buf);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) buf[j] = -gi * cpu_exp_f32((buf[j] - mr) - l);
      store_chunk(buf, len, y + c0);
    }
    if (valid < V) std::memset(static_cast<void*>(y + valid), 0, (V - valid) * sizeof(T));
    if (has_t) store_one(gi * (1.0f - std::exp((xt - mr) - l)), y + (t - vocab_start));
  }
}

SPOT_CLONES void grad_rows_float(const float* x, float* y, const int64_t* t, const float* g, const float* mx,
                                 const float* logs, int64_t r0, int64_t r1, int64_t V, int64_t valid, int64_t vs, int64_t ign) {
  grad_rows_f32acc(x, y, t, g, mx, logs, r0, r1, V, valid, vs, ign);
}
SPOT_CLONES void grad_rows_bf16(const uint16_t* x, uint16_t* y, const int64_t* t, const float* g, const float* mx,
                                const float* logs, int64_t r0, int64_t r1, int64_t V, int64_t valid, int64_t vs, int64_t ign) {
  grad_rows_f32acc(x, y, t, g, mx, logs, r0, r1, V, valid, vs, ign);
}
SPOT_CLONES void grad_rows_half(const c10::Half* x, c10::Half* y, const int64_t* t, const float* g, const float* mx,
                                const float* logs, int64_t r0, int64_t r1, int64_t V, int64_t valid, int64_t vs, int64_t ign) {
  grad_rows_f32acc(x, y, t, g, mx, logs, r0, r1, V, valid, vs, ign);
}

void grad_rows_double(const double* logits, double* out, const int64_t* targets, const double* g, const double* mx, const double* logs,
                      int64_t r0, int64_t r1, int64_t V, int64_t valid, int64_t vocab_start, int64_t ignore_index) {
  for (int64_t row = r0; row < r1; ++row) {
    const double* x = logits + row * V;
    double* y = out + row * V;
    const double gi = g[row];
    if (gi == 0.0) {
      std::memset(y, 0, V * sizeof(double));
      continue;
    }
    const double mr = mx[row], l = logs[row];
    const int64_t t = targets[row];
    const bool has_t = target_in_shard(t, ignore_index, vocab_start, valid);
    const double xt = has_t ? x[t - vocab_start] : 0.0;
    for (int64_t j = 0; j < valid; ++j) y[j] = -gi * std::exp((x[j] - mr) - l);
    for (int64_t j = valid; j < V; ++j) y[j] = 0.0;
    if (has_t) y[t - vocab_start] = gi * (1.0 - std::exp((xt - mr) - l));
  }
}

inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

// ---- op implementations ----------------------------------------------------------------------------
at::Tensor token_logprobs_stats_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                                    int64_t valid_local, int64_t ignore_index) {
  check_token_inputs("megatron_spot::token_logprobs_stats", logits, targets, vocab_start, valid_local);
  const int64_t n = logits.size(0), V = logits.size(1);
  at::Tensor out = at::empty({3, n}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  const int64_t* t = targets.data_ptr<int64_t>();
  const auto st = logits.scalar_type();
  at::parallel_for(0, n, row_grain(V), [&](int64_t r0, int64_t r1) {
    if (st == at::kFloat) {
      stats_rows_float(logits.data_ptr<float>(), t, r0, r1, n, V, valid_local, vocab_start, ignore_index,
                       out.data_ptr<float>());
    } else if (st == at::kBFloat16) {
      stats_rows_bf16(reinterpret_cast<const uint16_t*>(logits.data_ptr<at::BFloat16>()), t, r0, r1, n, V,
                      valid_local, vocab_start, ignore_index, out.data_ptr<float>());
    } else if (st == at::kHalf) {
      stats_rows_half(logits.data_ptr<c10::Half>(), t, r0, r1, n, V, valid_local, vocab_start, ignore_index,
                      out.data_ptr<float>());
    } else {
      stats_rows_double(logits.data_ptr<double>(), t, r0, r1, n, V, valid_local, vocab_start, ignore_index,
                        out.data_ptr<double>());
    }
  });
  return out;
}

void grad_into(const at::Tensor& logits, const at::Tensor& out, const at::Tensor& targets, const at::Tensor& g,
               const at::Tensor& m, const at::Tensor& logs, int64_t vocab_start, int64_t valid_local, int64_t ignore_index) {
  const int64_t n = logits.size(0), V = logits.size(1);
  const int64_t* t = targets.data_ptr<int64_t>();
  const auto st = logits.scalar_type();
  at::parallel_for(0, n, row_grain(V), [&](int64_t r0, int64_t r1) {
    if (st == at::kFloat) {
      grad_rows_float(logits.data_ptr<float>(), out.data_ptr<float>(), t, g.data_ptr<float>(), m.data_ptr<float>(),
                      logs.data_ptr<float>(), r0, r1, V, valid_local, vocab_start, ignore_index);
    } else if (st == at::kBFloat16) {
      grad_rows_bf16(reinterpret_cast<const uint16_t*>(logits.data_ptr<at::BFloat16>()),
                     reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), t, g.data_ptr<float>(),
                     m.data_ptr<float>(), logs.data_ptr<float>(), r0, r1, V, valid_local, vocab_start, ignore_index);
    } else if (st == at::kHalf) {
      grad_rows_half(logits.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), t, g.data_ptr<float>(),
                     m.data_ptr<float>(), logs.data_ptr<float>(), r0, r1, V, valid_local, vocab_start, ignore_index);
    } else {
      grad_rows_double(logits.data_ptr<double>(), out.data_ptr<double>(), t, g.data_ptr<double>(),
                       m.data_ptr<double>(), logs.data_ptr<double>(), r0, r1, V, valid_local, vocab_start, ignore_index);
    }
  });
}

at::Tensor token_logprobs_grad_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& g,
                                   const at::Tensor& m, const at::Tensor& logs, int64_t vocab_start, int64_t valid_local,
                                   int64_t ignore_index) {
  check_grad_inputs("megatron_spot::token_logprobs_grad", logits, targets, g, m, logs, vocab_start, valid_local);
  at::Tensor out = at::empty_like(logits);
  grad_into(logits, out, targets, g, m, logs, vocab_start, valid_local, ignore_index);
  return out;
}

void token_logprobs_grad_inplace_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& g,
                                     const at::Tensor& m, const at::Tensor& logs, int64_t vocab_start, int64_t valid_local,
                                     int64_t ignore_index) {
  check_grad_inputs("megatron_spot::token_logprobs_grad_", logits, targets, g, m, logs, vocab_start, valid_local);
  grad_into(logits, logits, targets, g, m, logs, vocab_start, valid_local, ignore_index);
}

template <typename T>
void pair_loss_typed(const at::Tensor& lp, const at::Tensor& mask, const at::Tensor& ref, const at::Tensor& delta,
                     double beta, double eps, const PairWeights& w, at::Tensor& losses, at::Tensor& seq,
                     at::Tensor& rewards, at::Tensor& coef) {
  const int64_t B = lp.size(0) / 2, L = lp.size(1);
  const T* x = lp.data_ptr<T>();
  const T* mk = mask.data_ptr<T>();
  const T* r = ref.data_ptr<T>();
  const T d = delta.data_ptr<T>()[0];
  for (int64_t p = 0; p < B; ++p) {
    T sc = T(0), sr = T(0);
    for (int64_t j = 0; j < L; ++j) {
      sc += masked_term(x[p * L + j], mk[p * L + j]);
      sr += masked_term(x[(B + p) * L + j], mk[(B + p) * L + j]);
    }
    pair_finish<T>(p, B, sc, sr, r[p], r[B + p], static_cast<T>(beta), d, static_cast<T>(eps), w,
                   losses.data_ptr<T>(), seq.data_ptr<T>(), rewards.data_ptr<T>(), coef.data_ptr<T>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_loss_cpu(const at::Tensor& lp, const at::Tensor& mask,
                                                                         const at::Tensor& ref, const at::Tensor& delta,
                                                                         double beta, double label_smoothing,
                                                                         c10::ArrayRef<double> weights) {
  const char* op = "megatron_spot::pair_loss";
  check_pair_inputs(op, lp, mask, ref, delta);
  const PairWeights w = pair_weights(op, weights);
  const int64_t B = lp.size(0) / 2;
  at::Tensor losses = at::empty({kNumPairObjectives, B}, lp.options());
  at::Tensor seq = at::empty({2 * B}, lp.options());
  at::Tensor rewards = at::empty({2 * B}, lp.options());
  at::Tensor coef = at::empty({2 * B}, lp.options());
  const at::Tensor d = delta.contiguous();
  if (lp.scalar_type() == at::kFloat) {
    pair_loss_typed<float>(lp, mask, ref, d, beta, label_smoothing, w, losses, seq, rewards, coef);
  } else {
    pair_loss_typed<double>(lp, mask, ref, d, beta, label_smoothing, w, losses, seq, rewards, coef);
  }
  return {losses, seq, rewards, coef};
}

template <typename T>
void pair_grad_typed(const at::Tensor& gp, const at::Tensor& coef, const at::Tensor& mask, at::Tensor& out) {
  const int64_t B = mask.size(0) / 2, L = mask.size(1);
  const T* g = gp.data_ptr<T>();
  const T* c = coef.data_ptr<T>();
  const T* mk = mask.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t row = 0; row < 2 * B; ++row) {
    const T f = g[row % B] * c[row];
    for (int64_t j = 0; j < L; ++j) {
      const T m = mk[row * L + j];
      o[row * L + j] = m != T(0) ? f * m : T(0);
    }
  }
}

at::Tensor pair_loss_grad_cpu(const at::Tensor& gp, const at::Tensor& coef, const at::Tensor& mask) {
  check_pair_grad_inputs("megatron_spot::pair_loss_grad", gp, coef, mask);
  at::Tensor out = at::empty_like(mask);
  if (mask.scalar_type() == at::kFloat) {
    pair_grad_typed<float>(gp, coef, mask, out);
  } else {
    TORCH_CHECK(mask.scalar_type() == at::kDouble, "megatron_spot::pair_loss_grad: float32 or float64 only");
    pair_grad_typed<double>(gp, coef, mask, out);
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace spot

TORCH_LIBRARY(megatron_spot, m) {
  m.def(
      "token_logprobs_stats(Tensor logits, Tensor targets, int vocab_start, int valid_local, int ignore_index) "
      "-> Tensor");
  m.def(
      "token_logprobs_grad(Tensor logits, Tensor targets, Tensor g, Tensor m, Tensor logs, int vocab_start, "
      "int valid_local, int ignore_index) -> Tensor");
  m.def(
      "token_logprobs_grad_(Tensor(a!) logits, Tensor targets, Tensor g, Tensor m, Tensor logs, "
      "int vocab_start, int valid_local, int ignore_index) -> ()");
  m.def(
      "pair_loss(Tensor token_logps, Tensor loss_mask, Tensor ref_logps, Tensor delta, float beta, "
      "float label_smoothing, float[] weights) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("pair_loss_grad(Tensor grad_pair, Tensor coef, Tensor loss_mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(megatron_spot, CPU, m) {
  m.impl("token_logprobs_stats", &spot::cpu::token_logprobs_stats_cpu);
  m.impl("token_logprobs_grad", &spot::cpu::token_logprobs_grad_cpu);
  m.impl("token_logprobs_grad_", &spot::cpu::token_logprobs_grad_inplace_cpu);
  m.impl("pair_loss", &spot::cpu::pair_loss_cpu);
  m.impl("pair_loss_grad", &spot::cpu::pair_loss_grad_cpu);
}

// ---- Python module: importing megatron_spot._C registers the ops above ----------------------------
#ifdef SPOT_WITH_CUDA
#define SPOT_CUDA_BUILT 1
#else
#define SPOT_CUDA_BUILT 0
#endif

static struct PyModuleDef spot_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "megatron_spot kernels; the ops live in torch.ops.megatron_spot (see megatron_spot.ops)", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&spot_module);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddIntConstant(mod, "CUDA_BUILT", SPOT_CUDA_BUILT) != 0) return nullptr;
  return mod;
}
