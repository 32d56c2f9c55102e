// Exact int8 GEMMs and the experts of an MoE layer-step on x86 CPUs (AVX2), HAQ's W8A8 arithmetic.
//
// Products: int32 out = x . w^T, x in [-127, 127] (HAQ's per-token quantization), w any int8 (llm-compressor's
// weights may hold -128). AVX2 sign trick (as llama.cpp's and fbgemm's int8 paths): |w| as u8 times x * sign(w)
// as s8 with vpmaddubsw gives int16 pair sums of at most 2 * 128 * 127 = 32512 < 32767, so nothing saturates;
// vpmaddwd with ones widens them to int32. (|w| of -128 is 0x80 = 128 as an unsigned byte; x = -128 would break
// the sign step, and quantization never writes it.) Weights are read in their checkpoint layout (row-major
// [N, K]) in tiles of 4 rows; every pair of token rows reuses a tile's |w| while it is in registers and every
// token the tile while it is in L1/L2, so DRAM sees each weight byte once per call and decode is memory-bound.
// Decode (one or two tokens) reads the rows one after another instead, as one stream (int8_tile.h).
//
// Built three ways from this file (vllm_haq/kernels/cpu_int8.py picks one per host): plain AVX2; with HAQ_VNNI
// defined (-mavx512vnni -mavx512vl) for hosts with AVX-512 VNNI, where the tile drops the sign step: one
// vpdpbusd of x + 128 (unsigned) and w per 32 (or 64) products, the shift taken back with the weight rows' sums,
// and 4 token rows per tile instead of 2; and with HAQ_AVX_VNNI (-mavxvnni) for CPUs with the 256-bit VEX
// vpdpbusd but no AVX-512 (the VNNI step in the AVX2 register budget). The integers are the same; every tail
// and epilogue is shared. The register tiles are in int8_tile.h.
//
// moe_routes: all of one layer-step's experts served from one stacked store (host experts or cache slots) in
// one call, one OpenMP team and four phases (quantize inputs, gate/up, SwiGLU + rotation + quantize, down):
// no Python per expert. Its float steps are those of vllm_haq.quant (true division, round half to even,
// ((float)acc * x_scale) * w_scale, the rotation's butterfly order); SiLU's exp is Cephes' polynomial (exp8),
// within 1 ulp of expf, not torch's vector exp.
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

#include "int8_tile.h"
#include "int8_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <vector>

namespace {

using haq::RB;
using haq::gemm_rows;

// |x / smooth| (or |x|) of 8 floats at i: the same IEEE division as the scalar steps.
inline __m256 load_smoothed(const float* x, const float* smooth, int64_t i) {
  const __m256 v = _mm256_loadu_ps(x + i);
  return smooth ? _mm256_div_ps(v, _mm256_loadu_ps(smooth + i)) : v;
}

// HAQ's per-token quantization of one row (vllm_haq.quant.quantize_per_token): x / smooth, scale =
// max(amax, 1e-8) / 127, q = round-half-even(x / scale) clamped to +-127. Returns the scale. Eight lanes at a
// time, bit for bit the scalar steps (true divisions, round to nearest even; max and the clamps keep their
// operand order, so a NaN lane gives what std::max/std::min give): a Qwen3 expert's 16 routes spent 12% of
// their time in these loops as scalar code.
float quantize_row(const float* x, const float* smooth, int64_t n, int8_t* q) {
  const int64_t nv = n / 8 * 8;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  for (int64_t i = 0; i < nv; i += 8) vmax = _mm256_max_ps(_mm256_and_ps(load_smoothed(x, smooth, i), abs_mask), vmax);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  for (int64_t i = nv; i < n; ++i) amax = std::max(amax, std::fabs(smooth ? x[i] / smooth[i] : x[i]));
  const float scale = std::max(amax, 1e-8f) / 127.f;
  const __m256 vs = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  for (int64_t i = 0; i < nv; i += 8) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(load_smoothed(x, smooth, i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(w, w));
  }
  for (int64_t i = nv; i < n; ++i) {
    const float v = std::nearbyint((smooth ? x[i] / smooth[i] : x[i]) / scale);
    q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
  }
  return scale;
}

// exp of 8 floats: Cephes' expf (n = round(x log2 e), r = x - n ln 2 in two parts, a degree-5 polynomial, 2^n
// from the exponent bits), within 1 ulp of expf over [-87, 88] (checked over 1.9M points). Inputs are clamped
// to that range, where 2^n is a normal float: SiLU's g / (1 + exp(-g)) differs from expf's by < 1e-36 outside it.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f))),
                                 _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  for (const float c : {1.3981999507E-3f, 8.3334519073E-3f, 4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f})
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
  p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// SwiGLU in place on one route's [gate | up] row of 2 * inter floats: g / (1 + exp(-g)) * u into the gate half.
void swiglu_row(float* g, int64_t inter) {
  const int64_t nv = inter / 8 * 8;
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (int64_t i = 0; i < nv; i += 8) {
    const __m256 v = _mm256_loadu_ps(g + i);
    const __m256 e = exp8(_mm256_sub_ps(zero, v));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(one, e)), _mm256_loadu_ps(g + inter + i)));
  }
  for (int64_t i = nv; i < inter; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * g[inter + i];
}

// vllm_haq.quant.rotation.rotate on one row: butterflies within each block, then one scaling.
void rotate_row(float* v, int64_t n, int64_t block) {
  for (int64_t b0 = 0; b0 < n; b0 += block)
    for (int64_t h = 1; h < block; h *= 2)
      for (int64_t i = b0; i < b0 + block; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const float a = v[j], c = v[j + h];
          v[j] = a + c;
          v[j + h] = a - c;
        }
  const float s = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] * s;
}

// Four rows' float32 operands (lanes at or past nb read nothing) and results (lanes past nb not written).
inline __m128 load4(const float* p, int nb) {
  if (nb == RB) return _mm_loadu_ps(p);
  alignas(16) float v[RB] = {};
  std::memcpy(v, p, nb * sizeof(float));
  return _mm_load_ps(v);
}

inline void store4(float* p, __m128 y, int nb) {
  if (nb == RB) return _mm_storeu_ps(p, y);
  alignas(16) float v[RB];
  _mm_store_ps(v, y);
  std::memcpy(p, v, nb * sizeof(float));
}

// ((float)v * x_scale) * w_scale[n + r] in lane r: the scalar steps, four rows of one token at once.
inline __m128 scale4(__m128i v, float x_scale, const float* w_scale, int nb) {
  return _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(v), _mm_set1_ps(x_scale)), load4(w_scale, nb));
}

int8_t* aligned64(int8_t* p) { return p + (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64; }

void check_int8_stack(const torch::Tensor& w, const char* name) {
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 3 && w.stride(2) == 1 && w.stride(1) == w.size(2),
              "moe_routes: ", name, " must be int8 [experts, N, K] with contiguous rows per expert");
}

void check_scale_stack(const torch::Tensor& s, const torch::Tensor& w, const char* name) {
  TORCH_CHECK(s.dtype() == torch::kFloat32 && s.size(0) == w.size(0) && s.numel() == w.size(0) * w.size(1) &&
                  s.stride(0) == w.size(1) * (s.dim() == 3 ? s.size(2) : 1),
              "moe_routes: ", name, " must be float32 [experts, N, 1], contiguous per expert");
}

// Token rows per block in the dense GEMMs: a block's int8 rows stay in L2 (~128 KB) while every weight tile
// passes over them. Without it a prefill of thousands of tokens re-reads all of x from DRAM for each 4-row tile.
int64_t token_block(int64_t K) { return std::max<int64_t>(2, (int64_t{128} << 10) / std::max<int64_t>(K, 1) / 2 * 2); }

// epi(n, t, v, nb) (gemm_rows' four-row form) for every product of x [M, K] (contiguous rows) and w [N, K],
// token block by token block, each block's tiles spread over the team.
template <class Epi>
void dense_gemm(const int8_t* xp, const int8_t* wp, int64_t M, int64_t N, int64_t K, int64_t threads, Epi&& epi) {
  const int64_t tiles = (N + RB - 1) / RB, mb = token_block(K);
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  for (int64_t t0 = 0; t0 < M; t0 += mb) {
    const int64_t m = std::min(mb, M - t0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < tiles; ++b)
      gemm_rows(wp, N, K, b * RB, std::min(N, (b + 1) * RB), xp + t0 * K, m,
                [&](int64_t n, int64_t t, __m128i v, int nb) { epi(n, t0 + t, v, nb); });
  }
}

void check_gemm_operands(const torch::Tensor& x, const torch::Tensor& w, const char* op) {
  TORCH_CHECK(x.dtype() == torch::kInt8 && w.dtype() == torch::kInt8, op, ": int8 operands expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), op, ": x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), op, ": contiguous operands expected");
}

}  // namespace

torch::Tensor int8_mm(torch::Tensor x, torch::Tensor w, int64_t threads) {
  check_gemm_operands(x, w, "int8_mm");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  auto out = torch::empty({M, N}, x.options().dtype(torch::kInt32));
  int32_t* op = out.data_ptr<int32_t>();
  dense_gemm(x.data_ptr<int8_t>(), w.data_ptr<int8_t>(), M, N, K, threads,
             [&](int64_t n, int64_t t, __m128i v, int nb) {
               alignas(16) int32_t s[RB];
               _mm_store_si128(reinterpret_cast<__m128i*>(s), v);
               std::memcpy(op + t * N + n, s, nb * sizeof(int32_t));
             });
  return out;
}

// [M, N] = ((float)(x_q . w^T) * x_s[t]) * w_s[n] (+ bias[n]) in float32, stored as float32 or bf16 (round to
// nearest even, as Tensor.to does): vllm_haq.kernels.torch_scaled_int8_mm's steps in its order, written once
// instead of an int32 matrix, three elementwise passes and a dtype conversion.
torch::Tensor scaled_mm(torch::Tensor x, torch::Tensor x_s, torch::Tensor w, torch::Tensor w_s,
                        c10::optional<torch::Tensor> bias, bool bf16_out, int64_t threads) {
  check_gemm_operands(x, w, "scaled_mm");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  TORCH_CHECK(x_s.dtype() == torch::kFloat32 && x_s.is_contiguous() && x_s.numel() == M, "scaled_mm: x_scale float32 [M, 1] expected");
  TORCH_CHECK(w_s.dtype() == torch::kFloat32 && w_s.is_contiguous() && w_s.numel() == N, "scaled_mm: w_scale float32 [N] expected");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N, "scaled_mm: bias float32 [N] expected");
    bp = bias->data_ptr<float>();
  }
  auto out = torch::empty({M, N}, x.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
  const float* xs = x_s.data_ptr<float>();
  const float* ws = w_s.data_ptr<float>();
  auto scaled = [=](int64_t n, int64_t t, __m128i v, int nb) {
    const __m128 y = scale4(v, xs[t], ws + n, nb);
    return bp ? _mm_add_ps(y, load4(bp + n, nb)) : y;
  };
  if (bf16_out) {
    c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
    dense_gemm(x.data_ptr<int8_t>(), w.data_ptr<int8_t>(), M, N, K, threads,
               [&](int64_t n, int64_t t, __m128i v, int nb) {
                 alignas(16) float y[RB];
                 _mm_store_ps(y, scaled(n, t, v, nb));
                 for (int r = 0; r < nb; ++r) op[t * N + n + r] = c10::BFloat16(y[r]);
               });
  } else {
    float* op = out.data_ptr<float>();
    dense_gemm(x.data_ptr<int8_t>(), w.data_ptr<int8_t>(), M, N, K, threads,
               [&](int64_t n, int64_t t, __m128i v, int nb) { store4(op + t * N + n, scaled(n, t, v, nb), nb); });
  }
  return out;
}

// HAQ's activation transform and per-token quantization (vllm_haq.kernels.ScaledInt8Gemm._transformed, then
// vllm_haq.quant.quantize_per_token), one row at a time in L1 instead of log2(block) + 6 passes over [M, K]:
// float32 or bf16 x (widened exactly), x / smooth, the block-Hadamard rotation in the reference's butterfly
// order, scale = max(amax, 1e-8) / 127, q = round-half-even(x / scale) clamped to +-127.
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, c10::optional<torch::Tensor> smooth, int64_t rotation,
                                         int64_t threads) {
  const bool bf16 = x.dtype() == torch::kBFloat16;
  TORCH_CHECK((bf16 || x.dtype() == torch::kFloat32) && x.dim() == 2 && x.is_contiguous(),
              "quantize_rows: x float32 or bfloat16 [M, K] expected");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(rotation == 0 || K % rotation == 0, "quantize_rows: rotation block does not divide the input features");
  const float* sm = nullptr;
  if (smooth.has_value() && smooth->defined()) {
    TORCH_CHECK(smooth->dtype() == torch::kFloat32 && smooth->is_contiguous() && smooth->numel() == K, "quantize_rows: smooth float32 [K] expected");
    sm = smooth->data_ptr<float>();
  }
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto s = torch::empty({M, 1}, x.options().dtype(torch::kFloat32));
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    std::vector<float> row(K);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < M; ++t) {
      const float* src;
      if (bf16) {
        const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>() + t * K;
        for (int64_t i = 0; i < K; ++i) row[i] = static_cast<float>(xb[i]);
        src = row.data();
      } else {
        src = x.data_ptr<float>() + t * K;
      }
      if (rotation > 0) {
        if (sm || src != row.data())
          for (int64_t i = 0; i < K; ++i) row[i] = sm ? src[i] / sm[i] : src[i];
        rotate_row(row.data(), K, rotation);
        sp[t] = quantize_row(row.data(), nullptr, K, qp + t * K);
      } else {
        sp[t] = quantize_row(src, sm, K, qp + t * K);
      }
    }
  }
  return {q, s};
}

// routes[tok, slot, :] = topk_w[tok, slot] * w2_e(SwiGLU(w13_e(x[tok]))) for every route of the given experts.
// tok/slot: all routes of the step sorted by expert (RouteGroups); experts[j]'s routes are
// tok[starts[j] : starts[j] + counts[j]]. Stacks are indexed by experts[j] (expert ids or cache slots, via index).
void moe_routes(torch::Tensor x, torch::Tensor routes, torch::Tensor topk_w, torch::Tensor w13, torch::Tensor s13,
                torch::Tensor w2, torch::Tensor s2, c10::optional<torch::Tensor> smooth, torch::Tensor tok,
                torch::Tensor slot, std::vector<int64_t> index, std::vector<int64_t> starts,
                std::vector<int64_t> counts, int64_t rotation, int64_t threads) {
  check_int8_stack(w13, "w13");
  check_int8_stack(w2, "w2");
  check_scale_stack(s13, w13, "w13_scale");
  check_scale_stack(s2, w2, "w2_scale");
  const int64_t H = w13.size(2), I2 = w13.size(1), I = I2 / 2, k = routes.size(1);
  TORCH_CHECK(w2.size(1) == H && w2.size(2) == I && w2.size(0) == w13.size(0), "moe_routes: w13 [E, 2I, H] and w2 [E, H, I] expected");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.size(1) == H, "moe_routes: x float32 [T, H] expected");
  TORCH_CHECK(routes.dtype() == torch::kFloat32 && routes.is_contiguous() && routes.dim() == 3 && routes.size(0) == x.size(0) &&
                  routes.size(2) == H, "moe_routes: routes float32 [T, k, H] expected");
  TORCH_CHECK(topk_w.dtype() == torch::kFloat32 && topk_w.is_contiguous() && topk_w.numel() == x.size(0) * k,
              "moe_routes: topk weights float32 [T, k] expected");
  TORCH_CHECK(tok.dtype() == torch::kInt64 && slot.dtype() == torch::kInt64 && tok.is_contiguous() && slot.is_contiguous(),
              "moe_routes: int64 route lists expected");
  TORCH_CHECK(index.size() == starts.size() && index.size() == counts.size(), "moe_routes: one start and count per expert");
  TORCH_CHECK(rotation == 0 || (I % rotation == 0), "moe_routes: rotation block does not divide the intermediate size");
  const float* sm = nullptr;
  int64_t sm_stride = 0;
  if (smooth.has_value() && smooth->defined()) {
    TORCH_CHECK(smooth->dtype() == torch::kFloat32 && smooth->stride(1) == 1 && smooth->size(1) == H, "moe_routes: smooth float32 [E, H] expected");
    sm = smooth->data_ptr<float>();
    sm_stride = smooth->stride(0);
  }
  const int64_t jobs = static_cast<int64_t>(index.size());
  std::vector<int64_t> offs(jobs + 1, 0);
  for (int64_t j = 0; j < jobs; ++j) {
    TORCH_CHECK(index[j] >= 0 && index[j] < w13.size(0), "moe_routes: expert/slot index out of range");
    TORCH_CHECK(starts[j] >= 0 && counts[j] >= 0 && starts[j] + counts[j] <= tok.numel(), "moe_routes: route range out of bounds");
    offs[j + 1] = offs[j] + counts[j];
  }
  const int64_t R = offs[jobs];
  if (R == 0) return;
  std::vector<int64_t> job_of(R);
  for (int64_t j = 0; j < jobs; ++j) std::fill(job_of.begin() + offs[j], job_of.begin() + offs[j + 1], j);

  // int8 operands 64-byte aligned (the 64-byte tiles' loads would otherwise split cache lines)
  auto xq_t = torch::empty({R * H + 64}, torch::kInt8), hq_t = torch::empty({R * I + 64}, torch::kInt8);
  int8_t* const xq = aligned64(xq_t.data_ptr<int8_t>());
  int8_t* const hq = aligned64(hq_t.data_ptr<int8_t>());
  std::vector<float> xs(R), hs(R), h(R * I2);
  const float* xp = x.data_ptr<float>();
  float* rp = routes.data_ptr<float>();
  const float* wp = topk_w.data_ptr<float>();
  const int64_t* tp = tok.data_ptr<int64_t>();
  const int64_t* sp = slot.data_ptr<int64_t>();
  const int8_t* w13p = w13.data_ptr<int8_t>();
  const int8_t* w2p = w2.data_ptr<int8_t>();
  const float* s13p = s13.data_ptr<float>();
  const float* s2p = s2.data_ptr<float>();
  const int64_t T = x.size(0), tiles1 = (I2 + RB - 1) / RB, tiles2 = (H + RB - 1) / RB;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t j = job_of[r], t = tp[starts[j] + r - offs[j]];
    TORCH_CHECK(t >= 0 && t < T && sp[starts[j] + r - offs[j]] >= 0 && sp[starts[j] + r - offs[j]] < k, "moe_routes: route out of range");
  }

  // Where every expert of the call sees the same input (no smoothing, or one smoothing vector for all: HAQ's
  // shared MoE smoothing), each token is quantized once and copied to its routes (Qwen3 routes each token to 8
  // experts); else once per route, with its expert's smoothing.
  const float* sm0 = sm ? sm + index[0] * sm_stride : nullptr;
  bool shared = true;
  for (int64_t j = 1; sm && shared && j < jobs; ++j)
    shared = std::memcmp(sm0, sm + index[j] * sm_stride, H * sizeof(float)) == 0;
  std::vector<int64_t> uniq, upos(shared ? T : 0, -1);
  for (int64_t r = 0; shared && r < R; ++r) {
    const int64_t t = tp[starts[job_of[r]] + r - offs[job_of[r]]];
    if (upos[t] < 0) upos[t] = static_cast<int64_t>(uniq.size()), uniq.push_back(t);
  }
  const int64_t U = static_cast<int64_t>(uniq.size());
  std::vector<int8_t> uq(U * H);
  std::vector<float> us(U);

#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    if (shared) {  // 1. inputs, per token, then per route
#pragma omp for schedule(static)
      for (int64_t u = 0; u < U; ++u) us[u] = quantize_row(xp + uniq[u] * H, sm0, H, &uq[u * H]);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t u = upos[tp[starts[job_of[r]] + r - offs[job_of[r]]]];
        std::memcpy(xq + r * H, &uq[u * H], H);
        xs[r] = us[u];
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t j = job_of[r];
        xs[r] = quantize_row(xp + tp[starts[j] + r - offs[j]] * H, sm + index[j] * sm_stride, H, xq + r * H);
      }
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < jobs * tiles1; ++i) {  // 2. gate/up
      const int64_t j = i / tiles1, n0 = (i % tiles1) * RB, e = index[j];
      const float* ws = s13p + e * s13.stride(0);
      float* hj = h.data() + offs[j] * I2;
      const float* xsj = xs.data() + offs[j];
      gemm_rows(w13p + e * w13.stride(0), I2, H, n0, std::min(I2, n0 + RB), xq + offs[j] * H, counts[j],
                [&](int64_t n, int64_t t, __m128i v, int nb) { store4(hj + t * I2 + n, scale4(v, xsj[t], ws + n, nb), nb); });
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {  // 3. SwiGLU, rotation, quantization
      float* g = h.data() + r * I2;
      swiglu_row(g, I);
      if (rotation > 0) rotate_row(g, I, rotation);
      hs[r] = quantize_row(g, nullptr, I, hq + r * I);
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < jobs * tiles2; ++i) {  // 4. down, weighted into each route's row
      const int64_t j = i / tiles2, n0 = (i % tiles2) * RB, e = index[j];
      const float* ws = s2p + e * s2.stride(0);
      const float* hsj = hs.data() + offs[j];
      const int64_t* tj = tp + starts[j];
      const int64_t* sj = sp + starts[j];
      gemm_rows(w2p + e * w2.stride(0), H, I, n0, std::min(H, n0 + RB), hq + offs[j] * I, counts[j],
                [&](int64_t n, int64_t t, __m128i v, int nb) {
                  const int64_t route = tj[t] * k + sj[t];
                  store4(rp + route * H + n, _mm_mul_ps(scale4(v, hsj[t], ws + n, nb), _mm_set1_ps(wp[route])), nb);
                });
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#if defined(HAQ_VNNI)
  m.attr("isa") = "avx512_vnni";
#elif defined(HAQ_AVX_VNNI)
  m.attr("isa") = "avx_vnni";
#else
  m.attr("isa") = "avx2";
#endif
  // Every entry point releases the GIL while it computes (arguments are converted before, results after): the
  // offload engine runs moe_routes on a worker thread beside the model thread, which must go on launching the
  // step's copies and device kernels meanwhile. Holding it, a 3 ms CPU expert stalled the model thread for 3 ms
  // (and the worker waited up to the 5 ms switch interval to start), so CPU experts and copies never overlapped.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("int8_mm", &int8_mm, "exact int8 GEMM", nogil);
  m.def("scaled_mm", &scaled_mm, "exact int8 GEMM, scaled to float32 (+ bias)", nogil);
  m.def("quantize_rows", &quantize_rows, "HAQ's per-token int8 quantization (smoothing, rotation)", nogil);
  m.def("moe_routes", &moe_routes, "one MoE layer-step's experts, W8A8", nogil);
}
