// The register tiles of vllm-haq's exact int8 GEMM (included by int8_gemm.cpp; see its header for the arithmetic).
//
// A tile is RB = 4 weight rows, read in their checkpoint layout (row-major [N, K]) against up to TB token rows:
// every group of TT token rows reuses a K-chunk of the tile while it is in L1, so DRAM sees each weight byte once
// per call. Two register widths (the Vec policies below), chosen per token block by gemm_rows:
//  - Ymm (32 bytes): every host. With VNNI one vpdpbusd per (row, token) and 32 bytes; on AVX2 the sign trick.
//  - Zmm (64 bytes, VNNI builds only): half the instructions per byte, for blocks of ZMM_TOKENS tokens or more,
//    where the products are compute-bound (Qwen3-30B-A3B's experts at 16 tokens: 0.49 -> 0.40 ms on a Zen 5
//    core). Memory-bound blocks (decode) keep Ymm: at 1-4 tokens the 64-byte steps ran 5-25% slower there.
// Decode skips the tiles (int8_rows.h, which also holds gemm_rows, the entry point of both).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace haq {

// HAQ_VNNI: AVX-512 VNNI builds (EVEX vpdpbusd, 32 vector registers, 64-byte tiles). HAQ_AVX_VNNI: AVX-VNNI
// builds (the VEX-encoded 256-bit vpdpbusd of CPUs without AVX-512: Intel's Alder Lake and later client
// cores, Sierra Forest): the same one-instruction step at 32 bytes, the AVX2 register budget (16 ymm). HAQ_DP:
// either, the steps that take x + 128 and the rows' sums.
#if defined(HAQ_VNNI) || defined(HAQ_AVX_VNNI)
#define HAQ_DP 1
#endif

#ifdef HAQ_DP
// a + the 32-bit sums of four u8 (u) times s8 (s) products per lane, wrapping, never saturating
inline __m256i dp32(__m256i a, __m256i u, __m256i s) {
#ifdef HAQ_VNNI
  return _mm256_dpbusd_epi32(a, u, s);
#else
  return _mm256_dpbusd_avx_epi32(a, u, s);
#endif
}
#endif

constexpr int RB = 4;  // weight rows per tile

// Token rows per register group: 4 with AVX-512 VNNI (32 vector registers hold 16 accumulators, 4 row sums and
// 4 token rows), 2 on AVX2 and AVX-VNNI (16 registers). TB tokens share each KC-byte chunk of the weight tile
// while it is in L1.
// KC = 2048 rather than 1024: every chunk reloads and stores a group's accumulators, and Mixtral-8x7B's
// experts at 16 tokens took 7% less time on a Zen 5 core with the longer chunks (2048-8192 alike; AVX2 unchanged).
#ifdef HAQ_VNNI
constexpr int TT = 4;
#else
constexpr int TT = 2;
#endif
constexpr int64_t TB = 16, KC = 2048;
constexpr int64_t ZMM_TOKENS = 16;  // full token blocks take the 64-byte tiles (at 8 tokens Mixtral's ran 20% slower)

struct Ymm {
  using v = __m256i;
  static constexpr int64_t W = 32;
  static v zero() { return _mm256_setzero_si256(); }
  static __m256i fold(v a) { return a; }
};

#ifdef HAQ_VNNI
struct Zmm {
  using v = __m512i;
  static constexpr int64_t W = 64;
  static v zero() { return _mm512_setzero_si512(); }
  static __m256i fold(v a) { return _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1)); }
};
#endif

// The horizontal sums of RB = 4 vectors at once, one per lane (two hadd levels and one 128-bit add instead of
// four separate reductions: at Qwen3's K = 768 the epilogue was a third of a tile's instructions at M = 16).
// Integer sums, so the order does not change a bit.
static_assert(RB == 4, "hsum4 reduces four rows");
template <class V>
inline __m128i hsum4(const typename V::v* v) {
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(V::fold(v[0]), V::fold(v[1])),
                                      _mm256_hadd_epi32(V::fold(v[2]), V::fold(v[3])));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

// One step of W bytes: a[r][t] += products of weight row r and token row t over [k, k + W).
//
// VNNI: no sign step. x + 128 (x ^ 0x80, in 1..255 since x >= -127) is the unsigned operand of vpdpbusd and w
// the signed one, so one instruction per (row, token), and x . w = sum((x + 128) w) - 128 sum(w). The row sums
// (``su``) come from one more vpdpbusd with ones per row, in the block's first token group only (SUMS).
// vpdpbusd wraps and never saturates, so the difference, taken modulo 2**32, is the exact product whenever that
// fits in int32 (|x . w| <= 127 * 128 * K).
// AVX2: |w| as u8 times x * sign(w) as s8 with vpmaddubsw gives int16 pair sums of at most 2 * 128 * 127 = 32512,
// so nothing saturates; vpmaddwd with ones widens them to int32.
// The 32-byte step's parts, shared by the tiles and the decode stream: a token row's bytes as the step takes them
// (VNNI: x ^ 0x80), a weight row's bytes as they multiply (AVX2: |w|), a row's sum into su (VNNI only), and
// a + the 32 products.
inline __m256i step_x(const int8_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
#ifdef HAQ_DP
  return _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
#else
  return v;
#endif
}

inline __m256i step_w(__m256i wv) {
#ifdef HAQ_DP
  return wv;
#else
  return _mm256_abs_epi8(wv);
#endif
}

inline void step_sum(__m256i& su, __m256i wv) {
#ifdef HAQ_DP
  su = dp32(su, _mm256_set1_epi8(1), wv);
#else
  (void)su, (void)wv;
#endif
}

// aw: step_w(wv)
inline __m256i step_dot(__m256i a, __m256i xv, __m256i wv, __m256i aw) {
#ifdef HAQ_DP
  (void)aw;
  return dp32(a, xv, wv);
#else
  return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)),
                                               _mm256_set1_epi16(1)));
#endif
}

template <int T, bool SUMS, bool HALF>
inline void tile_step(Ymm, const int8_t* const* w, const int8_t* const* x, int64_t k, __m256i (&a)[RB][T],
                      __m256i* su) {
  __m256i xv[T];
  for (int t = 0; t < T; ++t) xv[t] = step_x(x[t] + k);
  for (int r = 0; r < RB; ++r) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k)), aw = step_w(wv);
    if (SUMS) step_sum(su[r], wv);
    for (int t = 0; t < T; ++t) a[r][t] = step_dot(a[r][t], xv[t], wv, aw);
  }
}

#ifdef HAQ_VNNI
// HALF: the last 32 bytes of a vector part whose length is an odd multiple of 32, loaded with the upper half
// zeroed: a zero weight byte adds nothing to a product or a row sum.
template <int T, bool SUMS, bool HALF>
inline void tile_step(Zmm, const int8_t* const* w, const int8_t* const* x, int64_t k, __m512i (&a)[RB][T],
                      __m512i* su) {
  constexpr __mmask64 half = 0xFFFFFFFFull;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), ones = _mm512_set1_epi8(1);
  __m512i xv[T];
  for (int t = 0; t < T; ++t)
    xv[t] = _mm512_xor_si512(HALF ? _mm512_maskz_loadu_epi8(half, x[t] + k) : _mm512_loadu_si512(x[t] + k), flip);
  for (int r = 0; r < RB; ++r) {
    const __m512i wv = HALF ? _mm512_maskz_loadu_epi8(half, w[r] + k) : _mm512_loadu_si512(w[r] + k);
    if (SUMS) su[r] = _mm512_dpbusd_epi32(su[r], ones, wv);
    for (int t = 0; t < T; ++t) a[r][t] = _mm512_dpbusd_epi32(a[r][t], xv[t], wv);
  }
}
#endif

// T token rows against the tile over k in [k0, k1) (multiples of 32), accumulated into ``a``. ``next``/``pf``:
// this group's share of the next tile's bytes, pf of them prefetched per step (see tile_block).
template <class V, int T, bool SUMS>
inline void tile_chunk(const int8_t* const* w, const int8_t* const* x, int64_t k0, int64_t k1,
                       typename V::v (&a)[RB][T], typename V::v* sums, const int8_t* next, int64_t pf) {
  typename V::v l[RB][T], su[RB];  // local copies: registers, whether or not the compiler inlines this
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < T; ++t) l[r][t] = a[r][t];
  if (SUMS)
    for (int r = 0; r < RB; ++r) su[r] = sums[r];
  int64_t k = k0;
  for (; k + V::W <= k1; k += V::W, next += pf) {
    for (int64_t p = 0; p < pf; p += 64) _mm_prefetch(reinterpret_cast<const char*>(next + p), _MM_HINT_T0);
    tile_step<T, SUMS, false>(V{}, w, x, k, l, su);
  }
  if (V::W > 32 && k < k1) tile_step<T, SUMS, true>(V{}, w, x, k, l, su);
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < T; ++t) a[r][t] = l[r][t];
  if (SUMS)
    for (int r = 0; r < RB; ++r) sums[r] = su[r];
}

// v plus the products of the tile's rows and one token row ``xt`` over the K tail [kv, K) (under 32 bytes).
inline __m128i add_tail(__m128i v, const int8_t* const* rows, int nb, const int8_t* xt, int64_t kv, int64_t K) {
  if (kv == K) return v;
  alignas(16) int32_t s[RB];
  _mm_store_si128(reinterpret_cast<__m128i*>(s), v);
  for (int r = 0; r < nb; ++r)
    for (int64_t k = kv; k < K; ++k) s[r] += int32_t(xt[k]) * int32_t(rows[r][k]);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(s));
}

// The finished accumulators of T token rows (at ``t`` of the block): int32 products (VNNI: less ``shift``, 128
// times the rows' sums), K tail added, to epi(t, v, nb).
template <class V, int T, class Epi>
inline void finish_group(typename V::v (&a)[RB][T], __m128i shift, const int8_t* const* rows, int nb,
                         const int8_t* x, int64_t t, int64_t K, int64_t kv, Epi& epi) {
  for (int i = 0; i < T; ++i) {
    const typename V::v q[RB] = {a[0][i], a[1][i], a[2][i], a[3][i]};
    epi(t + i, add_tail(_mm_sub_epi32(hsum4<V>(q), shift), rows, nb, x + (t + i) * K, kv, K), nb);
  }
}

// One token group of T rows (at ``t`` of the block) over one chunk; the block's first group sums the rows. The
// accumulators stay in registers within a chunk and go through ``acc`` only between chunks: a K of one chunk
// (Qwen3-30B-A3B's 768 and 2048) never stores them, and its last chunk reduces them straight to the epilogue
// (the loads, stores and zeroing of 64 accumulators per tile had cost Qwen3's K = 768 products ~1/3 of their
// time at 16 tokens).
template <class V, int T, class Epi>
inline void group_chunk(const int8_t* const* rows, int nb, const int8_t* x, int64_t t, int64_t K, int64_t kv,
                        int64_t k0, int64_t k1, typename V::v* acc, typename V::v* sums, const int8_t* next,
                        int64_t pf, __m128i& shift, Epi& epi) {
  const int8_t* xs[T];
  for (int i = 0; i < T; ++i) xs[i] = x + (t + i) * K;
  typename V::v a[RB][T];
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < T; ++i) a[r][i] = k0 == 0 ? V::zero() : acc[(t + i) * RB + r];
  if (t == 0)
    tile_chunk<V, T, true>(rows, xs, k0, k1, a, sums, next, pf);
  else
    tile_chunk<V, T, false>(rows, xs, k0, k1, a, sums, next, pf);
  if (k1 == kv) {
#ifdef HAQ_DP
    // 128 * each row's sum, modulo 2**32 as vpdpbusd's: once per block, when its first group has summed the rows
    // (reduced again by every group, it cost Qwen3's experts 6% of their time at 16 tokens)
    if (t == 0) shift = _mm_slli_epi32(hsum4<V>(sums), 7);
#endif
    return finish_group<V, T>(a, shift, rows, nb, x, t, K, kv, epi);
  }
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < T; ++i) acc[(t + i) * RB + r] = a[r][i];
}

// Products of the tile ``rows`` (RB rows of w, nb of them real) with m <= TB token rows of x; epi(t, v, nb) per
// token, v's lanes the tile's rows (see gemm_rows).
//
// ``next``: the RB * K contiguous bytes of the tile after the next one (or nullptr), prefetched linearly while
// this one computes: the tile reads RB streams K bytes apart, which the hardware prefetcher only learns on long
// rows (Qwen3's K = 768 ran at 40% of read bandwidth without it, Mixtral's K = 14336 at 95%). Two tiles ahead,
// not one: the last of a tile's prefetches had not arrived when the next tile began, and Qwen3's short tiles at
// 3-8 tokens took 7-15% longer on a Zen 5 core (Mixtral's long ones within 2% either way). Each chunk's share is
// spread evenly over all its token groups: issued by the first group alone, the burst of misses overflowed the
// core's miss buffers at 16 tokens and the w13 products of Qwen3's experts ran 25% slower from DRAM than from cache.
template <class V, class Epi>
void tile_block(const int8_t* const* rows, int nb, const int8_t* x, int64_t m, int64_t K, const int8_t* next,
                Epi&& epi) {
  typename V::v acc[TB * RB], sums[RB];  // acc: between chunks only
  for (auto& v : sums) v = V::zero();
  const int64_t kv = K / 32 * 32, groups = m / TT + (TT > 2 && m % TT >= 2) + (m % 2);
  if (kv == 0) {  // K < 32: the tail is all
    for (int64_t t = 0; t < m; ++t) epi(t, add_tail(_mm_setzero_si128(), rows, nb, x + t * K, 0, K), nb);
    return;
  }
  for (int64_t k0 = 0; k0 < kv; k0 += KC) {
    const int64_t k1 = std::min(kv, k0 + KC), steps = (k1 - k0 + V::W - 1) / V::W;
    const int64_t share = ((k1 - k0) * RB + groups - 1) / groups;
    const int64_t pf = next ? (share + steps * 64 - 1) / (steps * 64) * 64 : 0;
    int64_t t = 0, g = 0;
    __m128i shift = _mm_setzero_si128();
    auto pre = [&]() -> const int8_t* { return next ? next + k0 * RB + share * g++ : nullptr; };
    for (; t + TT <= m; t += TT) group_chunk<V, TT>(rows, nb, x, t, K, kv, k0, k1, acc, sums, pre(), pf, shift, epi);
    if (TT > 2 && t + 2 <= m) {
      group_chunk<V, 2>(rows, nb, x, t, K, kv, k0, k1, acc, sums, pre(), pf, shift, epi);
      t += 2;
    }
    if (t < m) group_chunk<V, 1>(rows, nb, x, t, K, kv, k0, k1, acc, sums, pre(), pf, shift, epi);
  }
}

}  // namespace haq
