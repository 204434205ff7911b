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

// Aligned rows (the layout's grid row width Wq a multiple of 16 floats, every plane and channel
// 64-byte aligned; see kernels/cpu_layout.py, aligned=True): no load straddles a cache line.
// Tap (r, s) of a stride-S layer reads column shift s/S; instead of loading at that shift, the
// kept weights are grouped by shift (vals/off [Cout, nsets, nseg, .], ranges in start
// [Cout*nsets*nseg + 1]; off = kept channel * chan_stride + plane and row offset, no column
// shift), each group accumulates from aligned loads, and its sum moves into place with a lane
// shift across neighbouring vectors (out[q] += acc_s[q + s]). A tile spans whole grid rows (T a
// multiple of Wq/VW, checked by the caller), so the lanes shifted in past the tile's last vector
// are discarded columns (Wq >= OW + the largest shift) and are taken as zero: no FMA is spent on
// a tile's edge.
namespace {

// (a[k..VW-1], b[0..k-1]): vector a moved down k lanes, the next vector's first lanes after it
template <int K>
inline vec shift_in(vec a, vec b) {
#if defined(__AVX512F__)
  return _mm512_castsi512_ps(
      _mm512_alignr_epi32(_mm512_castps_si512(b), _mm512_castps_si512(a), K));
#else
  typedef int32_t ivec __attribute__((vector_size(VW * 4)));
  ivec idx;
  for (int i = 0; i < VW; ++i) idx[i] = i + K;
  return __builtin_shuffle(a, b, idx);
#endif
}

// res[t] += the group sum acc moved down K lanes (acc's lanes past the tile count as zero)
template <int K, int T>
inline void add_shifted(vec (&res)[T], const vec (&acc)[T]) {
UNROLL
  for (int t = 0; t < T; ++t) {
    if constexpr (K == 0) {
      res[t] = vadd(res[t], acc[t]);
    } else {
      res[t] = vadd(res[t], shift_in<K>(acc[t], t + 1 < T ? acc[t + 1] : vzero()));
    }
  }
}

}  // namespace

extern "C" int sc_cs_aligned(const float* x, const float* vals, const int32_t* off,
                             const int64_t* start, int64_t nsets, int64_t K, int64_t M,
                             const sc_geometry* geo, float* y, const float* bias,
                             const float* res) {
  return guarded([&] {
    const Geo g = geo_from(geo, bias, res, y);
    const int64_t KM = check_segments(g, K, M);
    const int64_t nseg = g.cin / KM;
    SC_CHECK(nsets >= 1 && nsets <= 3, "aligned CS: 1 to 3 column shifts, got ", nsets);
    SC_CHECK((nsets == 1 || g.wq % VW == 0) && g.chan_stride % VW == 0 && g.img_stride % VW == 0,
             "aligned CS: grid rows (with column shifts), channels and images must be whole "
             "vectors");
    SC_CHECK(nsets == 1 || g.tile % (g.wq / VW) == 0,
             "aligned CS: a pixel tile spans whole grid rows (T a multiple of ", g.wq / VW, ")");
    dispatch_T(g.tile, [&](auto Tc) {
      constexpr int T = decltype(Tc)::value;
      drive<T>(g, x, y, [&](float* tb, float* dst, bool first, const auto& mk, const float* xi,
                            int64_t o, int64_t c0, int64_t c1, const Epi& e) {
        vec sum[T];
        UNROLL for (int t = 0; t < T; ++t) sum[t] = first ? vzero() : vloadu(tb + t * VW);
        for (int64_t s = 0; s < nsets; ++s) {
          const int64_t* st = start + (o * nsets + s) * nseg;
          vec acc[T];
          UNROLL for (int t = 0; t < T; ++t) acc[t] = vzero();
          for (int64_t k = st[c0 / KM]; k < st[c1 / KM]; ++k) {
            const vec wb = vset(vals[k]);
            const float* p = xi + off[k];
UNROLL
            for (int u = 0; u < T; ++u) acc[u] = vfma(wb, mk.load(p + u * VW, u), acc[u]);
          }
          if (s == 0) add_shifted<0>(sum, acc);
          else if (s == 1) add_shifted<1>(sum, acc);
          else add_shifted<2>(sum, acc);
        }
        emit<T>(sum, tb, dst, mk, e);
      });
    });
  });
}

SC_LIBRARY_EXPORTS
