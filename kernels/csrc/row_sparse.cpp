// Row-sparse direct convolution on the CPU: output channel o sums vals[k] * x[off[k] + q] for k
// in [rptr[o], rptr[o+1]). Used for CCI (each group's kept weights regrouped per output row)
// and unstructured sparsity (see common.h for the layout and the driver).
#include "common.h"

using namespace sc;

extern "C" int sc_row_sparse(const float* x, const int64_t* rptr, const int64_t* off,
                             const float* vals, const sc_geometry* geo, float* y,
                             const float* bias, const float* res) {
  return guarded([&] {
    Geo g = geo_from(geo, bias, res, y);
    g.chunk = 0;  // offsets are not ordered by channel chunk
    dispatch_T(g.tile, [&](auto Tc) {
      constexpr int T = decltype(Tc)::value;
      drive<T>(g, x, y, [&](float* tb, float* dst, bool first, const auto& mk, const float* xi,
                            int64_t o, int64_t, int64_t, const Epi& e) {
        accumulate_list<T>(tb, dst, first, mk, xi, vals, off, rptr[o], rptr[o + 1], e);
      });
    });
  });
}

SC_LIBRARY_EXPORTS
