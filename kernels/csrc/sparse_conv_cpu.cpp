// Direct sparse convolution kernels for the CPU.
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
// the kernel's own layout (the padding there stays as it was: zero). The epilogue adds the
// per-channel bias (when given) and applies ReLU (when asked) on the way out.
//
// Vector path chosen at build time: AVX-512 intrinsics where the compiler reports __AVX512F__,
// else GCC vector extensions that the compiler lowers to what -march=native offers.
// Threads: OpenMP, count passed by the caller (torch.get_num_threads()).

#include <torch/extension.h>
#include <omp.h>
#include <algorithm>
#include <cstring>
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

namespace {

constexpr int VW = SC_VW;
// Every loop over accumulators is fully unrolled so they are scalarized into registers.
#define UNROLL _Pragma("GCC unroll 16")

struct Geo {
  int64_t N, cin, cout, chan_stride, img_stride, OH, OW, Wq, T, OB, chunk, split, threads;
  int64_t out_img, out_chan, out_base, out_row, relu;
  const float* bias;  // per output channel, or null
  int64_t P() const { return OH * Wq; }
  float* plane(float* y, int64_t n, int64_t o) const { return y + n * out_img + o * out_chan + out_base; }
  float bias_of(int64_t o) const { return bias ? bias[o] : 0.f; }
};

// geometry: 13 entries (NCHW output) or 18 (plus out_img, out_chan, out_base, out_row, relu)
Geo geo_from(const std::vector<int64_t>& g, const torch::Tensor& bias) {
  TORCH_CHECK(g.size() == 13 || g.size() == 18, "geometry needs 13 or 18 entries");
  Geo r{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11],
        std::max<int64_t>(1, g[12]), 0, 0, 0, 0, 0, nullptr};
  if (g.size() == 18) {
    r.out_img = g[13]; r.out_chan = g[14]; r.out_base = g[15]; r.out_row = g[16]; r.relu = g[17];
  } else {
    r.out_img = r.cout * r.OH * r.OW; r.out_chan = r.OH * r.OW; r.out_row = r.OW;
  }
  TORCH_CHECK(r.out_row >= r.OW && r.out_chan >= 0 && r.out_img >= 0 && r.out_base >= 0,
              "bad output geometry");
  if (bias.numel()) {
    TORCH_CHECK(bias.scalar_type() == torch::kFloat && bias.is_contiguous() &&
                bias.numel() == r.cout, "bias must be a contiguous float32 [Cout] tensor");
    r.bias = bias.data_ptr<float>();
  }
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
inline vec vrelu(vec a) { for (int i = 0; i < VW; ++i) a[i] = a[i] < 0.f ? 0.f : a[i]; return a; }
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
inline void emit(vec (&acc)[T], float* tb, float* dst, const MK& mk, float b, bool relu) {
  if (dst) {
    const vec bv = vset(b);
UNROLL
    for (int t = 0; t < T; ++t) {
      vec v = vadd(acc[t], bv);
      mk.store(dst + t * VW, relu ? vrelu(v) : v, t);
    }
  } else {
    UNROLL for (int t = 0; t < T; ++t) vstore(tb + t * VW, acc[t]);
  }
}

// One output row segment: dst[i] = epilogue(src[i]) (bias, then ReLU when asked).
inline void put(float* dst, const float* src, int64_t len, float b, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < len; ++i) dst[i] = std::max(src[i] + b, 0.f);
  } else if (b != 0.f) {
    for (int64_t i = 0; i < len; ++i) dst[i] = src[i] + b;
  } else {
    std::memcpy(dst, src, sizeof(float) * len);
  }
}

// A tile's pixels are contiguous in the output (grid rows have no discarded columns and the
// output rows no gaps): accumulators can be stored from registers, no tile buffer.
inline bool contiguous_out(const Geo& g) { return g.Wq == g.OW && g.out_row == g.OW; }

// Write the valid pixels of a grid tile [q0, q0+n) of one output channel to its plane
// (g.plane(y, n, o)), through the epilogue.
inline void write_tile(const float* tb, float* yplane, const Geo& g, int64_t q0, int64_t n,
                       float b) {
  const bool relu = g.relu != 0;
  if (contiguous_out(g)) { put(yplane + q0, tb, n, b, relu); return; }
  int64_t q = q0, end = q0 + n;
  while (q < end) {
    int64_t oh = q / g.Wq, ow = q % g.Wq;
    int64_t seg = std::min(g.Wq - ow, end - q);
    if (ow < g.OW)
      put(yplane + oh * g.out_row + ow, tb + (q - q0), std::min(seg, g.OW - ow), b, relu);
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
// body(tile_buf, dst, first, masks, x_tile, o, c_lo, c_hi, bias, relu) accumulates output
// channel o's inputs in [c_lo, c_hi) (starting from zero when first, else from tile_buf) and
// emits them: to tile_buf, or through the epilogue into the output at dst when dst is set
// (the last Cin chunk of a contiguous tile). Cin is walked in chunks.
template <int T, class Body>
void drive(const Geo& g, const float* x, float* y, Body body) {
  const int64_t TP = T * VW, P = g.P();
  const int64_t nT = (P + TP - 1) / TP, nOB = (g.cout + g.OB - 1) / g.OB;
  const int64_t chunk = g.chunk > 0 ? g.chunk : g.cin;
  const int64_t items = g.N * nT * nOB;
  const bool direct = contiguous_out(g);
  const bool relu = g.relu != 0;
#pragma omp parallel num_threads(g.threads)
  {
    std::vector<float> buf(g.OB * TP + VW);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      int64_t n, tile, ob;
      item_coords(it, nT, nOB, g.split, n, tile, ob);
      const int64_t q0 = tile * TP, nq = std::min(TP, P - q0);
      const float* xi = x + n * g.img_stride + q0;
      const int64_t o_lo = ob * g.OB, o_hi = std::min(g.cout, o_lo + g.OB);
      with_masks<T>(nq, [&](const auto& mk) {
        for (int64_t c0 = 0; c0 < g.cin; c0 += chunk) {
          const int64_t c1 = std::min(g.cin, c0 + chunk);
          const bool out_now = direct && c1 == g.cin;
          for (int64_t o = o_lo; o < o_hi; ++o)
            body(buf.data() + (o - o_lo) * TP, out_now ? g.plane(y, n, o) + q0 : nullptr,
                 c0 == 0, mk, xi, o, c0, c1, g.bias_of(o), relu);
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
    default: TORCH_CHECK(false, "pixel tile T must be one of 1, 2, 3, 4, 6, 8; got ", T);
  }
}

void check_io(const torch::Tensor& x, const torch::Tensor& y, const Geo& g) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && y.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "x and y must be contiguous");
  const int64_t last = (g.N - 1) * g.out_img + (g.cout - 1) * g.out_chan + g.out_base +
                       (g.OH - 1) * g.out_row + g.OW;  // one past the last element written
  TORCH_CHECK(y.numel() >= last, "output buffer is smaller than its geometry");
  TORCH_CHECK(x.numel() >= g.N * g.img_stride, "input buffer is smaller than its geometry");
}

// 1xN block rows: NB accumulator rows x T vectors; every input vector loaded feeds NB FMAs.
template <int NB, int T>
void bsr_rows(const Geo& g, const float* x, float* y, const int32_t* crow, const int64_t* coff,
              const float* vals, const int64_t* rowmap, int64_t N) {
  const int64_t TP = T * VW, P = g.P();
  const int64_t nT = (P + TP - 1) / TP, subs = N / NB, nB = g.cout / N * subs;
  const int64_t items = g.N * nT * nB;
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
          emit<T>(acc[i], buf.data(), direct ? yp + q0 : nullptr, mk, g.bias_of(o), relu);
          if (!direct) write_tile(buf.data(), yp, g, q0, nq, g.bias_of(o));
        }
      });
    }
  }
}

}  // namespace

// CS, cin form: vals/idx [Cout, taps, Cin/K]; slot j = seg*M + n keeps input channel
// seg*K*M + n + M*idx (the CS paper's n + M*Idx inside each length-K*M segment).
void cs_direct(torch::Tensor x, torch::Tensor vals, torch::Tensor idx, torch::Tensor tap_off,
               int64_t K, int64_t M, std::vector<int64_t> geo, torch::Tensor y,
               torch::Tensor bias) {
  Geo g = geo_from(geo, bias);
  check_io(x, y, g);
  const int64_t taps = tap_off.numel(), nj = g.cin / K, KM = K * M;
  TORCH_CHECK(g.chunk % KM == 0, "cin chunk must be a multiple of K*M");
  TORCH_CHECK(vals.numel() == g.cout * taps * nj && idx.numel() == vals.numel(), "bad CS encoding");
  const float* xv = x.data_ptr<float>();
  const float* wv = vals.data_ptr<float>();
  const uint8_t* iv = idx.data_ptr<uint8_t>();
  const int64_t* to = tap_off.data_ptr<int64_t>();
  const int64_t cs = g.chan_stride;
  dispatch_T(g.T, [&](auto Tc) {
    constexpr int T = decltype(Tc)::value;
    drive<T>(g, xv, y.data_ptr<float>(), [&](float* tb, float* dst, bool first,
                                           const auto& mk, const float* xi, int64_t o,
                                           int64_t c0, int64_t c1, float b, bool relu) {
      vec acc[T];
      UNROLL for (int t = 0; t < T; ++t) acc[t] = first ? vzero() : vloadu(tb + t * VW);
      for (int64_t t = 0; t < taps; ++t) {
        const float* xt = xi + to[t];
        const float* w = wv + (o * taps + t) * nj;
        const uint8_t* ix = iv + (o * taps + t) * nj;
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
      emit<T>(acc, tb, dst, mk, b, relu);
    });
  });
}

// CS with indices expanded at prepare time: vals/off [Cout, nseg, taps*M] (segment-major, so a
// Cin chunk is a contiguous range); off = kept channel * chan_stride + tap offset (int32).
void cs_offsets(torch::Tensor x, torch::Tensor vals, torch::Tensor off, int64_t K, int64_t M,
                int64_t taps, std::vector<int64_t> geo, torch::Tensor y, torch::Tensor bias) {
  Geo g = geo_from(geo, bias);
  check_io(x, y, g);
  const int64_t KM = K * M, nseg = g.cin / KM, per_seg = taps * M;
  TORCH_CHECK(g.chunk % KM == 0, "cin chunk must be a multiple of K*M");
  TORCH_CHECK(vals.numel() == g.cout * nseg * per_seg && off.numel() == vals.numel(),
              "bad CS offsets");
  const float* wv = vals.data_ptr<float>();
  const int32_t* ov = off.data_ptr<int32_t>();
  dispatch_T(g.T, [&](auto Tc) {
    constexpr int T = decltype(Tc)::value;
    drive<T>(g, x.data_ptr<float>(), y.data_ptr<float>(), [&](float* tb, float* dst, bool first,
                                                            const auto& mk, const float* xi,
                                                            int64_t o, int64_t c0, int64_t c1,
                                                            float b, bool relu) {
      vec acc[T];
      UNROLL for (int t = 0; t < T; ++t) acc[t] = first ? vzero() : vloadu(tb + t * VW);
      const int64_t k0 = (o * nseg + c0 / KM) * per_seg, k1 = (o * nseg + c1 / KM) * per_seg;
      const float* w = wv;
      const int32_t* of = ov;
      for (int64_t k = k0; k < k1; ++k) {
        const vec wb = vset(w[k]);
        const float* p = xi + of[k];
UNROLL
        for (int u = 0; u < T; ++u) acc[u] = vfma(wb, mk.load(p + u * VW, u), acc[u]);
      }
      emit<T>(acc, tb, dst, mk, b, relu);
    });
  });
}

// 1xN blocks: BSR over [Cout/N, Cin*Kh*Kw]; col_off[b] = input offset of block b's column
// (channel * chan_stride + tap offset), vals [nnzb, N]; output row of block-row lane i is
// rowmap[brow*N + i] (undoes filter rearrangement). N = 32 runs as two halves of 16.
void bsr_1xn(torch::Tensor x, torch::Tensor crow, torch::Tensor col_off, torch::Tensor vals,
             torch::Tensor rowmap, int64_t N, std::vector<int64_t> geo, torch::Tensor y,
             torch::Tensor bias) {
  Geo g = geo_from(geo, bias);
  check_io(x, y, g);
  TORCH_CHECK(g.cout % N == 0 && crow.numel() == g.cout / N + 1, "bad BSR encoding");
  const int64_t NB = std::min<int64_t>(N, 16);
  bool done = false;
  auto run = [&](auto NBc, auto Tc) {
    constexpr int nb = decltype(NBc)::value, T = decltype(Tc)::value;
    if (nb != NB || T != g.T) return;
    bsr_rows<nb, T>(g, x.data_ptr<float>(), y.data_ptr<float>(), crow.data_ptr<int32_t>(),
                    col_off.data_ptr<int64_t>(), vals.data_ptr<float>(),
                    rowmap.data_ptr<int64_t>(), N);
    done = true;
  };
  using std::integral_constant;
  // NB*T accumulators stay within the 32 vector registers, leaving room for T input vectors
  run(integral_constant<int, 4>{}, integral_constant<int, 1>{});
  run(integral_constant<int, 4>{}, integral_constant<int, 2>{});
  run(integral_constant<int, 4>{}, integral_constant<int, 3>{});
  run(integral_constant<int, 4>{}, integral_constant<int, 4>{});
  run(integral_constant<int, 4>{}, integral_constant<int, 6>{});
  run(integral_constant<int, 8>{}, integral_constant<int, 1>{});
  run(integral_constant<int, 8>{}, integral_constant<int, 2>{});
  run(integral_constant<int, 8>{}, integral_constant<int, 3>{});
  run(integral_constant<int, 16>{}, integral_constant<int, 1>{});
  TORCH_CHECK(done, "bsr_1xn: unsupported N=", N, " with T=", g.T);
}

// Row-sparse: output channel o sums vals[k] * x[off[k] + q] for k in [rptr[o], rptr[o+1]).
// Used for CCI (each group's kept weights regrouped per output row) and unstructured.
void row_sparse(torch::Tensor x, torch::Tensor rptr, torch::Tensor off, torch::Tensor vals,
                std::vector<int64_t> geo, torch::Tensor y, torch::Tensor bias) {
  Geo g = geo_from(geo, bias);
  check_io(x, y, g);
  TORCH_CHECK(rptr.numel() == g.cout + 1, "bad row pointer");
  g.chunk = 0;  // offsets are not ordered by channel chunk
  const int64_t* rp = rptr.data_ptr<int64_t>();
  const int64_t* of = off.data_ptr<int64_t>();
  const float* wv = vals.data_ptr<float>();
  dispatch_T(g.T, [&](auto Tc) {
    constexpr int T = decltype(Tc)::value;
    drive<T>(g, x.data_ptr<float>(), y.data_ptr<float>(), [&](float* tb, float* dst, bool first,
                                                            const auto& mk, const float* xi,
                                                            int64_t o, int64_t, int64_t, float b,
                                                            bool relu) {
      vec acc[T];
      UNROLL for (int t = 0; t < T; ++t) acc[t] = first ? vzero() : vloadu(tb + t * VW);
      for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
        const vec wb = vset(wv[k]);
        const float* p = xi + of[k];
UNROLL
        for (int u = 0; u < T; ++u) acc[u] = vfma(wb, mk.load(p + u * VW, u), acc[u]);
      }
      emit<T>(acc, tb, dst, mk, b, relu);
    });
  });
}

// The resident layout, one parallel pass: copy NCHW x into the interior of buf's stride-phase
// planes (see kernels/cpu_layout.py); buf's padding is never written, so it stays zero.
void layout_fill(torch::Tensor x, torch::Tensor buf, int64_t S, int64_t pad, int64_t na,
                 int64_t nb, int64_t Hq, int64_t Wq, int64_t chan_stride, int64_t threads) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && buf.scalar_type() == torch::kFloat &&
              x.is_contiguous() && buf.is_contiguous() && x.dim() == 4, "float32, contiguous");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(buf.numel() >= N * C * chan_stride && na * nb * Hq * Wq <= chan_stride,
              "layout buffer is smaller than its geometry");
  const float* xv = x.data_ptr<float>();
  float* bv = buf.data_ptr<float>();
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
}

// The CS inner loop alone (as in cs_offsets: int32 offset, broadcast weight, T vector loads
// feeding T FMAs) over a private working set of ws_bytes per thread, random windows, each
// offset by `shift` floats from a vector-aligned address (0: every load aligned; with 16 lanes,
// any other shift makes every 64-byte load straddle two cache lines, with 8 lanes about half). Returns the seconds `threads` threads take for `fmas` vector FMAs
// each, timed between barriers after a warm-up pass: the machine's ceiling for this loop.
double loop_probe(int64_t T, int64_t shift, int64_t ws_bytes, int64_t threads, int64_t fmas) {
  TORCH_CHECK(shift >= 0 && shift < VW && ws_bytes > 0 && threads > 0 && fmas > 0,
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
    TORCH_CHECK(nwin * win + VW < (int64_t(1) << 31), "loop_probe: working set too large for "
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
      TORCH_CHECK(false, "loop_probe: not enough memory for ", threads, " x ", ws_bytes,
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
  return elapsed;
}

std::string isa() { return SC_ISA; }
int64_t vector_width() { return VW; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cs_direct", &cs_direct, "CS direct convolution (cin form)");
  m.def("cs_offsets", &cs_offsets, "CS direct convolution, indices expanded to offsets");
  m.def("bsr_1xn", &bsr_1xn, "1xN block-sparse direct convolution");
  m.def("row_sparse", &row_sparse, "row-sparse direct convolution (CCI, unstructured)");
  m.def("layout_fill", &layout_fill, "NCHW -> the kernels' resident layout");
  m.def("loop_probe", &loop_probe, "the CS inner loop alone, for its ceiling on this machine");
  m.def("isa", &isa);
  m.def("vector_width", &vector_width);
}
