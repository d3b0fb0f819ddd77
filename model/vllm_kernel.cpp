// Split-KV over vLLM's paged CPU KV cache where the splits are the semantic blocks (SPEC §2, form 2).
//
// For every query (one per row: decode) and every semantic block g, one pass over the row's keys
// keeps an online-softmax accumulator against the query's running max M: s = Σ e^{x−M},
// sw = Σ e^{x−M}·x and o = Σ e^{x−M}·v, finished into the block's log-mass L = m + ln s, its inner entropy L − sw/s and
// its own attention output o/s (L = −inf, 0, 0 for a block with no visible key). The dial is *not*
// here: Python merges the blocks with localist.model.attention.merge_block_partials. The cache is
// read once, in place (no gather copy). merge_blocks is the prefill's merge Σ_g π^ρ_g·o_g (π^ρ from
// Python's dial_mass), written once into vLLM's output without a float buffer per block.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
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
// 2^k by building the float's exponent; below −87 the result is 0 (the guard of SPEC §2 numerics).
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

template <typename T>
void partials_impl(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& block_table,
                   const at::Tensor& seq_lens, const at::Tensor& block_ids, int64_t G, bool k_transposed,
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
        const T* K = base;            // [D, bs] if transposed, else [bs, D]
        const T* V = base + bs * D;   // [bs, D]
        for (int64_t gi = 0; gi < Gq; ++gi) {
          float* x = scores.data() + gi * bs;
          const float* qq = qh + gi * D;
          if (k_transposed) {  // K^T rows are contiguous over the block's tokens: vectorise over t
            for (int64_t t = 0; t < bs; ++t) x[t] = 0.f;
            for (int64_t d = 0; d < D; ++d) {
              axpy(x, K + d * bs, qq[d], bs);
            }
          } else {
            for (int64_t t = 0; t < bs; ++t) {
              float acc = 0.f;
              const T* kt = K + t * D;
              for (int64_t d = 0; d < D; ++d) acc += qq[d] * to_float(kt[d]);
              x[t] = acc;
            }
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
        const int64_t* idb = ids + r * Tmax + b * bs;
        for (int64_t t = 0; t < n; ++t) {
          const int64_t g = idb[t];
          if (g < 0 || g >= G) continue;
          const T* vt = V + t * D;
          for (int64_t gi = 0; gi < Gq; ++gi) {
            const float et = ex[gi * bs + t];
            const int64_t k = gi * G + g;
            s[k] += et;
            sw[k] += et * scores[gi * bs + t];
            axpy(o + k * D, vt, et, D);
          }
        }
      }
      for (int64_t k = 0; k < Gq * G; ++k) m[k] = M[k / G];
      for (int64_t k = 0; k < Gq * G; ++k) {  // finish: M → L, sw → H(w), o → o / s
        float* ok = o + k * D;
        if (s[k] > 0.f) {
          const float L = m[k] + std::log(s[k]);
          sw[k] = std::max(0.f, L - sw[k] / s[k]);
          const float inv = 1.f / s[k];
          for (int64_t d = 0; d < D; ++d) ok[d] *= inv;
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

}  // namespace

// q [R, Hkv, g, D] float32; kv_cache [blocks, Hkv, 2, bs·D] (K then V per block and head);
// block_table [R, nblk] int64; seq_lens [R] int64; block_ids [R, ≥ S] int64 (−1: skip).
// Returns log_mass [R, Hkv, g, G], inner_entropy [R, Hkv, g, G], block outputs [R, Hkv, g, G, D].
std::vector<at::Tensor> block_partials(at::Tensor q, at::Tensor kv_cache, at::Tensor block_table,
                                       at::Tensor seq_lens, at::Tensor block_ids, int64_t G, bool k_transposed,
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
    case at::kFloat: partials_impl<float>(q, kv_cache, bt, sl, ids, G, k_transposed, scale, m, s, sw, o); break;
    case at::kBFloat16:
      partials_impl<c10::BFloat16>(q, kv_cache, bt, sl, ids, G, k_transposed, scale, m, s, sw, o);
      break;
    case at::kHalf: partials_impl<c10::Half>(q, kv_cache, bt, sl, ids, G, k_transposed, scale, m, s, sw, o); break;
    default: TORCH_CHECK(false, "kv_cache dtype not supported: ", kv_cache.scalar_type());
  }
  return {m, sw, o};
}

// Prefill merge (SPEC §2, form 2) without a float buffer per block:
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("merge_blocks", &merge_blocks, "out = sum over blocks of mass x block output (prefill merge)");
  mod.def("block_partials", &block_partials, "per-semantic-block online-softmax partials over a paged KV cache");
}
