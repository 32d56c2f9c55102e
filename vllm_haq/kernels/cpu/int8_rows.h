// Decode's row streams and gemm_rows, the entry point that picks them or the tiles (included by int8_gemm.cpp after
// int8_tile.h, whose steps they share).
//
// Decode (SEQ_TOKENS tokens or fewer) skips the tiles: one weight row after another, front to back (row_dot), so
// one core reads the matrix as a single sequential stream, as a plain sum over it does. The tile's four
// interleaved rows are four streams that restart every 4 rows; at one token they gained nothing from their
// register reuse and read at 86-90% of one core's read bandwidth against 96-106% for the stream (see row_dot).
#pragma once

#include "int8_tile.h"

namespace haq {

constexpr int64_t SEQ_TOKENS = 2;      // at 3-4 tokens the tiles' reuse of each weight load wins again
constexpr int64_t SEQ_PREFETCH = 8192; // bytes ahead of the stream (see row_dot)
constexpr int SEQ_U = 4;               // independent accumulators per token

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

// 32 bytes of one weight row against T token rows: tile_step's arithmetic for a single row.
template <int T>
inline void row_step(const int8_t* w, const int8_t* const* x, int64_t k, __m256i* a, __m256i& su) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)), aw = step_w(wv);
  step_sum(su, wv);
  for (int t = 0; t < T; ++t) a[t] = step_dot(a[t], step_x(x[t] + k), wv, aw);
}

// out[t] = w . x[t] over K bytes, exact. SEQ_U accumulators per token take consecutive 32-byte steps so their
// vpdpbusd chains overlap, and the loop prefetches SEQ_PREFETCH bytes ahead of the stream: with the hardware
// prefetcher alone the stream read at 84-90% of bandwidth on a Zen 5 core (4 KB ahead: 96-100%, 8 KB: 98-106%,
// Mixtral-8x7B and Qwen3-30B-A3B experts from DRAM). Prefetches past the matrix's end never fault.
template <int T>
inline void row_dot(const int8_t* w, const int8_t* const* x, int64_t K, int32_t* out) {
  __m256i a[SEQ_U][T], su[SEQ_U];
  for (int u = 0; u < SEQ_U; ++u) {
    su[u] = _mm256_setzero_si256();
    for (int t = 0; t < T; ++t) a[u][t] = _mm256_setzero_si256();
  }
  const int64_t kv = K / 32 * 32, ku = K / (32 * SEQ_U) * (32 * SEQ_U);
  int64_t k = 0;
  for (; k < ku; k += 32 * SEQ_U) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + SEQ_PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + k + SEQ_PREFETCH + 64), _MM_HINT_T0);
    for (int u = 0; u < SEQ_U; ++u) row_step<T>(w, x, k + 32 * u, a[u], su[u]);
  }
  for (; k < kv; k += 32) row_step<T>(w, x, k, a[0], su[0]);
  for (int u = 1; u < SEQ_U; ++u) {
    su[0] = _mm256_add_epi32(su[0], su[u]);
    for (int t = 0; t < T; ++t) a[0][t] = _mm256_add_epi32(a[0][t], a[u][t]);
  }
#ifdef HAQ_DP
  const uint32_t shift = static_cast<uint32_t>(hsum(su[0])) << 7;  // as tile_block's, modulo 2**32
#else
  const uint32_t shift = 0;
#endif
  for (int t = 0; t < T; ++t) {
    int32_t s = static_cast<int32_t>(static_cast<uint32_t>(hsum(a[0][t])) - shift);
    for (int64_t j = kv; j < K; ++j) s += int32_t(x[t][j]) * int32_t(w[j]);
    out[t] = s;
  }
}

// gemm_rows for T <= SEQ_TOKENS contiguous token rows.
template <int T, class Epi>
void rows_stream(const int8_t* w, int64_t K, int64_t n0, int64_t n1, const int8_t* x, Epi&& epi) {
  const int8_t* xs[T];
  for (int t = 0; t < T; ++t) xs[t] = x + t * K;
  for (int64_t n = n0; n < n1; n += RB) {
    const int nb = static_cast<int>(std::min<int64_t>(RB, n1 - n));
    alignas(16) int32_t out[T][RB] = {};
    int32_t dot[T];
    for (int r = 0; r < nb; ++r) {
      row_dot<T>(w + (n + r) * K, xs, K, dot);
      for (int t = 0; t < T; ++t) out[t][r] = dot[t];
    }
    for (int t = 0; t < T; ++t) epi(n, t, _mm_load_si128(reinterpret_cast<const __m128i*>(out[t])), nb);
  }
}

// Rows [n0, n1) of w [N, K] against the M contiguous token rows of x [M, K]. The products reach the caller four
// rows at a time: epi(n, t, v, nb), lane r of v the int32 product of row n + r and token t, for r < nb <= RB (the
// other lanes undefined), so that the callers' float epilogues run four lanes at a time too (done one product at
// a time, they took 12% of a Qwen3-30B-A3B expert's time at 16 tokens).
template <class Epi>
void gemm_rows(const int8_t* w, int64_t N, int64_t K, int64_t n0, int64_t n1, const int8_t* x, int64_t M, Epi&& epi) {
  static_assert(SEQ_TOKENS == 2, "the decode dispatch below");
  if (M == 1) return rows_stream<1>(w, K, n0, n1, x, epi);
  if (M == 2) return rows_stream<2>(w, K, n0, n1, x, epi);
  for (int64_t n = n0; n < n1; n += RB) {
    const int nb = static_cast<int>(std::min<int64_t>(RB, n1 - n));
    const int8_t* rows[RB];
    for (int r = 0; r < RB; ++r) rows[r] = w + (n + std::min(r, nb - 1)) * K;  // a short tile repeats its last row
    const int8_t* next = n + 3 * RB <= N ? w + (n + 2 * RB) * K : nullptr;  // two tiles ahead (tile_block)
    for (int64_t t0 = 0; t0 < M; t0 += TB) {
      const int64_t m = std::min(TB, M - t0);
      auto at = [&](int64_t t, __m128i v, int nb_) { epi(n, t0 + t, v, nb_); };
#ifdef HAQ_VNNI
      if (m >= ZMM_TOKENS) {
        tile_block<Zmm>(rows, nb, x + t0 * K, m, K, t0 == 0 ? next : nullptr, at);
        continue;
      }
#endif
      tile_block<Ymm>(rows, nb, x + t0 * K, m, K, t0 == 0 ? next : nullptr, at);
    }
  }
}

}  // namespace haq
