// Split-KV over vLLM's paged CPU KV cache where the splits are the semantic blocks (docs/theory.md §2, form 2).
//
// For every query (one per row: decode) and every semantic block g, one pass over the row's keys
// keeps an online-softmax accumulator against the query's running max M: s = Σ e^{x−M},
// sw = Σ e^{x−M}·x and o = Σ e^{x−M}·v, finished into the block's log-mass L = m + ln s, its inner entropy L − sw/s and
// its own attention output o/s (L = −inf, 0, 0 for a block with no visible key). The dial is *not*
// here: Python merges the blocks with localist.model.attention.merge_block_partials. The cache is
// read once, in place (no gather copy). merge_blocks is the prefill's merge Σ_g π^ρ_g·o_g (π^ρ from
// Python's dial_mass), written once into vLLM's output without a float buffer per block.
// block_prefill (compiled only with AVX512-BF16) gives the prefill the same per-block partials for
// many queries at once: each block's own causal attention output and log-mass, flash style.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// e^x for x ≤ 0 (scores minus their running max), branch-free so that loops over it vectorise:
// x = k·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7),
// 2^k by building the float's exponent; below −87 the result is 0 (the guard of docs/theory.md §2 numerics).
inline float exp_nonpos(float x) {
  const float xc = std::max(x, -87.0f);
  const float k = std::nearbyint(xc * 1.4426950408889634f);
  const float r = xc - k * 0.693145751953125f - k * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.f : p * scale;
}

// y += a·x over n elements; restrict-qualified so that the compiler vectorises it.
template <typename T>
inline void axpy(float* __restrict__ y, const T* __restrict__ x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * to_float(x[i]);
}

// x[t] = q · K[:, t] for W consecutive keys of a K^T block (rows of stride bs): W/16 independent
// accumulators, so the loop over d is not one chain of FMA latencies.
template <int W, typename T>
inline void key_dots(float* __restrict__ x, const T* __restrict__ K, int64_t bs, const float* q, int64_t D) {
  float acc[W] = {};
  for (int64_t d = 0; d < D; ++d) axpy(acc, K + d * bs, q[d], W);
  std::memcpy(x, acc, sizeof(acc));
}

// y += a[0]·x[0·D ..] + … + a[3]·x[3·D ..]: four consecutive rows of D in one pass over y.
template <typename T>
inline void axpy4(float* __restrict__ y, const T* __restrict__ x, const float* a, int64_t D) {
  const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  for (int64_t i = 0; i < D; ++i)
    y[i] += a0 * to_float(x[i]) + a1 * to_float(x[D + i]) + a2 * to_float(x[2 * D + i]) + a3 * to_float(x[3 * D + i]);
}

template <typename T>
void partials_impl(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& block_table,
                   const at::Tensor& seq_lens, const at::Tensor& block_ids, int64_t G,
                   double scale, at::Tensor& m_out, at::Tensor& s_out, at::Tensor& sw_out, at::Tensor& o_out) {
  const int64_t R = q.size(0), Hkv = q.size(1), Gq = q.size(2), D = q.size(3);
  const int64_t bs = kv.size(3) / D;
  const int64_t nblk = block_table.size(1), Tmax = block_ids.size(1);
  const float* qp = q.data_ptr<float>();
  const T* kvp = kv.data_ptr<T>();
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t* sl = seq_lens.data_ptr<int64_t>();
  const int64_t* ids = block_ids.data_ptr<int64_t>();
  float* mo = m_out.data_ptr<float>();
  float* so = s_out.data_ptr<float>();
  float* swo = sw_out.data_ptr<float>();
  float* oo = o_out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // Threads only for large work: on a 2-core host shared with other jobs, waking a second thread for
  // a few milliseconds of work costs more than it saves (measured).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, Tmax * Gq));
  at::parallel_for(0, R * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(Gq * bs), ex(Gq * bs);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / Hkv, h = task % Hkv;
      const int64_t S = sl[r];
      float* m = mo + task * Gq * G;
      float* s = so + task * Gq * G;
      float* sw = swo + task * Gq * G;
      float* o = oo + task * Gq * G * D;
      for (int64_t i = 0; i < Gq * G; ++i) { m[i] = neg_inf; s[i] = 0.f; sw[i] = 0.f; }
      std::fill(o, o + Gq * G * D, 0.f);
      const float* qh = qp + task * Gq * D;
      // One running max M per query head (flash-decoding style); accumulators are rescaled when it
      // grows. A block whose mass underflows against M ends with s = 0 and is reported absent —
      // the same guard as attention.localist_attention, which also exponentiates against the row max.
      float M[64];
      for (int64_t gi = 0; gi < Gq; ++gi) M[gi] = neg_inf;
      for (int64_t b = 0; b * bs < S && b < nblk; ++b) {
        const int64_t n = std::min(bs, S - b * bs);
        const T* base = kvp + (bt[r * nblk + b] * Hkv + h) * 2 * bs * D;
        const T* K = base;            // [D, bs]: the vec layout (kv_layout.PagedKV.for_kernel)
        const T* V = base + bs * D;   // [bs, D]
        for (int64_t gi = 0; gi < Gq; ++gi) {
          float* x = scores.data() + gi * bs;
          const float* qq = qh + gi * D;
          // K^T rows are contiguous over the block's tokens: vectorise over t; 128, 64, then 16
          // scores stay in registers over the whole dot product
          int64_t t0 = 0;
          for (; t0 + 128 <= bs; t0 += 128) key_dots<128>(x + t0, K + t0, bs, qq, D);
          for (; t0 + 64 <= bs; t0 += 64) key_dots<64>(x + t0, K + t0, bs, qq, D);
          for (; t0 + 16 <= bs; t0 += 16) key_dots<16>(x + t0, K + t0, bs, qq, D);
          for (int64_t t = t0; t < bs; ++t) {
            float acc = 0.f;
            for (int64_t d = 0; d < D; ++d) acc += qq[d] * to_float(K[d * bs + t]);
            x[t] = acc;
          }
          float bmax = neg_inf;
          for (int64_t t = 0; t < n; ++t) {
            x[t] *= sc;
            bmax = std::max(bmax, x[t]);
          }
          if (bmax > M[gi]) {
            const float rescale = std::exp(M[gi] - bmax);  // 0 on the first block
            for (int64_t k = gi * G; k < (gi + 1) * G; ++k) {
              s[k] *= rescale;
              sw[k] *= rescale;
              float* ok = o + k * D;
              for (int64_t d = 0; d < D; ++d) ok[d] *= rescale;
            }
            M[gi] = bmax;
          }
          float* e = ex.data() + gi * bs;
          const float Mg = M[gi];
          for (int64_t t = 0; t < n; ++t) e[t] = exp_nonpos(x[t] - Mg);
        }
        // Runs of keys of one semantic block (blocks are contiguous): the block's sums and output are
        // updated once per run, four keys per pass over o, not once per key through memory.
        const int64_t* idb = ids + r * Tmax + b * bs;
        for (int64_t t = 0, t1; t < n; t = t1) {
          const int64_t g = idb[t];
          for (t1 = t + 1; t1 < n && idb[t1] == g;) ++t1;
          if (g < 0 || g >= G) continue;
          for (int64_t gi = 0; gi < Gq; ++gi) {
            const float* e = ex.data() + gi * bs;
            const float* xs = scores.data() + gi * bs;
            const int64_t k = gi * G + g;
            float es = 0.f, ew = 0.f;
            for (int64_t u = t; u < t1; ++u) {
              es += e[u];
              ew += e[u] * xs[u];
            }
            s[k] += es;
            sw[k] += ew;
            float* ok = o + k * D;
            int64_t u = t;
            for (; u + 4 <= t1; u += 4) axpy4(ok, V + u * D, e + u, D);
            for (; u < t1; ++u) axpy(ok, V + u * D, e[u], D);
          }
        }
      }
      for (int64_t k = 0; k < Gq * G; ++k) m[k] = M[k / G];
      for (int64_t k = 0; k < Gq * G; ++k) {  // finish: M → L, sw → H(w), o → o / s
        float* ok = o + k * D;
        if (s[k] > 0.f) {
          const float L = m[k] + std::log(s[k]);
          sw[k] = std::max(0.f, L - sw[k] / s[k]);
          // Divide, not multiply by 1/s: a block far below the row max has a subnormal s, whose
          // reciprocal is inf (o/s stays bounded by max |V|; inf·0 was a nan in the output).
          for (int64_t d = 0; d < D; ++d) ok[d] /= s[k];
          m[k] = L;
        } else {
          m[k] = neg_inf;
          sw[k] = 0.f;
          for (int64_t d = 0; d < D; ++d) ok[d] = 0.f;
        }
      }
    }
  });
}


template <typename T>
inline void store(T* __restrict__ y, const float* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(x[i]);
}

// acc += w · row for a row of any of the supported dtypes.
inline void axpy_any(float* acc, const void* row, at::ScalarType dt, float w, int64_t n) {
  switch (dt) {
    case at::kFloat: axpy(acc, static_cast<const float*>(row), w, n); break;
    case at::kBFloat16: axpy(acc, static_cast<const c10::BFloat16*>(row), w, n); break;
    default: axpy(acc, static_cast<const c10::Half*>(row), w, n); break;
  }
}


#ifdef __AVX512BF16__
// ---- blockwise prefill: one flash pass per semantic block, bf16 dot products (AVX512-BF16) -------

// e^x in 16 lanes for x ≤ 0 (exp_nonpos vectorised; 0 below −87 and for −inf).
inline __m512 exp512_nonpos(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __m512 xc = _mm512_max_ps(x, lo);
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), xc);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), p, _mm512_castsi512_ps(bits));
}

inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

constexpr int64_t kMT = 32;  // queries per task tile
constexpr int64_t kNT = 64;  // keys per tile (4 vectors of 16)

// x[r][0 .. 16·NK) = q_r · k for rows r0 … mt of the tile (4 at a time), keys from kt (pairs layout).
template <int NK>
inline void qk_tile(const uint32_t* qt, const uint32_t* kt, int64_t Spad, int64_t D2, int64_t r0, int64_t mt, float* x) {
  for (int64_t r = r0; r < mt; r += 4) {
    __m512 acc[4][NK];
    for (auto& row : acc) for (auto& v : row) v = _mm512_setzero_ps();
    for (int64_t d2 = 0; d2 < D2; ++d2) {
      __m512i k[NK];
      for (int c = 0; c < NK; ++c) k[c] = _mm512_loadu_si512(kt + d2 * Spad + 16 * c);
      for (int i = 0; i < 4; ++i) {
        const __m512i qq = _mm512_set1_epi32(static_cast<int>(qt[(r + i) * D2 + d2]));
        for (int c = 0; c < NK; ++c) acc[i][c] = dp(acc[i][c], qq, k[c]);
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < NK; ++c) _mm512_store_ps(x + (r + i) * kNT + 16 * c, acc[i][c]);
  }
}

// o[r][0 .. 16·NC) = alpha_r·o[r] + Σ_{pairs} p_r · v for rows r0 … mt (4 at a time); o rows of stride D.
template <int NC>
inline void pv_tile(const uint32_t* pp, const uint32_t* vt, int64_t D, int64_t pairs, const float* alpha,
                    int64_t r0, int64_t mt, float* o) {
  for (int64_t r = r0; r < mt; r += 4) {
    __m512 acc[4][NC];
    for (int i = 0; i < 4; ++i) {
      const __m512 al = _mm512_set1_ps(r + i < mt ? alpha[r + i] : 0.f);
      for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_mul_ps(_mm512_load_ps(o + (r + i) * D + 16 * c), al);
    }
    for (int64_t jp = 0; jp < pairs; ++jp) {
      __m512i v[NC];
      for (int c = 0; c < NC; ++c) v[c] = _mm512_loadu_si512(vt + jp * D + 16 * c);
      for (int i = 0; i < 4; ++i) {
        const __m512i pq = _mm512_set1_epi32(static_cast<int>(pp[(r + i) * (kNT / 2) + jp]));
        for (int c = 0; c < NC; ++c) acc[i][c] = dp(acc[i][c], pq, v[c]);
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < NC; ++c) _mm512_store_ps(o + (r + i) * D + 16 * c, acc[i][c]);
  }
}
#endif
}  // namespace

// q [R, Hkv, g, D] float32; kv_cache [blocks, Hkv, 2, bs·D] (K then V per block and head);
// block_table [R, nblk] int64; seq_lens [R] int64; block_ids [R, ≥ S] int64 (−1: skip).
// Returns log_mass [R, Hkv, g, G], inner_entropy [R, Hkv, g, G], block outputs [R, Hkv, g, G, D].
std::vector<at::Tensor> block_partials(at::Tensor q, at::Tensor kv_cache, at::Tensor block_table,
                                       at::Tensor seq_lens, at::Tensor block_ids, int64_t G,
                                       double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 4, "q: float32 [R, Hkv, g, D]");
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 4 && kv_cache.size(2) == 2, "kv_cache layout");
  TORCH_CHECK(q.size(3) <= 512, "head_dim > 512");
  TORCH_CHECK(q.size(2) <= 64, "more than 64 query heads per KV head");
  auto f = q.options();
  const auto R = q.size(0), Hkv = q.size(1), Gq = q.size(2), D = q.size(3);
  at::Tensor m = at::empty({R, Hkv, Gq, G}, f), s = at::empty({R, Hkv, Gq, G}, f);
  at::Tensor sw = at::empty({R, Hkv, Gq, G}, f), o = at::empty({R, Hkv, Gq, G, D}, f);
  auto bt = block_table.to(at::kLong).contiguous();
  auto sl = seq_lens.to(at::kLong).contiguous();
  auto ids = block_ids.to(at::kLong).contiguous();
  switch (kv_cache.scalar_type()) {
    case at::kFloat: partials_impl<float>(q, kv_cache, bt, sl, ids, G, scale, m, s, sw, o); break;
    case at::kBFloat16:
      partials_impl<c10::BFloat16>(q, kv_cache, bt, sl, ids, G, scale, m, s, sw, o);
      break;
    case at::kHalf: partials_impl<c10::Half>(q, kv_cache, bt, sl, ids, G, scale, m, s, sw, o); break;
    default: TORCH_CHECK(false, "kv_cache dtype not supported: ", kv_cache.scalar_type());
  }
  return {m, sw, o};
}

// Prefill merge (docs/theory.md §2, form 2) without a float buffer per block:
// out[t, h] = Σ_g π^ρ[g, h, t] · o_g[t − start_g, h] over the parts (blocks in order) whose queries include t, accumulated in float32 and written once.
// parts[j] [n_j, H, D] (last dim contiguous; float32, bf16 or fp16), starts[j] its first query, blocks[j] its
// block g; mass [G, H, n] float32 (π^ρ from dial_mass); out [n, H, D] contiguous.
void merge_blocks(std::vector<at::Tensor> parts, std::vector<int64_t> starts, std::vector<int64_t> blocks,
                  at::Tensor mass, at::Tensor out) {
  TORCH_CHECK(mass.scalar_type() == at::kFloat && mass.is_contiguous() && mass.dim() == 3, "mass: float32 [G, H, n]");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 3, "out: contiguous [n, H, D]");
  TORCH_CHECK(parts.size() == starts.size() && parts.size() == blocks.size(), "parts/starts/blocks");
  const int64_t n = out.size(0), H = out.size(1), D = out.size(2), G = mass.size(0);
  TORCH_CHECK(mass.size(1) == H && mass.size(2) == n && D <= 512, "mass/out shapes");
  const int64_t P = static_cast<int64_t>(parts.size());
  std::vector<const char*> base(P);
  std::vector<int64_t> st(P), s0(P), s1(P), esz(P);
  std::vector<at::ScalarType> dt(P);
  for (int64_t j = 0; j < P; ++j) {
    const auto& x = parts[j];
    TORCH_CHECK(x.dim() == 3 && x.size(1) == H && x.size(2) == D && x.stride(2) == 1, "part layout");
    TORCH_CHECK(starts[j] >= 0 && starts[j] + x.size(0) == n && blocks[j] >= 0 && blocks[j] < G, "part range");
    dt[j] = x.scalar_type();
    TORCH_CHECK(dt[j] == at::kFloat || dt[j] == at::kBFloat16 || dt[j] == at::kHalf, "part dtype");
    base[j] = static_cast<const char*>(x.data_ptr());
    esz[j] = x.element_size();
    s0[j] = x.stride(0);
    s1[j] = x.stride(1);
    st[j] = starts[j];
  }
  const float* mp = mass.data_ptr<float>();
  const auto odt = out.scalar_type();
  TORCH_CHECK(odt == at::kFloat || odt == at::kBFloat16 || odt == at::kHalf, "out dtype");
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t oes = out.element_size();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, H * D * P));
  at::parallel_for(0, n * H, grain, [&](int64_t begin, int64_t end) {
    float acc[512];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / H, h = task % H;
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
      for (int64_t j = 0; j < P; ++j) {
        if (t < st[j]) continue;
        const float w = mp[(blocks[j] * H + h) * n + t];
        if (w == 0.f) continue;
        axpy_any(acc, base[j] + ((t - st[j]) * s0[j] + h * s1[j]) * esz[j], dt[j], w, D);
      }
      char* dst = op + task * D * oes;
      switch (odt) {
        case at::kFloat: store(reinterpret_cast<float*>(dst), acc, D); break;
        case at::kBFloat16: store(reinterpret_cast<c10::BFloat16*>(dst), acc, D); break;
        default: store(reinterpret_cast<c10::Half*>(dst), acc, D); break;
      }
    }
  });
}


#ifdef __AVX512BF16__
// Prefill of one row's query chunk against its keys, per semantic block (docs/theory.md §2 form 2): for every
// span (g, a, b) and every query at position ≥ a, ordinary causal attention over the keys of [a, b)
// alone, i.e. the block's own output o_g and log-mass L_g (what one flash call per block returned).
// q [T, H, D], keys/values [Hkv, S, D] (bf16, last dim contiguous, any other strides); the chunk's
// queries sit at positions first_pos … first_pos + T − 1. Scores are bf16·bf16 products summed in
// float32 (exact products), the softmax in float32, P·V with P rounded to bf16 (as flash kernels do).
// Returns log_mass [G, H, T] float32 (−inf where a query does not see the block) and, for each span
// a query of the chunk sees, its output [T − start, H, D] bf16 from the span's first query `start`.
std::vector<at::Tensor> block_prefill(at::Tensor q, at::Tensor keys, at::Tensor values, std::vector<int64_t> span_g,
                                      std::vector<int64_t> span_a, std::vector<int64_t> span_b, int64_t first_pos,
                                      int64_t G, double scale) {
  const auto bf = at::kBFloat16;
  TORCH_CHECK(q.scalar_type() == bf && keys.scalar_type() == bf && values.scalar_type() == bf, "bf16 only");
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && values.sizes() == keys.sizes(), "q [T, H, D], keys/values [Hkv, S, D]");
  TORCH_CHECK(q.stride(2) == 1 && keys.stride(2) == 1 && values.stride(2) == 1, "last dim contiguous");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = keys.size(0), S = keys.size(1);
  TORCH_CHECK(D % 32 == 0 && D <= 512 && keys.size(2) == D && H % Hkv == 0, "head_dim 32k ≤ 512; GQA groups");
  TORCH_CHECK(first_pos + T <= S, "queries past the keys");
  const int64_t P = static_cast<int64_t>(span_g.size());
  TORCH_CHECK(span_a.size() == span_g.size() && span_b.size() == span_g.size(), "spans");
  const int64_t D2 = D / 2, Spad = (S + kNT + 1) / 2 * 2;

  // Keys as bf16 pairs over d, transposed ([Hkv][D/2][Spad] of 32-bit pairs: 16 keys per vector);
  // values as pairs over keys ([Hkv][Spad/2][D]): the operand layouts of _mm512_dpbf16_ps. Zero padded.
  std::vector<uint32_t> kp(Hkv * D2 * Spad, 0), vp(Hkv * (Spad / 2) * D, 0);
  const auto* kb = reinterpret_cast<const uint16_t*>(keys.data_ptr());
  const auto* vb = reinterpret_cast<const uint16_t*>(values.data_ptr());
  const int64_t ks0 = keys.stride(0), ks1 = keys.stride(1), vs0 = values.stride(0), vs1 = values.stride(1);
  at::parallel_for(0, Hkv, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      uint32_t* kh = kp.data() + h * D2 * Spad;
      uint32_t* vh = vp.data() + h * (Spad / 2) * D;
      for (int64_t j = 0; j < S; ++j) {
        const uint16_t* kr = kb + h * ks0 + j * ks1;
        const uint16_t* vr = vb + h * vs0 + j * vs1;
        for (int64_t d2 = 0; d2 < D2; ++d2) kh[d2 * Spad + j] = kr[2 * d2] | (uint32_t{kr[2 * d2 + 1]} << 16);
        uint32_t* vrow = vh + (j / 2) * D;
        const int shift = (j & 1) ? 16 : 0;
        for (int64_t d = 0; d < D; ++d) vrow[d] |= uint32_t{vr[d]} << shift;
      }
    }
  });

  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::Tensor log_mass = at::full({G, H, T}, neg_inf, q.options().dtype(at::kFloat));
  std::vector<at::Tensor> parts;
  std::vector<int64_t> start(P);
  std::vector<uint16_t*> part_ptr(P, nullptr);
  for (int64_t j = 0; j < P; ++j) {
    TORCH_CHECK(span_g[j] >= 0 && span_g[j] < G && 0 <= span_a[j] && span_a[j] < span_b[j] && span_b[j] <= S, "span");
    if (span_a[j] >= first_pos + T) continue;
    start[j] = std::max<int64_t>(span_a[j] - first_pos, 0);
    parts.push_back(at::empty({T - start[j], H, D}, q.options()));
    part_ptr[j] = reinterpret_cast<uint16_t*>(parts.back().data_ptr());
  }
  const auto* qb = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  float* lm = log_mass.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t tiles = (T + kMT - 1) / kMT, group = H / Hkv;

  // Tasks (head, query tile) are taken from a shared counter, heaviest first: at::parallel_for's
  // static halves would give one thread the late (causally heavier) tiles.
  std::atomic<int64_t> next{0};
  const int64_t ntasks = H * tiles;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    alignas(64) uint32_t qt[kMT * 256];            // the tile's queries as bf16 pairs (D ≤ 512)
    alignas(64) float x[kMT * kNT];                // scores of one key tile
    alignas(64) uint16_t pb[kMT * kNT];            // their softmax weights in bf16
    alignas(64) float o[kMT * 512];                // per query the block's output accumulator
    float m[kMT], s[kMT], alpha[kMT];
    for (int64_t task = next++; task < ntasks; task = next++) {
      // Heaviest tiles (latest queries) first: the causal work grows with the tile index.
      const int64_t h = task % H, tile = tiles - 1 - task / H, hk = h / group;
      const int64_t t0 = tile * kMT, mt = std::min(kMT, T - t0);
      const int64_t pos0 = first_pos + t0, pos_last = pos0 + mt - 1;
      std::fill(qt, qt + kMT * D2, 0u);
      for (int64_t r = 0; r < mt; ++r) {
        const uint16_t* qr = qb + (t0 + r) * qs0 + h * qs1;
        for (int64_t d2 = 0; d2 < D2; ++d2) qt[r * D2 + d2] = qr[2 * d2] | (uint32_t{qr[2 * d2 + 1]} << 16);
      }
      const uint32_t* kh = kp.data() + hk * D2 * Spad;
      const uint32_t* vh = vp.data() + hk * (Spad / 2) * D;
      for (int64_t j = 0; j < P; ++j) {
        const int64_t a = span_a[j], b = std::min(span_b[j], pos_last + 1);
        if (a > pos_last) break;  // spans are in order: none later is seen by this tile
        for (int64_t r = 0; r < kMT; ++r) { m[r] = neg_inf; s[r] = 0.f; }
        std::fill(o, o + kMT * D, 0.f);
        const int64_t r_begin = std::max<int64_t>(0, a - pos0);  // earlier queries do not see the block
        const int64_t r4 = r_begin & ~int64_t{3};
        for (int64_t j0 = a & ~int64_t{1}; j0 < b; j0 += kNT) {
          const int nk = static_cast<int>(std::min<int64_t>(4, (b - j0 + 15) / 16));  // 16-key columns used
          switch (nk) {  // x = q·k, 4 queries × 16·nk keys at a time
            case 4: qk_tile<4>(qt, kh + j0, Spad, D2, r4, mt, x); break;
            case 3: qk_tile<3>(qt, kh + j0, Spad, D2, r4, mt, x); break;
            case 2: qk_tile<2>(qt, kh + j0, Spad, D2, r4, mt, x); break;
            default: qk_tile<1>(qt, kh + j0, Spad, D2, r4, mt, x); break;
          }
          // Online softmax per query over the keys of [a, b) it sees (key ≤ its position).
          const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
          const int64_t lo = std::max(a, j0);
          for (int64_t r = r4; r < mt; ++r) {
            const int64_t hi = std::min(b, pos0 + r + 1);  // keys [lo, hi) visible to this query
            float* xr = x + r * kNT;
            __m512 vmax = _mm512_set1_ps(neg_inf);
            for (int c = 0; c < nk; ++c) {
              const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j0 + 16 * c)));
              const __mmask16 mk = _mm512_cmp_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(lo)), _MM_CMPINT_NLT) &
                                   _mm512_cmp_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(hi)), _MM_CMPINT_LT);
              const __m512 val = _mm512_mask_mul_ps(_mm512_set1_ps(neg_inf), mk, _mm512_load_ps(xr + 16 * c),
                                                    _mm512_set1_ps(sc));
              _mm512_store_ps(xr + 16 * c, val);
              vmax = _mm512_max_ps(vmax, val);
            }
            const float mnew = std::max(m[r], _mm512_reduce_max_ps(vmax));
            if (mnew == neg_inf) {  // sees no key of this tile yet
              alpha[r] = 1.f;
              std::memset(pb + r * kNT, 0, kNT * sizeof(uint16_t));
              continue;
            }
            alpha[r] = m[r] == neg_inf ? 0.f : std::exp(m[r] - mnew);
            m[r] = mnew;
            __m512 sum = _mm512_setzero_ps();
            for (int c = 0; c < nk; ++c) {
              const __m512 e = exp512_nonpos(_mm512_sub_ps(_mm512_load_ps(xr + 16 * c), _mm512_set1_ps(mnew)));
              sum = _mm512_add_ps(sum, e);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + r * kNT + 16 * c), (__m256i)_mm512_cvtneps_pbh(e));
            }
            s[r] = s[r] * alpha[r] + _mm512_reduce_add_ps(sum);
          }
          // o = alpha·o + P·V, 4 queries × 64 (or 32) dims at a time; P as bf16 pairs over keys.
          for (int64_t c0 = 0; c0 < D; c0 += 64) {
            if (D - c0 >= 64) {
              pv_tile<4>(reinterpret_cast<const uint32_t*>(pb), vh + (j0 / 2) * D + c0, D, 8 * nk, alpha, r4, mt, o + c0);
            } else {
              pv_tile<2>(reinterpret_cast<const uint32_t*>(pb), vh + (j0 / 2) * D + c0, D, 8 * nk, alpha, r4, mt, o + c0);
            }
          }
        }
        // Finish the block: L = m + ln s, o / s, written for the queries that see it.
        const int64_t g = span_g[j];
        for (int64_t r = r_begin; r < mt; ++r) {
          const int64_t t = t0 + r;
          uint16_t* dst = part_ptr[j] + ((t - start[j]) * H + h) * D;
          const float inv = s[r] > 0.f ? 1.f / s[r] : 0.f;
          lm[(g * H + h) * T + t] = s[r] > 0.f ? m[r] + std::log(s[r]) : neg_inf;
          for (int64_t d = 0; d < D; d += 16) {
            const __m512 val = _mm512_mul_ps(_mm512_load_ps(o + r * D + d), _mm512_set1_ps(inv));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                                (__m256i)_mm512_cvtneps_pbh(val));
          }
        }
      }
    }
  });
  parts.insert(parts.begin(), log_mass);
  return parts;
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("merge_blocks", &merge_blocks, "out = sum over blocks of mass x block output (prefill merge)");
#ifdef __AVX512BF16__
  mod.def("block_prefill", &block_prefill, "per-semantic-block causal attention of a prefill chunk (bf16)");
#endif
  mod.def("block_partials", &block_partials, "per-semantic-block online-softmax partials over a paged KV cache");
}
