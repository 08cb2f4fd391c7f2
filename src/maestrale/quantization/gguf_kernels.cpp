// x @ W.T with W in GGUF blocks as stored in the file (Q4_0, Q4_1, Q8_0), for CPU decoding.
//
// As llama.cpp does, each row of x is quantized once per product to int8 blocks of 32 (scale = max |x| / 127), so a
// block's dot product is an integer one: 32 byte products summed by maddubs / madd, then scaled by both scales.
// Q4_0's (q - 8) and Q4_1's + m are folded out of the loop: sum (q - 8) y = sum q y - 8 sum y, with sum y per
// activation block computed once. Built with AVX2 + FMA + F16C where the CPU has them (maestrale passes -mavx2 ...),
// with a scalar loop of the same arithmetic otherwise. Registered as the torch operator maestrale::gguf_mm, beside
// maestrale::decode_attention, the attention of the CPU decode step over the valid slots of a static cache.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MAESTRALE_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;  // values per block, in every type here
enum GGMLType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };  // GGML's numbering, as in the file

struct BlockQ4_0 { uint16_t d; uint8_t qs[16]; };  // value j: low nibble of qs[j], value j + 16: high nibble
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[16]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[32]; };
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ8_0) == 34, "GGUF block sizes");

inline float half(uint16_t h) {
#ifdef MAESTRALE_AVX2
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// The activations in int8 blocks: q (m rows of k values), and per block b and row r, at b * stride + r (so that a
// block's values for consecutive rows are adjacent): d, the scale, and s, d times the sum of the block's q.
struct Activations { const int8_t* q; int64_t k; const float* d; const float* s; int64_t stride; };

#ifdef MAESTRALE_AVX2
inline float hmax(__m256 v) {
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}
#endif

// x * 127 / max |x| rounded to nearest even, per block of 32 (cvtps_epi32 rounds as nearbyint does).
void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* s, int64_t stride) {
  for (int64_t b = 0; b < k / QK; ++b, x += QK, q += QK) {
#ifdef MAESTRALE_AVX2
    __m256 v[4], top = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[i]));
    }
    const float amax = hmax(top);
#else
    float amax = 0.f;
    for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(x[i]));
#endif
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
#ifdef MAESTRALE_AVX2
    __m256i n[4];
    for (int i = 0; i < 4; ++i) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
    // packs work within 128-bit lanes: the 4-value groups come out as a0 b0 c0 d0 a1 b1 c1 d1; put them in order
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                        _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
    for (int i = 0; i < QK; ++i) {
      q[i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));
      sum += q[i];
    }
#endif
    d[b * stride] = scale;
    s[b * stride] = scale * static_cast<float>(sum);
  }
}

#ifdef MAESTRALE_AVX2
inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}

// 32 unsigned bytes times 32 signed bytes, summed in 8 int32 lanes, as floats.
inline __m256 dot_bytes(__m256i u, __m256i s) {
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

inline __m256i nibbles(const uint8_t* qs) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}
#endif

// NR consecutive weight rows against R activation rows: each weight block is unpacked once for all R, each
// activation block loaded once for all NR, and the NR * R accumulators are independent chains (one row alone waits
// on its fmadd latency). Result: sum_b d_w d_x (sum q_w q_x) + sum_b offset_w s_x, with offset_w = -8 d_w (Q4_0),
// m (Q4_1) or none (Q8_0); the offsets of the R rows are summed in one vector (s_x of a block is adjacent for them).
template <typename Block, int NR, int R>
void dot_tile(const Block* w, const Activations& x, int64_t blocks, float* out, int64_t stride) {
  constexpr bool q8 = std::is_same_v<Block, BlockQ8_0>, q4_1 = std::is_same_v<Block, BlockQ4_1>;
#ifdef MAESTRALE_AVX2
  __m256 acc[NR][R], offset[NR];
  for (int i = 0; i < NR; ++i) {
    offset[i] = _mm256_setzero_ps();
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const float* dx = x.d + b * x.stride;
    const __m256 sx = _mm256_loadu_ps(x.s + b * x.stride);  // R <= 8 rows; the stride leaves room for 8
    for (int i = 0; i < NR; ++i) {
      const Block& blk = w[i * blocks + b];
      // A decode step streams ~100 MB of blocks once, from memory: asking 2 KB ahead keeps enough loads in flight
      // (a batch-1 step's products took 14 ms instead of 21 on one thread, BENCHMARKS.md).
      _mm_prefetch(reinterpret_cast<const char*>(&blk) + 2048, _MM_HINT_T0);
      const __m256 dw = _mm256_set1_ps(half(blk.d));
      __m256i q, u;
      if constexpr (q8) {
        q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs));
        u = _mm256_sign_epi8(q, q);  // maddubs takes one unsigned operand: |q|, then y with q's sign
      } else {
        u = nibbles(blk.qs);
        if constexpr (q4_1) offset[i] = _mm256_fmadd_ps(_mm256_set1_ps(half(blk.m)), sx, offset[i]);
        else offset[i] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(-8.f)), sx, offset[i]);
      }
      for (int r = 0; r < R; ++r) {
        __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + r * x.k + b * QK));
        if constexpr (q8) y = _mm256_sign_epi8(y, q);
        acc[i][r] = _mm256_fmadd_ps(dot_bytes(u, y), _mm256_mul_ps(dw, _mm256_broadcast_ss(dx + r)), acc[i][r]);
      }
    }
  }
  for (int i = 0; i < NR; ++i) {
    alignas(32) float offsets[8];
    _mm256_store_ps(offsets, offset[i]);
    for (int r = 0; r < R; ++r) out[r * stride + i] = hsum(acc[i][r]) + (q8 ? 0.f : offsets[r]);
  }
#else
  float total[NR][R] = {}, offset[NR][R] = {};
  int values[QK];
  for (int64_t b = 0; b < blocks; ++b) {
    for (int i = 0; i < NR; ++i) {
      const Block& blk = w[i * blocks + b];
      const float dw = half(blk.d);
      for (int j = 0; j < QK; ++j) {
        if constexpr (q8) values[j] = blk.qs[j];
        else values[j] = j < 16 ? blk.qs[j] & 15 : blk.qs[j - 16] >> 4;
      }
      for (int r = 0; r < R; ++r) {
        int sum = 0;
        for (int j = 0; j < QK; ++j) sum += values[j] * x.q[r * x.k + b * QK + j];
        total[i][r] += dw * x.d[b * x.stride + r] * static_cast<float>(sum);
        if constexpr (q4_1) offset[i][r] += half(blk.m) * x.s[b * x.stride + r];
        else if constexpr (!q8) offset[i][r] += -8.f * dw * x.s[b * x.stride + r];
      }
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < R; ++r) out[r * stride + i] = total[i][r] + offset[i][r];
#endif
}

// Weight rows [begin, end) against R activation rows: NR weight rows at a time, then one at a time.
template <typename Block, int NR, int R>
void rows_tile(const Block* w, const Activations& x, float* out, int64_t n, int64_t blocks, int64_t begin,
               int64_t end) {
  int64_t r = begin;
  for (; r + NR <= end; r += NR) dot_tile<Block, NR, R>(w + r * blocks, x, blocks, out + r, n);
  for (; r < end; ++r) dot_tile<Block, 1, R>(w + r * blocks, x, blocks, out + r, n);
}

template <typename Block>
void product(const Block* w, const Activations& x, int64_t m, float* out, int64_t n, int64_t blocks) {
  // Two weight rows at a time for the 4-bit types; Q8_0's larger blocks run out of registers with two (3x slower).
  constexpr int NR = std::is_same_v<Block, BlockQ8_0> ? 1 : 2;
  // Enough rows per task that a thread's share outweighs waking it (~32 KB of blocks).
  const int64_t grain = std::max<int64_t>(NR, 32768 / (blocks * static_cast<int64_t>(sizeof(Block))));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0; i < m;) {
      const Activations rows{x.q + i * x.k, x.k, x.d + i, x.s + i, x.stride};
      float* o = out + i * n;
      switch (std::min<int64_t>(m - i, 4)) {
        case 4: rows_tile<Block, NR, 4>(w, rows, o, n, blocks, begin, end); i += 4; break;
        case 3: rows_tile<Block, NR, 3>(w, rows, o, n, blocks, begin, end); i += 3; break;
        case 2: rows_tile<Block, NR, 2>(w, rows, o, n, blocks, begin, end); i += 2; break;
        default: rows_tile<Block, NR, 1>(w, rows, o, n, blocks, begin, end); i += 1;
      }
    }
  });
}

at::Tensor gguf_mm(const at::Tensor& x_in, const at::Tensor& weight, int64_t type) {
  TORCH_CHECK(x_in.dim() == 2, "gguf_mm: x must be (tokens, features), got ", x_in.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte, "gguf_mm: weight must be uint8 (rows, bytes)");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor w = weight.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0), blocks = k / QK;
  const int64_t block_bytes = type == Q4_0 ? 18 : type == Q4_1 ? 20 : type == Q8_0 ? 34 : 0;
  TORCH_CHECK(block_bytes, "gguf_mm: GGML type ", type, " is not one of Q4_0 (2), Q4_1 (3), Q8_0 (8)");
  TORCH_CHECK(k % QK == 0 && w.size(1) == blocks * block_bytes, "gguf_mm: x has ", k, " features, the weight ",
              w.size(1), " bytes a row; they must be ", QK, " values per block of ", block_bytes, " bytes");

  // Scales per block for rows padded to a multiple of 8 (plus 8): a tile reads 8 rows' s at once.
  const int64_t stride = (m + 7) / 8 * 8 + 8;
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor scales = at::zeros({2, blocks, stride}, x.options());
  float* d = scales.data_ptr<float>();
  float* s = d + blocks * stride;
  for (int64_t i = 0; i < m; ++i)
    quantize_row(x.data_ptr<float>() + i * k, k, q.data_ptr<int8_t>() + i * k, d + i, s + i, stride);
  const Activations rows{q.data_ptr<int8_t>(), k, d, s, stride};
  at::Tensor out = at::empty({m, n}, x.options());
  const void* data = w.data_ptr();
  float* o = out.data_ptr<float>();
  if (type == Q4_0) product(static_cast<const BlockQ4_0*>(data), rows, m, o, n, blocks);
  else if (type == Q4_1) product(static_cast<const BlockQ4_1*>(data), rows, m, o, n, blocks);
  else product(static_cast<const BlockQ8_0*>(data), rows, m, o, n, blocks);
  return out;
}

// One decode step's attention on CPU: q (batch, heads, d) against the cache slots that hold a token of the
// sequence (slot s holds token t - ((t - s) mod slots), valid where >= 0 and seq_mask is 1 there), each kv head
// serving heads / kv_heads query heads. Only those slots are read, where SDPA reads all of a static cache's.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& seq_mask, const at::Tensor& t_now, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: q must be (batch, heads, d), the caches (batch, kv_heads, slots, d), got ", q.sizes(),
              ", ", k_cache.sizes(), ", ", v_cache.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat, "decode_attention: q and the caches must be float32");
  TORCH_CHECK(seq_mask.scalar_type() == at::kChar && seq_mask.dim() == 2, "decode_attention: seq_mask must be int8");
  const at::Tensor qc = q.contiguous(), k = k_cache.contiguous(), v = v_cache.contiguous(), mask = seq_mask.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = k.size(1), slots = k.size(2);
  const int64_t groups = heads / kv_heads, columns = mask.size(1), t = t_now.item<int64_t>();
  TORCH_CHECK(heads % kv_heads == 0 && k.size(0) == batch && k.size(3) == d, "decode_attention: shapes disagree");
  at::Tensor out = at::empty_like(qc);
  const float *qp = qc.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int8_t* mp = mask.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> valid;
    std::vector<float> p;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads;
      valid.clear();
      for (int64_t s = 0; s < slots; ++s) {
        const int64_t token = t - (((t - s) % slots) + slots) % slots;
        if (token >= 0 && token < columns && mp[b * columns + token]) valid.push_back(s);
      }
      p.resize(valid.size());
      const float* kh = kp + task * slots * d;
      const float* vh = vp + task * slots * d;
      for (int64_t g = 0; g < groups; ++g) {
        const float* qh = qp + (task * groups + g) * d;  // query head h * groups + g reads kv head h
        float top = -INFINITY, total = 0.f;
        for (size_t j = 0; j < valid.size(); ++j) {
          const float* kr = kh + valid[j] * d;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t e = 0; e < d; ++e) dot += qh[e] * kr[e];
          p[j] = dot * static_cast<float>(scale);
          top = std::max(top, p[j]);
        }
        for (float& x : p) total += (x = std::exp(x - top));
        float* o = op + (task * groups + g) * d;
        std::fill(o, o + d, 0.f);
        for (size_t j = 0; j < valid.size(); ++j) {
          const float* vr = vh + valid[j] * d;
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) o[e] += p[j] * vr[e];
        }
        for (int64_t e = 0; e < d; ++e) o[e] /= total;
      }
    }
  });
  return out;
}

}  // namespace

// The namespace is set by the build (maestrale, or maestrale_scalar for the scalar build the tests load beside it).
TORCH_LIBRARY(MAESTRALE_OPS, m) {
  m.def("gguf_mm(Tensor x, Tensor weight, int type) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_mask, Tensor t, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(MAESTRALE_OPS, CPU, m) {
  m.impl("gguf_mm", gguf_mm);
  m.impl("decode_attention", decode_attention);
}
