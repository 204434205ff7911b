// CS (complementary sparsity) on the CPU, the direct method along Cin: every kept weight is one
// broadcast feeding T vectors of output pixels (see common.h for the layout and the driver).
#include "common.h"

using namespace sc;

namespace {

// K*M, the length of a CS segment along Cin, checked against Cin and the Cin chunk.
int64_t check_segments(const Geo& g, int64_t K, int64_t M) {
  const int64_t KM = K * M;
  SC_CHECK(K > 0 && M > 0 && g.cin % KM == 0, "Cin=", g.cin, " is not a multiple of K*M=", KM);
  SC_CHECK(g.chunk % KM == 0, "cin chunk must be a multiple of K*M");
  return KM;
}

}  // namespace

// cin form: vals/idx [Cout, taps, Cin/K]; slot j = seg*M + n keeps input channel
// seg*K*M + n + M*idx (the CS paper's n + M*Idx inside each length-K*M segment).
extern "C" int sc_cs_direct(const float* x, const float* vals, const uint8_t* idx,
                            const int64_t* tap_off, int64_t taps, int64_t K, int64_t M,
                            const sc_geometry* geo, float* y, const float* bias,
                            const float* res) {
  return guarded([&] {
    const Geo g = geo_from(geo, bias, res, y);
    const int64_t nj = g.cin / K, KM = check_segments(g, K, M);
    const int64_t cs = g.chan_stride;
    dispatch_T(g.tile, [&](auto Tc) {
      constexpr int T = decltype(Tc)::value;
      drive<T>(g, x, y, [&](float* tb, float* dst, bool first, const auto& mk, const float* xi,
                            int64_t o, int64_t c0, int64_t c1, const Epi& e) {
        vec acc[T];
        UNROLL for (int t = 0; t < T; ++t) acc[t] = first ? vzero() : vloadu(tb + t * VW);
        for (int64_t t = 0; t < taps; ++t) {
          const float* xt = xi + tap_off[t];
          const float* w = vals + (o * taps + t) * nj;
          const uint8_t* ix = idx + (o * taps + t) * nj;
          for (int64_t seg = c0 / KM; seg < c1 / KM; ++seg) {
            const float* xs = xt + seg * KM * cs;
            const int64_t j0 = seg * M;
            for (int64_t n = 0; n < M; ++n) {
              const vec wb = vset(w[j0 + n]);
              const float* p = xs + (n + M * (int64_t)ix[j0 + n]) * cs;
UNROLL
              for (int u = 0; u < T; ++u) acc[u] = vfma(wb, mk.load(p + u * VW, u), acc[u]);
            }
          }
        }
        emit<T>(acc, tb, dst, mk, e);
      });
    });
  });
}

// Indices expanded at prepare time: vals/off [Cout, nseg, taps*M] (segment-major, so a Cin
// chunk is a contiguous range); off = kept channel * chan_stride + tap offset (int32).
extern "C" int sc_cs_offsets(const float* x, const float* vals, const int32_t* off, int64_t K,
                             int64_t M, int64_t taps, const sc_geometry* geo, float* y,
                             const float* bias, const float* res) {
  return guarded([&] {
    const Geo g = geo_from(geo, bias, res, y);
    const int64_t KM = check_segments(g, K, M);
    const int64_t nseg = g.cin / KM, per_seg = taps * M;
    dispatch_T(g.tile, [&](auto Tc) {
      constexpr int T = decltype(Tc)::value;
      drive<T>(g, x, y, [&](float* tb, float* dst, bool first, const auto& mk, const float* xi,
                            int64_t o, int64_t c0, int64_t c1, const Epi& e) {
        accumulate_list<T>(tb, dst, first, mk, xi, vals, off, (o * nseg + c0 / KM) * per_seg,
                           (o * nseg + c1 / KM) * per_seg, e);
      });
    });
  });
}

SC_LIBRARY_EXPORTS
