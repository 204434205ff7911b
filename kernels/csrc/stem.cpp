// A dense convolution with few input channels (a network's stem: ResNet's 7x7 stride-2 3->64),
// its bias and ReLU, and the max-pool after it, in one parallel pass that writes the pooled
// output channels-last (NHWC): the convolution's output rows live only in a small per-thread
// ring (pool-window rows of W x Cout floats) and are pooled while they are in the cache, where
// a convolution, a ReLU and a max-pool as three operations write and read the full-size output
// (ResNet50 at 224x224: 3.2 MB per image) three times over.
//
// Convolution: per output row, tiles of P pixels x CB vectors of output channels accumulate in
// registers; each weight vector (packed [ky][ci][kx][cout]) serves the P pixels, each input
// value (a broadcast from the zero-padded NCHW copy xp) serves the CB vectors.
// Pooling: max over the window (padding counts as -inf; a NaN in a window gives NaN, as in
// nn.MaxPool2d), then + bias, then ReLU when asked: relu(max(v) + b) = max over the window of
// relu(v + b), the convolution's epilogue and the pool in the usual order.
// Threads: OpenMP over (image, band of pool rows) items; a band computes the convolution rows
// its pool rows read, so neighbouring bands compute the rows they share once each.
#include "common.h"

#include <limits>
#include <vector>

using namespace sc;

struct sc_stem_geometry {
  int64_t n, cin, h, w, cout, k, stride, pad, oh, ow;  // the convolution (k x k)
  int64_t pk, ps, ppad, ph, pw;                        // the max-pool (pk x pk, stride ps)
  int64_t relu, threads, bands;                        // bands: pool-row bands per image
};

namespace {

constexpr int P_MAX = 6;  // pixels per tile: P_MAX x 4 accumulators + 4 weight vectors

inline vec vmax_nan(vec m, vec b) {  // max(m, b), NaN when either is NaN
#if defined(__AVX512F__)
  const __mmask16 nan = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(nan, _mm512_max_ps(m, b), m);
#else
  return (m > b) | (m != m) ? m : b;
#endif
}

// Convolution row oy, pixels [ox0, ox0 + P), channels [c0, c0 + CB*VW) into row[ox][cout].
template <int CB, int P>
void conv_tile(const sc_stem_geometry& g, const float* xp, int64_t hp, int64_t wp,
               const float* wt, int64_t oy, int64_t ox0, int64_t c0, float* row) {
  vec acc[P][CB];
  UNROLL for (int p = 0; p < P; ++p) UNROLL for (int c = 0; c < CB; ++c) acc[p][c] = vzero();
  const int64_t S = g.stride, K = g.k, C = g.cout;
  for (int64_t ky = 0; ky < K; ++ky) {
    for (int64_t ci = 0; ci < g.cin; ++ci) {
      const float* xr = xp + (ci * hp + oy * S + ky) * wp + ox0 * S;
      const float* wr = wt + ((ky * g.cin + ci) * K) * C + c0;
      for (int64_t kx = 0; kx < K; ++kx) {
        vec wv[CB];
        UNROLL for (int c = 0; c < CB; ++c) wv[c] = vloadu(wr + kx * C + c * VW);
UNROLL
        for (int p = 0; p < P; ++p) {
          const vec xb = vset(xr[p * S + kx]);
          UNROLL for (int c = 0; c < CB; ++c) acc[p][c] = vfma(xb, wv[c], acc[p][c]);
        }
      }
    }
  }
  UNROLL for (int p = 0; p < P; ++p) UNROLL for (int c = 0; c < CB; ++c)
    vstore(row + (ox0 + p) * C + c0 + c * VW, acc[p][c]);
}

template <int CB>
void conv_tiles(const sc_stem_geometry& g, const float* xp, int64_t hp, int64_t wp,
                const float* wt, int64_t oy, int64_t c0, float* row) {
  int64_t ox = 0;
  for (; ox + P_MAX <= g.ow; ox += P_MAX) conv_tile<CB, P_MAX>(g, xp, hp, wp, wt, oy, ox, c0, row);
  switch (g.ow - ox) {
    case 0: break;
    case 1: conv_tile<CB, 1>(g, xp, hp, wp, wt, oy, ox, c0, row); break;
    case 2: conv_tile<CB, 2>(g, xp, hp, wp, wt, oy, ox, c0, row); break;
    case 3: conv_tile<CB, 3>(g, xp, hp, wp, wt, oy, ox, c0, row); break;
    case 4: conv_tile<CB, 4>(g, xp, hp, wp, wt, oy, ox, c0, row); break;
    default: conv_tile<CB, 5>(g, xp, hp, wp, wt, oy, ox, c0, row); break;
  }
}

void conv_row(const sc_stem_geometry& g, const float* xp, int64_t hp, int64_t wp,
              const float* wt, int64_t oy, float* row) {
  for (int64_t c0 = 0; c0 < g.cout; c0 += 4 * VW) {
    switch (std::min<int64_t>(4, (g.cout - c0) / VW)) {
      case 1: conv_tiles<1>(g, xp, hp, wp, wt, oy, c0, row); break;
      case 2: conv_tiles<2>(g, xp, hp, wp, wt, oy, c0, row); break;
      case 3: conv_tiles<3>(g, xp, hp, wp, wt, oy, c0, row); break;
      default: conv_tiles<4>(g, xp, hp, wp, wt, oy, c0, row); break;
    }
  }
}

// Pool row py from the ring (conv row r at ring + (r % pk) * ow * cout) into y's row.
void pool_row(const sc_stem_geometry& g, const float* ring, const float* bias, int64_t py,
              float* y) {
  const int64_t C = g.cout, r0 = std::max<int64_t>(0, py * g.ps - g.ppad),
                r1 = std::min<int64_t>(g.oh, py * g.ps - g.ppad + g.pk);
  const vec ninf = vset(-std::numeric_limits<float>::infinity());
  for (int64_t px = 0; px < g.pw; ++px) {
    const int64_t c0 = std::max<int64_t>(0, px * g.ps - g.ppad),
                  c1 = std::min<int64_t>(g.ow, px * g.ps - g.ppad + g.pk);
    for (int64_t cv = 0; cv < C; cv += VW) {
      vec m = ninf;
      for (int64_t r = r0; r < r1; ++r) {
        const float* src = ring + (r % g.pk) * g.ow * C + cv;
        for (int64_t c = c0; c < c1; ++c) m = vmax_nan(m, vloadu(src + c * C));
      }
      m = vadd(m, vloadu(bias + cv));
      vstore(y + px * C + cv, g.relu ? vrelu(m) : m);
    }
  }
}

}  // namespace

// x: NCHW [n][cin][h][w]; xp: scratch of n*cin*(h+2pad)*(w+2pad) floats (the padded copy);
// wt: packed [k][cin][k][cout]; bias: [cout]; y: NHWC [n][ph][pw][cout].
extern "C" int sc_stem_conv_pool(const sc_stem_geometry* gp, const float* x, float* xp,
                                 const float* wt, const float* bias, float* y) {
  return guarded([&] {
    SC_CHECK(gp != nullptr, "no geometry");
    const sc_stem_geometry g = *gp;
    SC_CHECK(g.n >= 0 && g.cin > 0 && g.cout > 0 && g.cout % VW == 0 && g.k > 0 &&
                 g.stride > 0 && g.pad >= 0 && g.oh > 0 && g.ow > 0 &&
                 (g.oh - 1) * g.stride + g.k <= g.h + 2 * g.pad &&
                 (g.ow - 1) * g.stride + g.k <= g.w + 2 * g.pad,
             "bad convolution geometry");
    SC_CHECK(g.pk > 0 && g.ps > 0 && g.ppad >= 0 && 2 * g.ppad <= g.pk && g.ph > 0 &&
                 g.pw > 0 && (g.ph - 1) * g.ps - g.ppad < g.oh &&
                 (g.pw - 1) * g.ps - g.ppad < g.ow && g.bands >= 1 && g.bands <= g.ph,
             "bad max-pool geometry");
    const int64_t hp = g.h + 2 * g.pad, wp = g.w + 2 * g.pad, img = g.cin * hp * wp;
    const int64_t items = g.n * g.bands, threads = std::max<int64_t>(1, g.threads);
    const int64_t ring_size = g.pk * g.ow * g.cout;
    // each thread's ring, allocated here: an allocation failing inside the parallel region
    // could not reach guarded()
    std::vector<float> rings(threads * ring_size);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int64_t rr = 0; rr < g.n * g.cin * hp; ++rr) {  // the padded copy, a row each
        const int64_t nc = rr / hp, r = rr % hp - g.pad;
        float* dst = xp + rr * wp;
        if (r < 0 || r >= g.h) {
          std::fill(dst, dst + wp, 0.f);
          continue;
        }
        std::fill(dst, dst + g.pad, 0.f);
        std::memcpy(dst + g.pad, x + (nc * g.h + r) * g.w, sizeof(float) * g.w);
        std::fill(dst + g.pad + g.w, dst + wp, 0.f);
      }
      float* ring = rings.data() + omp_get_thread_num() * ring_size;
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t ni = it / g.bands, b = it % g.bands;
        const int64_t p0 = b * g.ph / g.bands, p1 = (b + 1) * g.ph / g.bands;
        const int64_t r_lo = std::max<int64_t>(0, p0 * g.ps - g.ppad);
        const int64_t r_hi = std::min<int64_t>(g.oh, (p1 - 1) * g.ps - g.ppad + g.pk);
        const float* xi = xp + ni * img;
        float* yi = y + ni * g.ph * g.pw * g.cout;
        int64_t py = p0;
        for (int64_t r = r_lo; r < r_hi && py < p1; ++r) {
          conv_row(g, xi, hp, wp, wt, r, ring + (r % g.pk) * g.ow * g.cout);
          // every pool row whose window ends at this row (or is cut off by the last row)
          while (py < p1 && std::min<int64_t>(g.oh, py * g.ps - g.ppad + g.pk) - 1 <= r) {
            pool_row(g, ring, bias, py, yi + py * g.pw * g.cout);
            ++py;
          }
        }
      }
    }
  });
}

SC_LIBRARY_EXPORTS
