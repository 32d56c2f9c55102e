// GPTQ's column loop over one block (vllm_haq/quant/gptq.py, GPTQSolver._columns) on the CPU, bit for bit.
//
// Why: the torch loop issues ~8 tiny ops per column (6.5 us of dispatch each), ~7 ms per 128-column block of
// which ~0.2 ms is arithmetic; the converter spent a tenth of its time there. Here a block is one call.
//
// The same float32 operations per element, in the same order, as the torch loop (tests/test_gptq_native.py):
//   q   = clamp(round_half_even(w / scale), -127, 127)
//   err = (w - q * scale) / hinv[j, j]
//   and every later column i of the block: w[i] -= hinv[j, i] * err (the product rounded, then subtracted).
// Built with -ffp-contract=off (no fused multiply-add) and without -ffast-math; nearbyint rounds half to even
// under the default rounding mode, as torch.round does. vllm_haq/quant/gptq_cpu.py adds -mavx2 where the CPU has
// it (vdivps, vroundps, 8 floats a register); elsewhere the same source builds for the baseline instruction set.
//
// Rows are independent given hinv, so the block is cut into tiles of ROWS rows, each carried through all the
// block's columns while its errors are in L1/L2 (n * 256 bytes), tiles spread over OpenMP threads. A tile's
// column j is updated left-looking: it starts from w[j] and subtracts hinv[k, j] * err[k] for k = 0, 1, ...,
// j - 1, the order in which the torch loop's right-looking updates reach it, with the tile's 64 values in
// registers (one load, multiply and subtract per 8 values and k: ~80 GFLOP/s on one Zen 4 core). w ends as the
// torch loop leaves it (each column as it was before its rounding).
#include <torch/extension.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int V = 8;  // floats per vector (one AVX register; two SSE/NEON ones elsewhere)
constexpr int NV = 8;  // vectors per tile: 8 independent subtraction chains hide the add latency
constexpr int64_t ROWS = V * NV;  // rows per tile
typedef float vf __attribute__((vector_size(V * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// One tile: ROWS rows of the block, whose values for column j are at w/err/q + j * ld. The k loop reads the
// earlier columns' errors from ``packed`` (one row of ROWS floats per column) instead of err: the block's rows
// are ld * 4 bytes apart, and where that is a multiple of 4 KiB (3072 or 4096 rows) every column of a tile falls
// into the same L1 sets and evicts the others (a third slower at 3072 rows).
void tile(float* w, float* err, int8_t* q, int64_t ld, const float* s, const float* h, int64_t hs, int64_t n,
          float* packed) {
  for (int64_t j = 0; j < n; ++j) {
    float* wj = w + j * ld;
    vf acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = load(wj + v * V);
    for (int64_t k = 0; k < j; ++k) {
      const float hk = h[k * hs + j];
      const float* ek = packed + k * ROWS;
      for (int v = 0; v < NV; ++v) acc[v] = acc[v] - hk * load(ek + v * V);
    }
    for (int v = 0; v < NV; ++v) store(wj + v * V, acc[v]);
    const float d = h[j * hs + j];
    float* ej = packed + j * ROWS;
    int8_t* qj = q + j * ld;
    for (int64_t r = 0; r < ROWS; ++r) {
      float x = std::nearbyint(wj[r] / s[r]);
      x = x < -127.0f ? -127.0f : (x > 127.0f ? 127.0f : x);  // NaN stays NaN, as torch.clamp leaves it
      qj[r] = static_cast<int8_t>(x);
      ej[r] = (wj[r] - x * s[r]) / d;
    }
    std::copy(ej, ej + ROWS, err + j * ld);
  }
}

// One thread's scratch: the packed errors of its tile, and a padded copy of the last tile (fewer than ROWS rows:
// zeros and scale 1 beyond them, lanes computed and dropped).
struct Scratch {
  std::vector<float> packed, w, err, s;
  std::vector<int8_t> q;
  explicit Scratch(int64_t n) : packed(n * ROWS) {}

  void run(float* w0, float* e0, int8_t* q0, int64_t ld, const float* s0, const float* h, int64_t hs, int64_t n,
           int64_t len) {
    if (len == ROWS) {
      tile(w0, e0, q0, ld, s0, h, hs, n, packed.data());
      return;
    }
    w.assign(n * ROWS, 0.0f);
    s.assign(ROWS, 1.0f);
    err.resize(n * ROWS);
    q.resize(n * ROWS);
    std::copy(s0, s0 + len, s.begin());
    for (int64_t j = 0; j < n; ++j) std::copy(w0 + j * ld, w0 + j * ld + len, w.begin() + j * ROWS);
    tile(w.data(), err.data(), q.data(), ROWS, s.data(), h, hs, n, packed.data());
    for (int64_t j = 0; j < n; ++j) {
      std::copy(w.begin() + j * ROWS, w.begin() + j * ROWS + len, w0 + j * ld);
      std::copy(err.begin() + j * ROWS, err.begin() + j * ROWS + len, e0 + j * ld);
      std::copy(q.begin() + j * ROWS, q.begin() + j * ROWS + len, q0 + j * ld);
    }
  }
};

// w_t [n, rows] float32 (updated in place), scale [rows], hinv [n, n] (rows may be strided: a block of the
// whole H^-1 factor); writes q_t [n, rows] int8 and err_t [n, rows] float32. threads: at most this many.
void columns(torch::Tensor w_t, torch::Tensor scale, torch::Tensor hinv, torch::Tensor q_t, torch::Tensor err_t,
             int64_t threads) {
  TORCH_CHECK(w_t.device().is_cpu() && scale.device().is_cpu() && hinv.device().is_cpu() &&
              q_t.device().is_cpu() && err_t.device().is_cpu(), "gptq columns: CPU tensors expected");
  TORCH_CHECK(w_t.scalar_type() == torch::kFloat && scale.scalar_type() == torch::kFloat &&
              hinv.scalar_type() == torch::kFloat && err_t.scalar_type() == torch::kFloat &&
              q_t.scalar_type() == torch::kChar, "gptq columns: float32 w_t, scale, hinv, err_t and int8 q_t expected");
  TORCH_CHECK(w_t.dim() == 2 && w_t.is_contiguous() && q_t.is_contiguous() && err_t.is_contiguous() &&
              scale.is_contiguous(), "gptq columns: contiguous w_t, scale, q_t, err_t expected");
  const int64_t n = w_t.size(0), rows = w_t.size(1);
  TORCH_CHECK(scale.numel() == rows && q_t.sizes() == w_t.sizes() && err_t.sizes() == w_t.sizes(),
              "gptq columns: scale [rows], q_t and err_t [n, rows] expected");
  TORCH_CHECK(hinv.dim() == 2 && hinv.size(0) == n && hinv.size(1) == n, "gptq columns: hinv [n, n] expected");
  if (hinv.stride(1) != 1) hinv = hinv.contiguous();
  float* w = w_t.data_ptr<float>();
  float* e = err_t.data_ptr<float>();
  int8_t* q = q_t.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const float* h = hinv.data_ptr<float>();
  const int64_t hs = hinv.stride(0), tiles = (rows + ROWS - 1) / ROWS;
  // A team only where there is work to share: below ~1M multiply-subtracts its start-up is not repaid.
  const int64_t team = std::max<int64_t>(1, std::min<int64_t>({threads, tiles, rows * n * n / (1 << 20) + 1}));
#pragma omp parallel num_threads(team) if (team > 1)
  {
    Scratch scratch(n);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = t * ROWS;
      scratch.run(w + r0, e + r0, q + r0, rows, s + r0, h, hs, n, std::min(ROWS, rows - r0));
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Released while it computes: nothing of Python's is touched, and another thread may convert meanwhile.
  m.def("columns", &columns, "GPTQ's column loop of one block, bit for bit as the torch loop",
        py::call_guard<py::gil_scoped_release>());
}
