// Exact int8 GEMM on x86 CPUs: int32 out[M, N] = x[M, K] . w[N, K]^T, x in [-127, 127] (HAQ's per-token
// quantization), w any int8 (llm-compressor's weights may hold -128).
//
// AVX2 sign trick (as llama.cpp's and fbgemm's int8 paths): |w| as u8 times x * sign(w) as s8 with
// vpmaddubsw gives int16 pair sums of at most 2 * 128 * 127 = 32512 < 32767, so nothing saturates;
// vpmaddwd with ones widens them to int32. (|w| of -128 is 0x80 = 128 as an unsigned byte; x = -128
// would break the sign step, and quantization never writes it.) Weights are read in their checkpoint layout (row-major [N, K]) in blocks of 4 rows; every
// token row of x reuses a block while it is in cache, so DRAM sees each weight byte once per call.
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

namespace {

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline __m256i dot32(__m256i x, const int8_t* w, __m256i ones) {
  __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(x, wv)), ones);
}

// rows [n0, n0 + nb) of w (nb <= 4) against every row of x
void block(const int8_t* x, const int8_t* w, int32_t* out, int64_t M, int64_t N, int64_t K, int64_t n0, int nb) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t kv = K / 32 * 32;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xr = x + m * K;
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                      _mm256_setzero_si256()};
    for (int64_t k = 0; k < kv; k += 32) {
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k));
      for (int r = 0; r < nb; ++r) acc[r] = _mm256_add_epi32(acc[r], dot32(xv, w + (n0 + r) * K + k, ones));
    }
    for (int r = 0; r < nb; ++r) {
      int32_t s = hsum(acc[r]);
      const int8_t* wr = w + (n0 + r) * K;
      for (int64_t k = kv; k < K; ++k) s += int32_t(xr[k]) * int32_t(wr[k]);
      out[m * N + n0 + r] = s;
    }
  }
}

}  // namespace

torch::Tensor int8_mm(torch::Tensor x, torch::Tensor w, int64_t threads) {
  TORCH_CHECK(x.dtype() == torch::kInt8 && w.dtype() == torch::kInt8, "int8_mm: int8 operands expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_mm: x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "int8_mm: contiguous operands expected");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  auto out = torch::empty({M, N}, x.options().dtype(torch::kInt32));
  const int8_t* xp = x.data_ptr<int8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * 4;
    block(xp, wp, op, M, N, K, n0, static_cast<int>(std::min<int64_t>(4, N - n0)));
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("int8_mm", &int8_mm, "exact int8 GEMM (AVX2)"); }
