// x @ W.T with W in GGUF blocks (Q4_0, Q4_1, Q8_0), for CPU decoding, with 8 rows' blocks interleaved at load (see
// group_tile).
//
// As llama.cpp does, each row of x is quantized once per product to int8 blocks of 32 (scale = max |x| / 127), so a
// block's dot product is an integer one: 32 byte products summed by maddubs / madd (or dpbusd), then scaled by
// both scales.
// Q4_0's (q - 8) and Q4_1's + m are folded out of the loop: sum (q - 8) y = sum q y - 8 sum y, with sum y per
// activation block computed once. Built with AVX-512 (F, BW, VL, VNNI: vpdpbusd sums 4 byte products a lane) where
// the CPU has it, else with AVX2 + FMA + F16C where it has those (maestrale passes -mavx2 ...), else as a scalar loop
// of the same arithmetic; the integer sums are the same in all three, and AVX2's and AVX-512's float arithmetic of
// each row too. Registered as the torch operator maestrale::gguf_mm, beside maestrale::decode_attention, the
// attention of the CPU decode step over the valid slots of a static cache.

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
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MAESTRALE_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define MAESTRALE_AVX512 1
#endif
#endif

namespace {

constexpr int64_t QK = 32;  // values per block, in every type here
enum GGMLType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };  // GGML's numbering, as in the file

inline float half(uint16_t h) {
#ifdef MAESTRALE_AVX2
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// The activations in int8 blocks: q (m rows of k values), and per block b and row r, at b * stride + r: d, the
// scale, n, the sum of the block's q, and s = d n.
struct Activations { const int8_t* q; int64_t k; const float* d; const float* s; const int32_t* n; int64_t stride; };

#ifdef MAESTRALE_AVX2
inline float hmax(__m256 v) {
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}
#endif

// x * 127 / max |x| rounded to nearest even, per block of 32 (cvtps_epi32 rounds as nearbyint does).
void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* s, int32_t* sums, int64_t stride) {
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
    sums[b * stride] = sum;
  }
}

// The weights are laid out at load (gguf_kernels.py's interleave) so that one pass streams 8 rows from one place:
// groups of 8 rows, and within a group, per block of 32 columns, the 8 rows' d (fp16), for Q4_1 their 8 m, then their
// quantized values in 8-byte chunks, the rows in the order kChunkRow: bytes 0-7 of the 8 rows, then bytes 8-15 (and
// for Q8_0 16-23, 24-31). A Q4 byte j holds values j (low nibble) and j + 16 (high), so a 32-byte load holds 4 rows'
// values 0-7 and 16-23, or 8-15 and 24-31, against 8 activation bytes broadcast to each row's chunk; the order makes
// AVX2's last horizontal add leave rows 0-7 in order (AVX-512 keeps its sums in chunk order, permuted at the end).
constexpr int kChunkRow[8] = {0, 1, 4, 5, 2, 3, 6, 7};  // chunk c holds row kChunkRow[c] (and row r chunk kChunkRow[r])
constexpr int64_t kGroup = 8;

constexpr int64_t group_bytes(int64_t type) { return type == Q8_0 ? 16 + 256 : (type == Q4_1 ? 32 : 16) + 128; }

#ifdef MAESTRALE_AVX512
// 8 activation bytes at y + j in each 64-bit lane: the chunk of values each weight row's chunk meets.
inline __m512i chunks_of(const int8_t* y, int j) { return _mm512_set1_epi64(*reinterpret_cast<const int64_t*>(y + j)); }

// dpbusd's 16 lanes hold 2 lanes per chunk: their sums, per chunk c in lane c.
inline __m256i chunk_sums(__m512i s) { return _mm512_cvtepi64_epi32(_mm512_add_epi32(s, _mm512_srli_epi64(s, 32))); }

const __m256i kChunkOrder = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);  // kChunkRow, for permutes either way
#endif

// One group of 8 Q4 weight rows against R activation rows: out[r * stride + i] for i < rows (the group may be
// padded). Each row's result is sum_b d_w d_x (sum q_w q_x) + sum_b m_w s_x, with m_w = -8 d_w for Q4_0: sum (q - 8)
// y = sum q y - 8 sum y. AVX2: per block, the 8 rows' 32 x 32 byte products are 8 maddubs per activation row, summed
// in int16 (at most 4 x 2 x 15 x 127 = 15240, then pairs: 30480 < 2^15); AVX-512: 4 dpbusd. Their scales apply to the
// 8 rows at once.
template <bool has_min, int R>
void group_tile(const uint8_t* w, const Activations& x, int64_t blocks, float* out, int64_t stride, int64_t rows) {
  constexpr int64_t bytes = group_bytes(has_min ? Q4_1 : Q4_0), nibbles_at = has_min ? 32 : 16;
#ifdef MAESTRALE_AVX2
  __m256 acc[R], offset[R];
  for (int r = 0; r < R; ++r) acc[r] = offset[r] = _mm256_setzero_ps();
#ifdef MAESTRALE_AVX512
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b, w += bytes) {
    _mm_prefetch(reinterpret_cast<const char*>(w) + 1024, _MM_HINT_T0);
    // the accumulators in chunk order: the same float operations on each row as AVX2's, in other lanes
    const __m256 dw = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))),
                                               kChunkOrder);
    const __m256 mw = has_min ? _mm256_permutevar8x32_ps(
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))), kChunkOrder) : dw;
    const __m512i raw0 = _mm512_loadu_si512(w + nibbles_at), raw1 = _mm512_loadu_si512(w + nibbles_at + 64);
    const __m512i v0 = _mm512_and_si512(raw0, low), v16 = _mm512_and_si512(_mm512_srli_epi16(raw0, 4), low);
    const __m512i v8 = _mm512_and_si512(raw1, low), v24 = _mm512_and_si512(_mm512_srli_epi16(raw1, 4), low);
    for (int r = 0; r < R; ++r) {
      const int8_t* y = x.q + r * x.k + b * QK;
      __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v0, chunks_of(y, 0));
      s = _mm512_dpbusd_epi32(s, v16, chunks_of(y, 16));
      s = _mm512_dpbusd_epi32(s, v8, chunks_of(y, 8));
      s = _mm512_dpbusd_epi32(s, v24, chunks_of(y, 24));
      const __m256 dx = _mm256_broadcast_ss(x.d + b * x.stride + r);
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(chunk_sums(s)), dx), dw, acc[r]);
      offset[r] = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(x.s + b * x.stride + r), offset[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_permutevar8x32_ps(acc[r], kChunkOrder);
    offset[r] = _mm256_permutevar8x32_ps(offset[r], kChunkOrder);
  }
#else
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < blocks; ++b, w += bytes) {
    _mm_prefetch(reinterpret_cast<const char*>(w) + 1024, _MM_HINT_T0);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    // Q4_0: -8 times the sum of d_w s_x, the product by -8 (exact) once at the end
    const __m256 mw = has_min ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))) : dw;
    __m256i v[8];  // per 32-byte chunk c: its low nibbles at 2c, its high nibbles at 2c + 1
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + nibbles_at + 32 * c));
      v[2 * c] = _mm256_and_si256(raw, low);
      v[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* y = x.q + r * x.k + b * QK;
      const auto at = [y](int j) { return _mm256_set1_epi64x(*reinterpret_cast<const int64_t*>(y + j)); };
      const __m256i y0 = at(0), y8 = at(8), y16 = at(16), y24 = at(24);
      // chunks 0 and 1 (bytes 0-7 of rows 0, 1, 4, 5 and of rows 2, 3, 6, 7) hold values 0-7 and 16-23; 2 and 3, 8-31
      const __m256i a = _mm256_add_epi16(
          _mm256_add_epi16(_mm256_maddubs_epi16(v[0], y0), _mm256_maddubs_epi16(v[1], y16)),
          _mm256_add_epi16(_mm256_maddubs_epi16(v[4], y8), _mm256_maddubs_epi16(v[5], y24)));
      const __m256i c = _mm256_add_epi16(
          _mm256_add_epi16(_mm256_maddubs_epi16(v[2], y0), _mm256_maddubs_epi16(v[3], y16)),
          _mm256_add_epi16(_mm256_maddubs_epi16(v[6], y8), _mm256_maddubs_epi16(v[7], y24)));
      const __m256i sums = _mm256_madd_epi16(_mm256_hadd_epi16(a, c), ones);  // rows 0-7
      const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_broadcast_ss(x.d + b * x.stride + r));
      acc[r] = _mm256_fmadd_ps(scaled, dw, acc[r]);
      offset[r] = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(x.s + b * x.stride + r), offset[r]);
    }
  }
#endif
  for (int r = 0; r < R; ++r) {
    alignas(32) float result[kGroup];
    _mm256_store_ps(result, _mm256_fmadd_ps(offset[r], _mm256_set1_ps(has_min ? 1.f : -8.f), acc[r]));
    std::copy(result, result + rows, out + r * stride);
  }
#else
  float total[R][kGroup] = {};
  for (int64_t b = 0; b < blocks; ++b, w += bytes) {
    const uint16_t* d = reinterpret_cast<const uint16_t*>(w);
    for (int i = 0; i < kGroup; ++i) {
      const float dw = half(d[i]), mw = has_min ? half(d[kGroup + i]) : -8.f * dw;
      const uint8_t* chunks = w + nibbles_at + 8 * kChunkRow[i];  // bytes 0-7 here, 8-15 64 bytes on
      for (int r = 0; r < R; ++r) {
        const int8_t* y = x.q + r * x.k + b * QK;
        int sum = 0;
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = chunks[j < 8 ? j : 64 + j - 8];
          sum += (byte & 15) * y[j] + (byte >> 4) * y[j + 16];
        }
        total[r][i] += dw * x.d[b * x.stride + r] * static_cast<float>(sum) + mw * x.s[b * x.stride + r];
      }
    }
  }
  for (int r = 0; r < R; ++r) std::copy(total[r], total[r] + rows, out + r * stride);
#endif
}

// One group of 8 Q8_0 weight rows against R activation rows, as group_tile: sum_b d_w d_x (sum q_w q_x). Both are
// signed: AVX2's maddubs takes |q_w| and q_x with q_w's sign (pairs at most 2 x 128 x 127 < 2^15); AVX-512's dpbusd
// takes q_w + 128 as unsigned, and 128 n_x comes off the int32 sums.
template <int R>
void q8_0_group_tile(const uint8_t* w, const Activations& x, int64_t blocks, float* out, int64_t stride, int64_t rows) {
  constexpr int64_t bytes = group_bytes(Q8_0);
#ifdef MAESTRALE_AVX2
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, w += bytes) {
    _mm_prefetch(reinterpret_cast<const char*>(w) + 1024, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w) + 1024 + 64, _MM_HINT_T0);
#ifdef MAESTRALE_AVX512
    const __m256 dw = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))),
                                               kChunkOrder);
    __m512i u[4];  // bytes 8j-8j+7 of each row, + 128
    for (int j = 0; j < 4; ++j) u[j] = _mm512_xor_si512(_mm512_loadu_si512(w + 16 + 64 * j), _mm512_set1_epi8(-128));
    for (int r = 0; r < R; ++r) {
      const int8_t* y = x.q + r * x.k + b * QK;
      __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[0], chunks_of(y, 0));
      for (int j = 1; j < 4; ++j) s = _mm512_dpbusd_epi32(s, u[j], chunks_of(y, 8 * j));
      const __m256i sums = _mm256_sub_epi32(chunk_sums(s), _mm256_set1_epi32(128 * x.n[b * x.stride + r]));
      const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_broadcast_ss(x.d + b * x.stride + r));
      acc[r] = _mm256_fmadd_ps(scaled, dw, acc[r]);
    }
#else
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const auto load = [w](int c) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 + 32 * c)); };
    __m256i u[8];  // 32-byte chunk c: bytes 8 (c / 2) on of rows 0, 1, 4, 5 (c even) or 2, 3, 6, 7 (odd), as |q|
    for (int c = 0; c < 8; ++c) u[c] = _mm256_sign_epi8(load(c), load(c));
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; ++r) {
      const int8_t* y = x.q + r * x.k + b * QK;
      const auto dot = [&](int c) {
        const __m256i yc = _mm256_set1_epi64x(*reinterpret_cast<const int64_t*>(y + 8 * (c / 2)));
        return _mm256_madd_epi16(_mm256_maddubs_epi16(u[c], _mm256_sign_epi8(yc, load(c))), ones);
      };
      const __m256i a = _mm256_add_epi32(_mm256_add_epi32(dot(0), dot(2)), _mm256_add_epi32(dot(4), dot(6)));
      const __m256i c = _mm256_add_epi32(_mm256_add_epi32(dot(1), dot(3)), _mm256_add_epi32(dot(5), dot(7)));
      const __m256i sums = _mm256_hadd_epi32(a, c);  // rows 0-7
      const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_broadcast_ss(x.d + b * x.stride + r));
      acc[r] = _mm256_fmadd_ps(scaled, dw, acc[r]);
    }
#endif
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float result[kGroup];
#ifdef MAESTRALE_AVX512
    acc[r] = _mm256_permutevar8x32_ps(acc[r], kChunkOrder);
#endif
    _mm256_store_ps(result, acc[r]);
    std::copy(result, result + rows, out + r * stride);
  }
#else
  float total[R][kGroup] = {};
  for (int64_t b = 0; b < blocks; ++b, w += bytes) {
    const uint16_t* d = reinterpret_cast<const uint16_t*>(w);
    for (int i = 0; i < kGroup; ++i) {
      const int8_t* q = reinterpret_cast<const int8_t*>(w + 16 + 8 * kChunkRow[i]);  // bytes 8j on at 64 j
      for (int r = 0; r < R; ++r) {
        const int8_t* y = x.q + r * x.k + b * QK;
        int sum = 0;
        for (int j = 0; j < QK; ++j) sum += q[64 * (j / 8) + j % 8] * y[j];
        total[r][i] += half(d[i]) * x.d[b * x.stride + r] * static_cast<float>(sum);
      }
    }
  }
  for (int r = 0; r < R; ++r) std::copy(total[r], total[r] + rows, out + r * stride);
#endif
}

// Runs tile<R>(activation rows i.., their output) over the m activation rows, 4 at a time while 4 are left.
template <typename Tile>
void over_rows(const Activations& x, int64_t m, float* out, int64_t n, Tile tile) {
  for (int64_t i = 0; i < m;) {
    const Activations rows{x.q + i * x.k, x.k, x.d + i, x.s + i, x.n + i, x.stride};
    float* o = out + i * n;
    switch (std::min<int64_t>(m - i, 4)) {
      case 4: tile(std::integral_constant<int, 4>{}, rows, o); i += 4; break;
      case 3: tile(std::integral_constant<int, 3>{}, rows, o); i += 3; break;
      case 2: tile(std::integral_constant<int, 2>{}, rows, o); i += 2; break;
      default: tile(std::integral_constant<int, 1>{}, rows, o); i += 1;
    }
  }
}

// Threads split the weight rows, in groups of 8, evenly; each streams its share once, all activation rows against
// each group while it is in cache. Tasks hold enough blocks (~32 KB) that a thread's share outweighs waking it.
template <int64_t type>
void groups_product(const uint8_t* w, const Activations& x, int64_t m, float* out, int64_t n, int64_t blocks) {
  const int64_t row_bytes = blocks * group_bytes(type), groups = (n + kGroup - 1) / kGroup;
  at::parallel_for(0, groups, std::max<int64_t>(1, 32768 / row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      over_rows(x, m, out + g * kGroup, n, [&](auto R, const Activations& rows, float* o) {
        const uint8_t* group = w + g * row_bytes;
        const int64_t valid = std::min(kGroup, n - g * kGroup);
        if constexpr (type == Q8_0) q8_0_group_tile<R>(group, rows, blocks, o, n, valid);
        else group_tile<type == Q4_1, R>(group, rows, blocks, o, n, valid);
      });
  });
}

// x @ W.T for W's n rows, interleaved: (groups of 8 rows, bytes a group).
at::Tensor gguf_mm(const at::Tensor& x_in, const at::Tensor& weight, int64_t type, int64_t n) {
  TORCH_CHECK(x_in.dim() == 2, "gguf_mm: x must be (tokens, features), got ", x_in.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte, "gguf_mm: weight must be uint8 (rows, bytes)");
  TORCH_CHECK(type == Q4_0 || type == Q4_1 || type == Q8_0, "gguf_mm: GGML type ", type,
              " is not one of Q4_0 (2), Q4_1 (3), Q8_0 (8)");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor w = weight.contiguous();
  const int64_t m = x.size(0), k = x.size(1), blocks = k / QK, bytes = group_bytes(type);
  const int64_t groups = (n + kGroup - 1) / kGroup;
  TORCH_CHECK(k % QK == 0 && w.size(0) == groups && w.size(1) == blocks * bytes, "gguf_mm: x has ", k,
              " features, the weight is ", w.sizes(), " for ", n, " rows; it must be (", groups, ", ",
              k / QK * bytes, ") for ", QK, " values of 8 rows per ", bytes, " bytes");

  // one allocation for d, s and n (blocks x m each, 4 bytes a value), then q: a decode step runs ~120 products
  const int64_t stride = m, plane = blocks * stride;
  at::Tensor scratch = at::empty({3 * plane * 4 + m * k}, x.options().dtype(at::kByte));
  float* d = reinterpret_cast<float*>(scratch.data_ptr<uint8_t>());
  float* s = d + plane;
  int32_t* sum = reinterpret_cast<int32_t*>(s + plane);
  int8_t* q = reinterpret_cast<int8_t*>(sum + plane);
  for (int64_t i = 0; i < m; ++i) quantize_row(x.data_ptr<float>() + i * k, k, q + i * k, d + i, s + i, sum + i, stride);
  const Activations act{q, k, d, s, sum, stride};
  at::Tensor out = at::empty({m, n}, x.options());
  const uint8_t* data = w.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  if (type == Q4_0) groups_product<Q4_0>(data, act, m, o, n, blocks);
  else if (type == Q4_1) groups_product<Q4_1>(data, act, m, o, n, blocks);
  else groups_product<Q8_0>(data, act, m, o, n, blocks);
  return out;
}

// The instruction set this library was built for, which the tests check against the CPU's.
std::string simd() {
#if defined(MAESTRALE_AVX512)
  return "avx512";
#elif defined(MAESTRALE_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
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
  m.def("gguf_mm(Tensor x, Tensor weight, int type, int rows) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_mask, Tensor t, float scale) -> Tensor");
  m.def("simd", &simd);
}

TORCH_LIBRARY_IMPL(MAESTRALE_OPS, CPU, m) {
  m.impl("gguf_mm", gguf_mm);
  m.impl("decode_attention", decode_attention);
}
