// The CS inner loop alone, for its ceiling on this machine (python -m harness probe).
#include "common.h"

using namespace sc;

// The CS inner loop alone (as in sc_cs_offsets: int32 offset, broadcast weight, T vector loads
// feeding T FMAs) over a private working set of ws_bytes per thread, random windows, each
// offset by `shift` floats from a vector-aligned address (0: every load aligned; with 16 lanes,
// any other shift makes every 64-byte load straddle two cache lines, with 8 lanes about half).
// Sets *seconds to the time `threads` threads take for `fmas` vector FMAs each, timed between
// barriers after a warm-up pass: the machine's ceiling for this loop.
extern "C" int sc_loop_probe(int64_t T, int64_t shift, int64_t ws_bytes, int64_t threads,
                             int64_t fmas, double* seconds) {
  return guarded([&] {
    SC_CHECK(shift >= 0 && shift < VW && ws_bytes > 0 && threads > 0 && fmas > 0,
             "bad loop_probe arguments");
    double elapsed = 0;
    float sink = 0;
    dispatch_T(T, [&](auto Tc) {
      constexpr int TT = decltype(Tc)::value;
      constexpr int64_t win = (TT + 1) * VW;  // floats per window (room for the shift)
      // twice as many weights as windows, each at a random window: the loop walks all of them
      const int64_t nwin = std::max<int64_t>(1, ws_bytes / (4 * win));
      const int64_t nw = std::max<int64_t>(512, 2 * nwin);
      const int64_t passes = std::max<int64_t>(1, fmas / (nw * TT));
      SC_CHECK(nwin * win + VW < (int64_t(1) << 31), "loop_probe: working set too large for "
               "int32 offsets");
      // every thread's data, allocated here so that running out of memory is an error, not an
      // exception escaping the parallel region
      std::vector<std::vector<float>> data(threads), wts(threads);
      std::vector<std::vector<int32_t>> offs(threads);
      try {
        for (int64_t i = 0; i < threads; ++i) {
          data[i].assign(nwin * win + VW, 1e-3f);
          wts[i].assign(nw, 1e-3f);
          offs[i].resize(nw);
        }
      } catch (const std::bad_alloc&) {
        SC_CHECK(false, "loop_probe: not enough memory for ", threads, " x ", ws_bytes,
                    " bytes");
      }
      double t0 = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
      {
        const int id = omp_get_thread_num();
        float* x = data[id].data() + (VW - ((uintptr_t)data[id].data() / 4) % VW) % VW;
        const float* w = wts[id].data();
        int32_t* off = offs[id].data();
        uint64_t r = 88172645463325252ull + id;
        for (int64_t k = 0; k < nw; ++k) {
          r ^= r << 13; r ^= r >> 7; r ^= r << 17;
          off[k] = (int32_t)((r % nwin) * win + shift);
        }
        const Masks<TT, true> mk(TT * VW);  // the kernels' full-tile path
        vec acc[TT];
        UNROLL for (int t = 0; t < TT; ++t) acc[t] = vzero();
        auto pass = [&]() {
          for (int64_t k = 0; k < nw; ++k) {
            const vec wb = vset(w[k]);
            const float* p = x + off[k];
  UNROLL
            for (int u = 0; u < TT; ++u) acc[u] = vfma(wb, mk.load(p + u * VW, u), acc[u]);
          }
        };
        pass();
#pragma omp barrier
#pragma omp master
        t0 = omp_get_wtime();
        for (int64_t i = 0; i < passes; ++i) pass();
#pragma omp barrier
#pragma omp master
        elapsed = (omp_get_wtime() - t0) * (double)fmas / (double)(passes * nw * TT);
        float buf[TT * VW];  // every accumulator is used, so none of the work is dead code
        UNROLL for (int t = 0; t < TT; ++t) vstore(buf + t * VW, acc[t]);
        for (float v : buf) sink += v;
      }
    });
    volatile float keep = sink;
    (void)keep;
    *seconds = elapsed;
  });
}

SC_LIBRARY_EXPORTS
