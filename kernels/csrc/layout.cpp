// The kernels' resident input layout (see common.h and kernels/cpu_layout.py), one parallel pass.
#include "common.h"

#include <limits>

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

// Max-pooling of NCHW x (PyTorch's nn.MaxPool2d without dilation or ceil_mode: padding counts as
// -inf, a NaN in a window gives NaN), one parallel pass over the N*C planes. PyTorch's own NCHW
// max-pool is several times slower at batch 1 (see kernels/cpu_layout.py's max_pool_nchw).
// Per output row: the K input rows' elementwise maximum into a scratch row (contiguous,
// vectorized), then each output column the maximum of its K scratch columns. std::max drops a
// NaN, so a plane whose input holds one is pooled again with a NaN-propagating maximum.
namespace {

inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

template <bool NAN_SAFE>
void pool_plane(const float* src, float* dst, float* t, int64_t H, int64_t W, int64_t K,
                int64_t S, int64_t pad, int64_t OH, int64_t OW) {
  for (int64_t oh = 0; oh < OH; ++oh) {
    const int64_t r0 = std::max<int64_t>(0, oh * S - pad);
    const int64_t r1 = std::min<int64_t>(H, oh * S - pad + K);
    std::memcpy(t, src + r0 * W, sizeof(float) * W);
    for (int64_t r = r0 + 1; r < r1; ++r) {
      const float* row = src + r * W;
      for (int64_t j = 0; j < W; ++j) t[j] = NAN_SAFE ? nan_max(t[j], row[j]) : std::max(t[j], row[j]);
    }
    float* out = dst + oh * OW;
    if (!NAN_SAFE && K == 2 && S == 2 && pad == 0) {
      for (int64_t ow = 0; ow < OW; ++ow) out[ow] = std::max(t[2 * ow], t[2 * ow + 1]);
      continue;
    }
    for (int64_t ow = 0; ow < OW; ++ow) {
      const float* c = t + ow * S - pad;
      float m = c[0];
      for (int64_t k = 1; k < K; ++k) m = NAN_SAFE ? nan_max(m, c[k]) : std::max(m, c[k]);
      out[ow] = m;
    }
  }
}

}  // namespace

extern "C" int sc_max_pool_nchw(const float* xv, int64_t N, int64_t C, int64_t H, int64_t W,
                                int64_t K, int64_t S, int64_t pad, int64_t OH, int64_t OW,
                                float* yv, int64_t threads) {
  return guarded([&] {
    SC_CHECK(K > 0 && S > 0 && pad >= 0 && 2 * pad <= K && OH > 0 && OW > 0 &&
                 (OH - 1) * S - pad < H && (OW - 1) * S - pad < W,
             "bad max-pool geometry");
    const float ninf = -std::numeric_limits<float>::infinity();
#pragma omp parallel num_threads(std::max<int64_t>(1, threads))
    {
      std::vector<float> tmp(W + 2 * pad + K);
      float* t = tmp.data() + pad;  // t[-pad .. W+pad+K): the padded columns stay -inf
      for (int64_t i = -pad; i < 0; ++i) t[i] = ninf;
      for (int64_t i = W; i < W + pad + K; ++i) t[i] = ninf;
#pragma omp for schedule(static)
      for (int64_t nc = 0; nc < N * C; ++nc) {
        const float* src = xv + nc * H * W;
        float* dst = yv + nc * OH * OW;
        pool_plane<false>(src, dst, t, H, W, K, S, pad, OH, OW);
        bool nan = false;
        for (int64_t i = 0; i < H * W; ++i) nan |= src[i] != src[i];
        if (nan) pool_plane<true>(src, dst, t, H, W, K, S, pad, OH, OW);
      }
    }
  });
}

// y = x W^T + b for a few images (a Linear layer at a small batch): x [M, K], W [N, K]
// row-major, read once from memory in parallel blocks of 4 rows; each image's dot products
// with a block's rows (then in the cache) in vector FMAs, summed across lanes at the end.
// PyTorch's batch-1 Linear read VGG19's 411 MB classifier weight at 15 GB/s on a 2-core EPYC,
// where a plain pass over it runs at 24 GB/s. A NaN propagates (sums only).
namespace {

inline float lane_sum(vec a) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(a);
#else
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += a[i];
  return s;
#endif
}

}  // namespace

extern "C" int sc_linear_gemv(const float* xv, const float* w, const float* b, float* yv,
                              int64_t K, int64_t N, int64_t M, int64_t threads) {
  return guarded([&] {
    SC_CHECK(K > 0 && N > 0 && M > 0, "bad linear shape");
    constexpr int R = 4;
#pragma omp parallel for num_threads(std::max<int64_t>(1, threads)) schedule(static)
    for (int64_t blk = 0; blk < (N + R - 1) / R; ++blk) {
      const int64_t o0 = blk * R, rows = std::min<int64_t>(R, N - o0);
      const float* wr[R];
      UNROLL for (int r = 0; r < R; ++r)  // a short block repeats its last row
        wr[r] = w + (o0 + std::min<int64_t>(r, rows - 1)) * K;
      for (int64_t img = 0; img < M; ++img) {
        const float* x = xv + img * K;
        vec acc[R];
        UNROLL for (int r = 0; r < R; ++r) acc[r] = vzero();
        int64_t k = 0;
        for (; k + VW <= K; k += VW) {
          const vec xk = vloadu(x + k);
          UNROLL for (int r = 0; r < R; ++r) acc[r] = vfma(vloadu(wr[r] + k), xk, acc[r]);
        }
        if (k < K) {
          const vmask m = lane_mask(K - k);
          const vec xk = vload(x + k, m);
          UNROLL for (int r = 0; r < R; ++r) acc[r] = vfma(vload(wr[r] + k, m), xk, acc[r]);
        }
        float* y = yv + img * N;
        for (int64_t r = 0; r < rows; ++r) y[o0 + r] = lane_sum(acc[r]) + (b ? b[o0 + r] : 0.f);
      }
    }
  });
}

SC_LIBRARY_EXPORTS
