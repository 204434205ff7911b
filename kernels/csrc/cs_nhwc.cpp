// CS (complementary sparsity) on the CPU over channels-last activations, 16 filters per vector.
//
// With M=1 a CS segment is K consecutive input channels (K <= 16) and a filter keeps one of
// them per tap: the K candidates lie inside one 16-channel vector of an NHWC pixel. For a block
// of 16 filters, one vector load of a pixel's channels feeds every filter of the block at once:
// a lane permutation (vpermps) picks each filter's kept channel into that filter's lane, and one
// FMA with the 16 filters' weights accumulates them. The same loaded vector serves FB filter
// blocks (FB permutations and FMAs), and each block's indices and weights serve PB pixels, so
// loads per FMA fall from one (the planar direct kernel, cs.cpp: every FMA loads its own input
// vector) to (PB + 2 FB) / (PB FB).
//
// Layout: x NHWC [n][h][w][cin] (torch's channels_last), y NHWC [n][oh][ow][cout]; idx/w
// [cout/16][slots][16], slot = tap * (cin/K) + segment (tap = r*kw + s), lane = filter within
// the block; idx holds the lane of the slot's vector (segment*K % 16 + kept index) and voff
// [slots] the float offset of that vector inside a pixel (segment*K / 16 * 16). Zero padding:
// a tap falling outside the image reads a zero vector. Epilogue: + bias, + residual (NHWC like
// y, read at the output element's own offset), ReLU.
#include "common.h"

using namespace sc;

struct sc_nhwc_geometry {
  int64_t n, h, w, cin, cout, oh, ow, kh, kw, stride, pad, threads, relu, fb, pb;
};

#if defined(__AVX512F__)
namespace {

constexpr int MAX_TAPS = 25;

// Pointers to the input pixel of every tap of PB output pixels from q0 (a zero vector where the
// tap falls in the padding; pixels past the image repeat its last, their results unused).
template <int PB>
void tap_pointers(const sc_nhwc_geometry& g, const float* x, const float* zeros, int64_t img,
                  int64_t q0, const float** ptr) {
  const int64_t taps = g.kh * g.kw, P = g.oh * g.ow;
  for (int p = 0; p < PB; ++p) {
    const int64_t q = std::min(q0 + p, P - 1), oh = q / g.ow, ow = q % g.ow;
    for (int64_t r = 0; r < g.kh; ++r)
      for (int64_t s = 0; s < g.kw; ++s) {
        const int64_t ih = oh * g.stride + r - g.pad, iw = ow * g.stride + s - g.pad;
        const bool in = ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
        ptr[p * taps + r * g.kw + s] = in ? x + ((img * g.h + ih) * g.w + iw) * g.cin : zeros;
      }
  }
}

// FB filter blocks from b0 x PB pixels from q0: accumulate every slot, then the epilogue.
template <int FB, int PB>
void item(const sc_nhwc_geometry& g, const float* const* ptr, const int32_t* idx,
          const float* wts, const int64_t* voff, int64_t slots, float* y, const float* bias,
          const float* res, int64_t img, int64_t q0, int64_t b0) {
  const int64_t taps = g.kh * g.kw, per_tap = slots / taps, P = g.oh * g.ow;
  vec acc[FB][PB];
  UNROLL for (int f = 0; f < FB; ++f) UNROLL for (int p = 0; p < PB; ++p) acc[f][p] = vzero();
  const int32_t* ib = idx + b0 * slots * 16;
  const float* wb = wts + b0 * slots * 16;
  for (int64_t t = 0; t < taps; ++t) {
    const float* pt[PB];
    UNROLL for (int p = 0; p < PB; ++p) pt[p] = ptr[p * taps + t];
    for (int64_t k = t * per_tap; k < (t + 1) * per_tap; ++k) {
      __m512i ix[FB];
      vec wv[FB];
      UNROLL for (int f = 0; f < FB; ++f) {
        ix[f] = _mm512_loadu_si512(ib + (f * slots + k) * 16);
        wv[f] = _mm512_loadu_ps(wb + (f * slots + k) * 16);
      }
      const int64_t o = voff[k];
      UNROLL for (int p = 0; p < PB; ++p) {
        const vec v = _mm512_loadu_ps(pt[p] + o);
        UNROLL for (int f = 0; f < FB; ++f)
          acc[f][p] = vfma(_mm512_permutexvar_ps(ix[f], v), wv[f], acc[f][p]);
      }
    }
  }
  const bool relu = g.relu != 0;
  UNROLL for (int p = 0; p < PB; ++p) {
    if (q0 + p >= P) break;
    float* yo = y + (img * P + q0 + p) * g.cout + b0 * 16;
    UNROLL for (int f = 0; f < FB; ++f) {
      vec v = acc[f][p];
      if (bias) v = vadd(v, vloadu(bias + (b0 + f) * 16));
      if (res) v = vadd(v, vloadu(res + (yo - y) + f * 16));
      vstore(yo + f * 16, relu ? vrelu(v) : v);
    }
  }
}

template <int FB, int PB>
void run(const sc_nhwc_geometry& g, const float* x, const int32_t* idx, const float* wts,
         const int64_t* voff, int64_t slots, float* y, const float* bias, const float* res) {
  const int64_t P = g.oh * g.ow, nb = g.cout / 16, groups = (nb + FB - 1) / FB;
  const int64_t npb = (P + PB - 1) / PB, blocks = g.n * npb;
  if (blocks == 0) return;  // an empty batch
  // a work item is a pixel block and a share of the filter groups: its tap pointers are found
  // once for all of them, and the shares are enough items to keep the threads even
  const int64_t shares = std::min(groups, std::max<int64_t>(1, (8 * g.threads + blocks - 1) /
                                                                   blocks));
  const int64_t per = (groups + shares - 1) / shares;
  const std::vector<float> zeros(g.cin, 0.f);  // a padding tap's pixel
#pragma omp parallel for schedule(static) num_threads(g.threads)
  for (int64_t it = 0; it < blocks * shares; ++it) {
    const int64_t blk = it / shares, share = it % shares;
    const int64_t img = blk / npb, q0 = (blk % npb) * PB;
    const float* ptr[PB * MAX_TAPS];
    tap_pointers<PB>(g, x, zeros.data(), img, q0, ptr);
    for (int64_t gi = share * per; gi < std::min(groups, (share + 1) * per); ++gi) {
      const int64_t b0 = gi * FB;
      if (nb - b0 >= FB) {
        item<FB, PB>(g, ptr, idx, wts, voff, slots, y, bias, res, img, q0, b0);
      } else {
        for (int64_t b = b0; b < nb; ++b)
          item<1, PB>(g, ptr, idx, wts, voff, slots, y, bias, res, img, q0, b);
      }
    }
  }
}

}  // namespace
#endif

// x NHWC, idx/w [cout/16][slots][16], voff [slots]; y NHWC (written whole); bias [cout] or
// null; res NHWC like y or null. Filter blocks FB and pixels PB per work item: (2, 8), (2, 12),
// (3, 7), (4, 5) (FB*PB accumulators, FB index and FB weight vectors in the 32 registers).
extern "C" int sc_cs_nhwc(const float* x, const int32_t* idx, const float* wts,
                          const int64_t* voff, int64_t slots, const sc_nhwc_geometry* geo,
                          float* y, const float* bias, const float* res) {
  return guarded([&] {
    SC_CHECK(geo != nullptr, "no geometry");
    sc_nhwc_geometry g = *geo;
    g.threads = std::max<int64_t>(1, g.threads);
    const int64_t taps = g.kh * g.kw;
    SC_CHECK(g.n >= 0 && g.cin % 16 == 0 && g.cout % 16 == 0 && g.cout > 0 && g.oh > 0 &&
                 g.ow > 0 && taps > 0 && taps <= 25 && slots > 0 && slots % taps == 0,
             "cs_nhwc: bad geometry (Cin and Cout multiples of 16, at most 25 taps)");
#if defined(__AVX512F__)
    const int64_t fb = g.fb, pb = g.pb;
    if (fb == 2 && pb == 8) run<2, 8>(g, x, idx, wts, voff, slots, y, bias, res);
    else if (fb == 2 && pb == 12) run<2, 12>(g, x, idx, wts, voff, slots, y, bias, res);
    else if (fb == 3 && pb == 7) run<3, 7>(g, x, idx, wts, voff, slots, y, bias, res);
    else if (fb == 4 && pb == 5) run<4, 5>(g, x, idx, wts, voff, slots, y, bias, res);
    else fail("cs_nhwc: filter blocks x pixels ", fb, "x", pb, " is not one of 2x8, 2x12, 3x7, 4x5");
#else
    (void)x, (void)idx, (void)wts, (void)voff, (void)y, (void)bias, (void)res;
    fail("cs_nhwc needs AVX-512 (a 16-lane permutation); this build has ", SC_ISA);
#endif
  });
}

SC_LIBRARY_EXPORTS
