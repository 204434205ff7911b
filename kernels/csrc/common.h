// Shared pieces of the CPU sparse convolution kernels: the geometry every entry point takes,
// vector helpers, lane masks, the tile driver and the epilogue. One kernel family per source
// file (cs.cpp, bsr_1xn.cpp, row_sparse.cpp), plus layout.cpp (the resident layout) and
// probe.cpp (the CS inner loop alone); each is its own shared library, built and loaded by
// kernels/_ext.py and called through ctypes, so an edit rebuilds (and re-measures) that family
// only, while an edit here rebuilds them all.
//
// Input layout ("resident" layout, built by kernels/cpu_layout.py): per image and input channel,
// the zero-padded input split into stride-phase planes, plane (a, b) holding padded pixels
// (S*i + a, S*j + b) as a row-major Hq x Wq grid. Output pixels are computed on the grid
// OH x Wq (flattened q = oh*Wq + ow; columns ow >= OW are discarded), so kernel tap (r, s)
// reads the contiguous window  plane(r%S, s%S) + (r/S)*Wq + s/S + q  for every q: each
// nonzero weight is one broadcast and T vector loads feeding T independent FMAs.
// A 1x1 stride-1 unpadded layer reads NCHW input directly (Wq = OW, one plane).
//
// Output: pixel (oh, ow) of channel o of image n goes to
//   y[n*out_img + o*out_chan + out_base + oh*out_row + ow]
// NCHW by default; the next layer's padded stride-1 plane when layers hand activations over in
// the kernel's own layout, or its stride-phase planes (out_s > 1: each row scatters its
// columns over the phases; see sc_geometry) (the padding there stays as it was: zero). The epilogue adds the
// per-channel bias (when given), then a residual (when given: a tensor laid out like the output,
// read at the output element's own offset; a residual block's shortcut), and applies ReLU (when
// asked) on the way out: y = relu(conv + bias + residual), the end of a ResNet block.
//
// Vector path chosen at build time: AVX-512 intrinsics where the compiler reports __AVX512F__,
// else GCC vector extensions that the compiler lowers to what -march=native offers.
// Threads: OpenMP, count passed by the caller (torch.get_num_threads()).
//
// Entry points are extern "C", take raw pointers (the Python side checks shapes, dtypes and
// buffer sizes) and return 0, or 1 with the reason in sc_last_error().
#pragma once

#include <omp.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define SC_VW 16
#define SC_ISA "avx512"
#else
#define SC_VW 8
#if defined(__AVX2__)
#define SC_ISA "portable(avx2)"
#else
#define SC_ISA "portable"
#endif
#endif

// The geometry of one call, by name (kernels/cpu_layout.py's Geometry dataclass: the same
// fields in the same order, all int64; checked when a library is loaded).
struct sc_geometry {
  int64_t n, cin, cout;        // images, input and output channels
  int64_t chan_stride;         // floats between input channels in the resident layout
  int64_t img_stride;          // floats between input images
  int64_t oh, ow, wq;          // output rows and columns; grid row width (columns >= ow discarded)
  int64_t tile;                // vectors per pixel tile (T)
  int64_t ob;                  // output channels per work item
  int64_t chunk;               // input channels a tile accumulates at once (0: all of them)
  int64_t split;               // 0: threads own pixel tiles, 1: threads own output channels
  int64_t threads;             // OpenMP threads
  int64_t out_img, out_chan, out_base, out_row;  // where output pixel (oh, ow) goes
  int64_t relu;                // 1: ReLU in the epilogue
  // a stride-S consumer's phase-split layout (out_s > 1): padded pixel (oh+pad, ow+pad) goes
  // to plane ((oh+pad)%S, (ow+pad)%S) of out_na x out_nb planes of out_plane floats each, at
  // row (oh+pad)/S (out_row floats per row) and column (ow+pad)/S; a pixel of a phase beyond
  // out_na or out_nb is not read by the consumer and is not written (out_base is 0)
  int64_t out_s, out_na, out_nb, out_plane, out_pad;
};

namespace sc {

constexpr int VW = SC_VW;
// Every loop over accumulators is fully unrolled so they are scalarized into registers.
#define UNROLL _Pragma("GCC unroll 16")

template <class... A>
[[noreturn]] void fail(const A&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw std::invalid_argument(s.str());
}
#define SC_CHECK(cond, ...) \
  do { if (!(cond)) ::sc::fail(__VA_ARGS__); } while (0)

inline std::string& last_error() {
  static thread_local std::string e;
  return e;
}

// An entry point's body: 0 when it ran, 1 with the reason kept for sc_last_error().
template <class F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error() = e.what();
  } catch (...) {
    last_error() = "unknown C++ exception";
  }
  return 1;
}

struct Geo : sc_geometry {
  const float* bias = nullptr;  // per output channel, or null
  const float* res = nullptr;   // residual laid out like the output y (same offsets), or null
  const float* y = nullptr;     // the output, to find an output element's residual
  int64_t P() const { return oh * wq; }
  float* plane(float* y, int64_t ni, int64_t o) const { return y + ni * out_img + o * out_chan + out_base; }
  float bias_of(int64_t o) const { return bias ? bias[o] : 0.f; }
  // the residual element added to output element *p (p points into y), or null
  const float* res_at(const float* p) const { return res ? res + (p - y) : nullptr; }
};

// What the epilogue does to one output channel's pixels on the way out: + bias, + the residual
// (res: at the first pixel, or null), then ReLU when asked.
struct Epi {
  float b;
  bool relu;
  const float* res;
};

inline Geo geo_from(const sc_geometry* g, const float* bias, const float* res = nullptr,
                    const float* y = nullptr) {
  SC_CHECK(g != nullptr, "no geometry");
  Geo r;
  static_cast<sc_geometry&>(r) = *g;
  r.threads = std::max<int64_t>(1, r.threads);
  r.bias = bias;
  r.res = res;
  r.y = y;
  SC_CHECK(res == nullptr || (y != nullptr && r.out_s <= 1),
           "a residual is read in the output's own layout: not with phase-split output");
  SC_CHECK(r.n >= 0 && r.cin > 0 && r.cout > 0 && r.oh > 0 && r.ow > 0 && r.wq >= r.ow,
           "bad geometry");
  SC_CHECK((r.out_row >= r.ow || r.out_s > 1) && r.out_chan >= 0 && r.out_img >= 0 &&
               r.out_base >= 0,
           "bad output geometry");
  SC_CHECK(r.out_s <= 1 || (r.out_na >= 1 && r.out_nb >= 1 && r.out_na <= r.out_s &&
                            r.out_nb <= r.out_s && r.out_plane > 0 && r.out_pad >= 0 &&
                            r.out_base == 0),
           "bad phase-split output geometry");
  return r;
}

// ---- vector helpers: a pixel tile is T vectors; accumulators are plain local arrays so they
// stay in registers (a struct member or reference would be forced to memory by aliasing).
#if defined(__AVX512F__)
typedef __m512 vec;
typedef __mmask16 vmask;
inline vmask lane_mask(int64_t n) {
  return n >= VW ? (vmask)0xFFFF : (n <= 0 ? (vmask)0 : (vmask)((1u << n) - 1));
}
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset(float w) { return _mm512_set1_ps(w); }
inline vec vload(const float* p, vmask m) { return _mm512_maskz_loadu_ps(m, p); }
inline vec vloadu(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline void vstore_m(float* p, vec v, vmask m) { _mm512_mask_storeu_ps(p, m, v); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
// max returns its second operand when either is NaN: a NaN stays NaN, as in put and F.relu
inline vec vrelu(vec a) { return _mm512_max_ps(_mm512_setzero_ps(), a); }
#else
typedef float vec __attribute__((vector_size(VW * 4)));
typedef int64_t vmask;  // number of valid lanes; only those are read (no overrun)
inline vmask lane_mask(int64_t n) { return std::max<int64_t>(0, std::min<int64_t>(n, VW)); }
inline vec vzero() { return vec{}; }
inline vec vset(float w) { vec v; for (int i = 0; i < VW; ++i) v[i] = w; return v; }
inline vec vload(const float* p, vmask m) {
  vec v{};
  if (m == VW) { std::memcpy(&v, p, sizeof(v)); return v; }
  for (int64_t i = 0; i < m; ++i) v[i] = p[i];
  return v;
}
inline vec vloadu(const float* p) { vec v; std::memcpy(&v, p, sizeof(v)); return v; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline void vstore(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
inline void vstore_m(float* p, vec v, vmask m) {
  if (m == VW) { std::memcpy(p, &v, sizeof(v)); return; }
  for (int64_t i = 0; i < m; ++i) p[i] = v[i];
}
inline vec vadd(vec a, vec b) { return a + b; }
// one vector select (a lane loop here was scalarized: a fused ReLU cost more than a separate pass);
// a NaN compares false and stays NaN, as in put and F.relu
inline vec vrelu(vec a) { const vec z = vzero(); return a < z ? z : a; }
#endif

// Lane masks of a pixel tile's T vectors. FULL (every lane valid: all tiles but the last of an
// image's OH x Wq grid): plain loads and stores, which the compiler folds into the FMAs. A
// masked load is a separate
// instruction per FMA: in a loop microbenchmark on AVX-512 (Zen 4) it cost +15% at T=4 and more
// at T=6; on ResNet50's CS layers the full-tile path gained 0-14%.
template <int T, bool FULL = false>
struct Masks {
  vmask m[T];
  explicit Masks(int64_t nvalid) { UNROLL for (int t = 0; t < T; ++t) m[t] = lane_mask(nvalid - t * VW); }
  vec load(const float* p, int t) const { return FULL ? vloadu(p) : vload(p, m[t]); }
  void store(float* p, vec v, int t) const {
    if (FULL) vstore(p, v); else vstore_m(p, v, m[t]);
  }
};
// Run f with the tile's masks: the full-tile specialization when all nq lanes are valid.
template <int T, class F>
inline void with_masks(int64_t nq, F f) {
  if (nq == T * VW) f(Masks<T, true>(nq)); else f(Masks<T>(nq));
}

// Where a row kernel's T accumulators go once a Cin chunk is summed: back to the tile buffer
// tb, or, on a tile that is contiguous in the output (see drive), through the epilogue
// straight from registers into the output at dst (masked: the last tile is partial).
template <int T, class MK>
inline void emit(vec (&acc)[T], float* tb, float* dst, const MK& mk, const Epi& e) {
  if (dst) {
    const vec bv = vset(e.b);
UNROLL
    for (int t = 0; t < T; ++t) {
      vec v = vadd(acc[t], bv);
      if (e.res) v = vadd(v, mk.load(e.res + t * VW, t));
      mk.store(dst + t * VW, e.relu ? vrelu(v) : v, t);
    }
  } else {
    UNROLL for (int t = 0; t < T; ++t) vstore(tb + t * VW, acc[t]);
  }
}

// A row kernel's body over a list of kept weights: the accumulators (zero when first, else the
// tile buffer's) += vals[k] * the T vectors at xi + off[k], for k in [k0, k1); then emitted.
template <int T, class Off, class MK>
inline void accumulate_list(float* tb, float* dst, bool first, const MK& mk, const float* xi,
                            const float* vals, const Off* off, int64_t k0, int64_t k1,
                            const Epi& e) {
  vec acc[T];
  UNROLL for (int t = 0; t < T; ++t) acc[t] = first ? vzero() : vloadu(tb + t * VW);
  for (int64_t k = k0; k < k1; ++k) {
    const vec wb = vset(vals[k]);
    const float* p = xi + off[k];
UNROLL
    for (int u = 0; u < T; ++u) acc[u] = vfma(wb, mk.load(p + u * VW, u), acc[u]);
  }
  emit<T>(acc, tb, dst, mk, e);
}

// One output row segment: dst[i] = epilogue(src[i]) (bias, the residual res[i] when res is
// given, then ReLU when asked).
inline void put(float* dst, const float* src, int64_t len, float b, bool relu,
                const float* res = nullptr) {
  if (res) {
    for (int64_t i = 0; i < len; ++i) {
      const float v = src[i] + b + res[i];
      dst[i] = relu ? std::max(v, 0.f) : v;
    }
  } else if (relu) {
    for (int64_t i = 0; i < len; ++i) dst[i] = std::max(src[i] + b, 0.f);
  } else if (b != 0.f) {
    for (int64_t i = 0; i < len; ++i) dst[i] = src[i] + b;
  } else {
    std::memcpy(dst, src, sizeof(float) * len);
  }
}

// A tile's pixels are contiguous in the output (grid rows have no discarded columns and the
// output rows no gaps): accumulators can be stored from registers, no tile buffer.
inline bool contiguous_out(const Geo& g) {
  return g.wq == g.ow && g.out_row == g.ow && g.out_s <= 1;
}

// One output row segment, pixels (oh, ow0 .. ow0+len) of one channel, into a stride-S
// consumer's phase planes (ychan: the channel's region): each phase b of the row's phase a
// gets every S-th pixel, contiguous there.
inline void put_phases(float* ychan, const float* src, int64_t oh, int64_t ow0, int64_t len,
                       float b, bool relu, const Geo& g) {
  const int64_t S = g.out_s, r = oh + g.out_pad, a = r % S;
  if (a >= g.out_na) return;
  float* row = ychan + a * g.out_nb * g.out_plane + (r / S) * g.out_row;
  const int64_t c0 = ow0 + g.out_pad;
  for (int64_t pb = 0; pb < g.out_nb; ++pb) {
    const int64_t k0 = ((pb - c0) % S + S) % S;  // the row's first pixel of phase pb
    float* dst = row + pb * g.out_plane + (c0 + k0) / S;
    const float* in = src + k0;
    const int64_t cnt = k0 < len ? (len - k0 + S - 1) / S : 0;
    if (relu) {
      for (int64_t j = 0; j < cnt; ++j) dst[j] = std::max(in[j * S] + b, 0.f);
    } else {
      for (int64_t j = 0; j < cnt; ++j) dst[j] = in[j * S] + b;
    }
  }
}

// Write the valid pixels of a grid tile [q0, q0+n) of one output channel to its plane
// (g.plane(y, n, o)), through the epilogue.
inline void write_tile(const float* tb, float* yplane, const Geo& g, int64_t q0, int64_t n,
                       float b) {
  const bool relu = g.relu != 0;
  const float* rplane = g.res_at(yplane);
  if (contiguous_out(g)) {
    put(yplane + q0, tb, n, b, relu, rplane ? rplane + q0 : nullptr);
    return;
  }
  int64_t q = q0, end = q0 + n;
  while (q < end) {
    int64_t oh = q / g.wq, ow = q % g.wq;
    int64_t seg = std::min(g.wq - ow, end - q);
    if (ow < g.ow && g.out_s > 1)
      put_phases(yplane, tb + (q - q0), oh, ow, std::min(seg, g.ow - ow), b, relu, g);
    else if (ow < g.ow)
      put(yplane + oh * g.out_row + ow, tb + (q - q0), std::min(seg, g.ow - ow), b, relu,
          rplane ? rplane + oh * g.out_row + ow : nullptr);
    q += seg;
  }
}

// Work item -> (image, pixel tile, block); split 0: consecutive items share a pixel tile
// (threads own pixel ranges), split 1: consecutive items share a block (threads own channels).
inline void item_coords(int64_t it, int64_t nT, int64_t nB, int64_t split, int64_t& n,
                        int64_t& tile, int64_t& blk) {
  n = it / (nT * nB);
  int64_t r = it % (nT * nB);
  if (split == 0) { tile = r / nB; blk = r % nB; } else { blk = r / nT; tile = r % nT; }
}

// Drive a row kernel over (image, pixel tile, block of OB output channels) work items.
// body(tile_buf, dst, first, masks, x_tile, o, c_lo, c_hi, epi) accumulates output
// channel o's inputs in [c_lo, c_hi) (starting from zero when first, else from tile_buf) and
// emits them: to tile_buf, or through the epilogue (Epi) into the output at dst when dst is set
// (the last Cin chunk of a contiguous tile). Cin is walked in chunks.
template <int T, class Body>
void drive(const Geo& g, const float* x, float* y, Body body) {
  const int64_t TP = T * VW, P = g.P();
  const int64_t nT = (P + TP - 1) / TP, nOB = (g.cout + g.ob - 1) / g.ob;
  const int64_t chunk = g.chunk > 0 ? g.chunk : g.cin;
  const int64_t items = g.n * nT * nOB;
  const bool direct = contiguous_out(g);
  const bool relu = g.relu != 0;
#pragma omp parallel num_threads(g.threads)
  {
    std::vector<float> buf(g.ob * TP + VW);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      int64_t n, tile, ob;
      item_coords(it, nT, nOB, g.split, n, tile, ob);
      const int64_t q0 = tile * TP, nq = std::min(TP, P - q0);
      const float* xi = x + n * g.img_stride + q0;
      const int64_t o_lo = ob * g.ob, o_hi = std::min(g.cout, o_lo + g.ob);
      with_masks<T>(nq, [&](const auto& mk) {
        for (int64_t c0 = 0; c0 < g.cin; c0 += chunk) {
          const int64_t c1 = std::min(g.cin, c0 + chunk);
          const bool out_now = direct && c1 == g.cin;
          for (int64_t o = o_lo; o < o_hi; ++o) {
            float* dst = out_now ? g.plane(y, n, o) + q0 : nullptr;
            body(buf.data() + (o - o_lo) * TP, dst, c0 == 0, mk, xi, o, c0, c1,
                 Epi{g.bias_of(o), relu, dst ? g.res_at(dst) : nullptr});
          }
        }
      });
      if (!direct)
        for (int64_t o = o_lo; o < o_hi; ++o)
          write_tile(buf.data() + (o - o_lo) * TP, g.plane(y, n, o), g, q0, nq, g.bias_of(o));
    }
  }
}

template <class F>
void dispatch_T(int64_t T, F f) {
  switch (T) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: fail("pixel tile T must be one of 1, 2, 3, 4, 6, 8; got ", T);
  }
}

}  // namespace sc

// Every library also answers these (SC_LIBRARY_EXPORTS once in its source file).
#define SC_LIBRARY_EXPORTS                                                                   \
  extern "C" const char* sc_last_error() { return ::sc::last_error().c_str(); }              \
  extern "C" const char* sc_isa() { return SC_ISA; }                                        \
  extern "C" int64_t sc_vector_width() { return SC_VW; }                                    \
  extern "C" int64_t sc_geometry_size() { return sizeof(sc_geometry); }
