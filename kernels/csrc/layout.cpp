// The kernels' resident input layout (see common.h and kernels/cpu_layout.py), one parallel pass.
#include "common.h"

using namespace sc;

// The resident layout, one parallel pass: copy NCHW x into the interior of buf's stride-phase
// planes (see kernels/cpu_layout.py); buf's padding is never written, so it stays zero.
// x is [N, C, H, W] float32, contiguous; buf holds N*C*chan_stride floats (checked by the caller).
extern "C" int sc_layout_fill(const float* xv, int64_t N, int64_t C, int64_t H, int64_t W,
                              float* bv, int64_t S, int64_t pad, int64_t na, int64_t nb,
                              int64_t Hq, int64_t Wq, int64_t chan_stride, int64_t threads) {
  return guarded([&] {
    SC_CHECK(S > 0 && pad >= 0 && na * nb * Hq * Wq <= chan_stride,
             "layout buffer is smaller than its geometry");
#pragma omp parallel for num_threads(std::max<int64_t>(1, threads)) schedule(static)
    for (int64_t nc = 0; nc < N * C; ++nc) {
      const float* src = xv + nc * H * W;
      float* dst = bv + nc * chan_stride;
      for (int64_t a = 0; a < na; ++a) {
        const int64_t i0 = std::max<int64_t>(0, (pad - a + S - 1) / S), r0 = S * i0 + a - pad;
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t j0 = std::max<int64_t>(0, (pad - b + S - 1) / S), c0 = S * j0 + b - pad;
          const int64_t nj = c0 < W ? (W - c0 + S - 1) / S : 0;
          float* plane = dst + (a * nb + b) * Hq * Wq;
          for (int64_t r = r0, i = i0; r < H; r += S, ++i) {
            const float* row = src + r * W + c0;
            float* out = plane + i * Wq + j0;
            if (S == 1) {
              std::memcpy(out, row, sizeof(float) * nj);
            } else {
              for (int64_t j = 0; j < nj; ++j) out[j] = row[S * j];
            }
          }
        }
      }
    }
  });
}

SC_LIBRARY_EXPORTS
