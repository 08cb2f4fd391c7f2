// x @ W.T with W in GGUF blocks as stored in the file (Q4_0, Q4_1, Q8_0), for CPU decoding.
//
// As llama.cpp does, each row of x is quantized once per product to int8 blocks of 32 (scale = max |x| / 127), so a
// block's dot product is an integer one: 32 byte products summed by maddubs / madd, then scaled by both scales.
// Q4_0's (q - 8) and Q4_1's + m are folded out of the loop: sum (q - 8) y = sum q y - 8 sum y, with sum y per
// activation block computed once. Built with AVX2 + FMA + F16C where the CPU has them (maestrale passes -mavx2 ...),
// with a scalar loop of the same arithmetic otherwise. Registered as the torch operator maestrale::gguf_mm.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
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

// One activation row in int8 blocks: q (K values), d (scale per block), s (d * sum of q per block).
struct Row { const int8_t* q; const float* d; const float* s; };

void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < k / QK; ++b, x += QK, q += QK) {
    float amax = 0.f;
    for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int i = 0; i < QK; ++i) {
      q[i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));
      sum += q[i];
    }
    d[b] = scale;
    s[b] = scale * static_cast<float>(sum);
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

// sum_b d_w * d_x * (sum q_w q_x) + sum_b offset_w * s_x, where offset_w is -8 d_w (Q4_0) or m (Q4_1).
template <typename Block>
float dot_q4(const Block* w, const Row& x, int64_t blocks) {
  float offset = 0.f;
#ifdef MAESTRALE_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const float dw = half(w[b].d);
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * QK));
    acc = _mm256_fmadd_ps(dot_bytes(nibbles(w[b].qs), y), _mm256_set1_ps(dw * x.d[b]), acc);
    if constexpr (sizeof(Block) == sizeof(BlockQ4_1)) offset += half(w[b].m) * x.s[b];
    else offset -= 8.f * dw * x.s[b];
  }
  return hsum(acc) + offset;
#else
  float total = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    const float dw = half(w[b].d);
    const int8_t* y = x.q + b * QK;
    int sum = 0;
    for (int i = 0; i < 16; ++i) sum += (w[b].qs[i] & 15) * y[i] + (w[b].qs[i] >> 4) * y[i + 16];
    total += dw * x.d[b] * static_cast<float>(sum);
    if constexpr (sizeof(Block) == sizeof(BlockQ4_1)) offset += half(w[b].m) * x.s[b];
    else offset -= 8.f * dw * x.s[b];
  }
  return total + offset;
#endif
}

float dot_q8_0(const BlockQ8_0* w, const Row& x, int64_t blocks) {
#ifdef MAESTRALE_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs));
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * QK));
    // maddubs takes one unsigned operand: |q| times y with q's sign
    const __m256 dot = dot_bytes(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
    acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(half(w[b].d) * x.d[b]), acc);
  }
  return hsum(acc);
#else
  float total = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    int sum = 0;
    for (int i = 0; i < QK; ++i) sum += w[b].qs[i] * x.q[b * QK + i];
    total += half(w[b].d) * x.d[b] * static_cast<float>(sum);
  }
  return total;
#endif
}

template <typename Block, typename Dot>
void product(const Block* w, const std::vector<Row>& rows, float* out, int64_t n, int64_t blocks, Dot dot) {
  // Enough rows per task that a thread's share outweighs waking it (~32 KB of blocks).
  const int64_t grain = std::max<int64_t>(1, 32768 / (blocks * sizeof(Block) * static_cast<int64_t>(rows.size())));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (size_t m = 0; m < rows.size(); ++m) out[m * n + r] = dot(w + r * blocks, rows[m], blocks);
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

  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({2, m, blocks}, x.options());
  std::vector<Row> rows(m);
  for (int64_t i = 0; i < m; ++i) {
    float* d = scales.data_ptr<float>() + i * blocks;
    float* s = d + m * blocks;
    quantize_row(x.data_ptr<float>() + i * k, k, q.data_ptr<int8_t>() + i * k, d, s);
    rows[i] = Row{q.data_ptr<int8_t>() + i * k, d, s};
  }
  at::Tensor out = at::empty({m, n}, x.options());
  const void* data = w.data_ptr();
  float* o = out.data_ptr<float>();
  if (type == Q4_0) product(static_cast<const BlockQ4_0*>(data), rows, o, n, blocks, dot_q4<BlockQ4_0>);
  else if (type == Q4_1) product(static_cast<const BlockQ4_1*>(data), rows, o, n, blocks, dot_q4<BlockQ4_1>);
  else product(static_cast<const BlockQ8_0*>(data), rows, o, n, blocks, dot_q8_0);
  return out;
}

}  // namespace

// The namespace is set by the build (maestrale, or maestrale_scalar for the scalar build the tests load beside it).
TORCH_LIBRARY(MAESTRALE_OPS, m) { m.def("gguf_mm(Tensor x, Tensor weight, int type) -> Tensor"); }

TORCH_LIBRARY_IMPL(MAESTRALE_OPS, CPU, m) { m.impl("gguf_mm", gguf_mm); }
