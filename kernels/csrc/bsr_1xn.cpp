// 1xN block sparsity on the CPU: BSR over [Cout/N, Cin*Kh*Kw]; every input vector a block row
// loads feeds NB accumulator rows (see common.h for the layout and the epilogue).
#include "common.h"

using namespace sc;

namespace {

// NB accumulator rows x T vectors; every input vector loaded feeds NB FMAs.
template <int NB, int T>
void bsr_rows(const Geo& g, const float* x, float* y, const int32_t* crow, const int64_t* coff,
              const float* vals, const int64_t* rowmap, int64_t N) {
  const int64_t TP = T * VW, P = g.P();
  const int64_t nT = (P + TP - 1) / TP, subs = N / NB, nB = g.cout / N * subs;
  const int64_t items = g.n * nT * nB;
  const bool direct = contiguous_out(g), relu = g.relu != 0;
#pragma omp parallel num_threads(g.threads)
  {
    std::vector<float> buf(TP + VW);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      int64_t n, tile, blk;
      item_coords(it, nT, nB, g.split, n, tile, blk);
      const int64_t sub = blk % subs, br = blk / subs;
      const int64_t q0 = tile * TP, nq = std::min(TP, P - q0);
      const float* xi = x + n * g.img_stride + q0;
      with_masks<T>(nq, [&](const auto& mk) {
        vec acc[NB][T];
        UNROLL for (int i = 0; i < NB; ++i)
          UNROLL for (int t = 0; t < T; ++t) acc[i][t] = vzero();
        for (int64_t b = crow[br]; b < crow[br + 1]; ++b) {
          const float* p = xi + coff[b];
          const float* w = vals + b * N + sub * NB;
          vec xv[T];
UNROLL
          for (int t = 0; t < T; ++t) xv[t] = mk.load(p + t * VW, t);
UNROLL
          for (int i = 0; i < NB; ++i) {
            const vec wb = vset(w[i]);
UNROLL
            for (int t = 0; t < T; ++t) acc[i][t] = vfma(wb, xv[t], acc[i][t]);
          }
        }
        UNROLL for (int i = 0; i < NB; ++i) {
          const int64_t o = rowmap[br * N + sub * NB + i];
          float* yp = g.plane(y, n, o);
          float* dst = direct ? yp + q0 : nullptr;
          emit<T>(acc[i], buf.data(), dst, mk,
                  Epi{g.bias_of(o), relu, dst ? g.res_at(dst) : nullptr});
          if (!direct) write_tile(buf.data(), yp, g, q0, nq, g.bias_of(o));
        }
      });
    }
  }
}

}  // namespace

// col_off[b] = input offset of block b's column (channel * chan_stride + tap offset),
// vals [nnzb, N]; output row of block-row lane i is rowmap[brow*N + i] (undoes filter
// rearrangement). N = 32 runs as two halves of 16.
extern "C" int sc_bsr_1xn(const float* x, const int32_t* crow, const int64_t* col_off,
                          const float* vals, const int64_t* rowmap, int64_t N,
                          const sc_geometry* geo, float* y, const float* bias,
                          const float* res) {
  return guarded([&] {
    const Geo g = geo_from(geo, bias, res, y);
    SC_CHECK(N > 0 && g.cout % N == 0, "Cout=", g.cout, " is not a multiple of N=", N);
    const int64_t NB = std::min<int64_t>(N, 16);
    bool done = false;
    auto run = [&](auto NBc, auto Tc) {
      constexpr int nb = decltype(NBc)::value, T = decltype(Tc)::value;
      if (nb != NB || T != g.tile) return;
      bsr_rows<nb, T>(g, x, y, crow, col_off, vals, rowmap, N);
      done = true;
    };
    using std::integral_constant;
    // NB*T accumulators stay within the vector registers, leaving room for T input vectors
    run(integral_constant<int, 4>{}, integral_constant<int, 1>{});
    run(integral_constant<int, 4>{}, integral_constant<int, 2>{});
    run(integral_constant<int, 4>{}, integral_constant<int, 3>{});
    run(integral_constant<int, 4>{}, integral_constant<int, 4>{});
    run(integral_constant<int, 4>{}, integral_constant<int, 6>{});
    run(integral_constant<int, 8>{}, integral_constant<int, 1>{});
    run(integral_constant<int, 8>{}, integral_constant<int, 2>{});
    run(integral_constant<int, 8>{}, integral_constant<int, 3>{});
    run(integral_constant<int, 16>{}, integral_constant<int, 1>{});
    SC_CHECK(done, "bsr_1xn: unsupported N=", N, " with T=", g.tile);
  });
}

SC_LIBRARY_EXPORTS
