"""How fast exact int8 products can be on this CPU's vector units: throughput of the AVX2 instruction chains.

Exact W8A8 on AVX2 (vllm_haq/kernels/cpu/int8_gemm.cpp) needs the sign step before vpmaddubsw, so 32 products
cost vpsignb + vpmaddubsw + vpmaddwd + vpaddd (plus a vpabsb per weight vector, shared by the tokens of a tile);
fbgemm's saturating form drops the sign step. Each chain runs here in ten independent dependency chains (no
memory traffic), so its time per step is the core's throughput for it; the ratio bounds what a compute-bound
call (many tokens per weight, e.g. M = 16) can gain over the exact kernel without giving exactness up. With
AVX-512 VNNI one vpdpbusd replaces the three multiply-add instructions.

    .venv/bin/python benchmarks/int8_isa_bound.py            # prints a markdown table
"""

from __future__ import annotations

import time

from torch.utils.cpp_extension import load_inline

_SOURCE = r"""
#include <immintrin.h>
#include <cstdint>
#define CHAINS(F) a0=F(a0,b);a1=F(a1,b);a2=F(a2,b);a3=F(a3,b);a4=F(a4,b);a5=F(a5,b);a6=F(a6,b);a7=F(a7,b);\
a8=F(a8,b);a9=F(a9,b);
#define LOOP(F) { __m256i a0=_mm256_set1_epi8(1),a1=_mm256_set1_epi8(2),a2=_mm256_set1_epi8(3),a3=_mm256_set1_epi8(4),\
a4=_mm256_set1_epi8(5),a5=_mm256_set1_epi8(6),a6=_mm256_set1_epi8(7),a7=_mm256_set1_epi8(8),a8=_mm256_set1_epi8(9),\
a9=_mm256_set1_epi8(10); const __m256i b=_mm256_set1_epi8(3); for (int64_t i = 0; i < iters; ++i) { CHAINS(F) \
__asm__ volatile("" : "+x"(a0),"+x"(a1),"+x"(a2),"+x"(a3),"+x"(a4),"+x"(a5),"+x"(a6),"+x"(a7),"+x"(a8),"+x"(a9)); } \
__m256i z=_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a0,a1),_mm256_add_epi32(a2,a3)),_mm256_add_epi32(\
_mm256_add_epi32(a4,a5),_mm256_add_epi32(_mm256_add_epi32(a6,a7),_mm256_add_epi32(a8,a9)))); \
return _mm256_extract_epi32(z, 0); }
static inline __m256i exact(__m256i acc, __m256i w) {  // |w| and x * sign(w) per 32 products, as the kernel
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(acc, w)),
                                                 _mm256_set1_epi16(1)));
}
static inline __m256i exact_shared_abs(__m256i acc, __m256i aw) {  // the abs shared by a tile's tokens
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(acc, aw)),
                                                 _mm256_set1_epi16(1)));
}
static inline __m256i saturating(__m256i acc, __m256i w) {  // fbgemm's u8 x s8 form
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, acc), _mm256_set1_epi16(1)));
}
int64_t run_exact(int64_t iters) LOOP(exact)
int64_t run_exact_shared_abs(int64_t iters) LOOP(exact_shared_abs)
int64_t run_saturating(int64_t iters) LOOP(saturating)
"""

CHAINS = {"exact (vpabsb + vpsignb + vpmaddubsw + vpmaddwd + vpaddd)": "run_exact",
          "exact, abs shared by the tile's tokens (the kernel's inner step)": "run_exact_shared_abs",
          "saturating (fbgemm: vpmaddubsw + vpmaddwd + vpaddd)": "run_saturating"}


def main():
    module = load_inline("haq_int8_isa_bound", cpp_sources=_SOURCE, functions=list(CHAINS.values()),
                         extra_cflags=["-O2", "-mavx2"], verbose=False)
    iters = 20_000_000
    rows = []
    for what, fn in CHAINS.items():
        best = min(_timed(getattr(module, fn), iters) for _ in range(3))
        rows.append((what, best / (iters * 10) * 1e9, 32 * iters * 10 / best / 1e9))
    print("| chain per 32 int8 products | ns per step | GMAC/s, one core, no memory traffic |")
    print("|---|---|---|")
    for what, ns, gmacs in rows:
        print(f"| {what} | {ns:.3f} | {gmacs:.0f} |")
    print(f"\nexact / saturating time: {rows[1][1] / rows[2][1]:.2f}x (the kernel's step against fbgemm's)")


def _timed(fn, iters):
    t = time.perf_counter()
    fn(iters)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
