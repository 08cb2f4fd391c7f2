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

// One weight row against R activation rows (each weight block unpacked once for all R):
// sum_b d_w d_x (sum q_w q_x) + sum_b offset_w s_x, with offset_w = -8 d_w (Q4_0), m (Q4_1) or none (Q8_0).
template <typename Block, int R>
void dot_rows(const Block* w, const Row* x, int64_t blocks, float* out, int64_t stride) {
  constexpr bool q8 = std::is_same_v<Block, BlockQ8_0>;
  float offset[R] = {};
#ifdef MAESTRALE_AVX2
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const float dw = half(w[b].d);
    __m256i q, u;
    if constexpr (q8) {
      q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs));
      u = _mm256_sign_epi8(q, q);  // maddubs takes one unsigned operand: |q|, then y with q's sign
    } else {
      u = nibbles(w[b].qs);
    }
    for (int r = 0; r < R; ++r) {
      __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r].q + b * QK));
      if constexpr (q8) y = _mm256_sign_epi8(y, q);
      acc[r] = _mm256_fmadd_ps(dot_bytes(u, y), _mm256_set1_ps(dw * x[r].d[b]), acc[r]);
      if constexpr (std::is_same_v<Block, BlockQ4_1>) offset[r] += half(w[b].m) * x[r].s[b];
      else if constexpr (!q8) offset[r] -= 8.f * dw * x[r].s[b];
    }
  }
  for (int r = 0; r < R; ++r) out[r * stride] = hsum(acc[r]) + offset[r];
#else
  float total[R] = {};
  int values[QK];
  for (int64_t b = 0; b < blocks; ++b) {
    const float dw = half(w[b].d);
    for (int i = 0; i < QK; ++i) {
      if constexpr (q8) values[i] = w[b].qs[i];
      else values[i] = i < 16 ? w[b].qs[i] & 15 : w[b].qs[i - 16] >> 4;
    }
    for (int r = 0; r < R; ++r) {
      int sum = 0;
      for (int i = 0; i < QK; ++i) sum += values[i] * x[r].q[b * QK + i];
      total[r] += dw * x[r].d[b] * static_cast<float>(sum);
      if constexpr (std::is_same_v<Block, BlockQ4_1>) offset[r] += half(w[b].m) * x[r].s[b];
      else if constexpr (!q8) offset[r] -= 8.f * dw * x[r].s[b];
    }
  }
  for (int r = 0; r < R; ++r) out[r * stride] = total[r] + offset[r];
#endif
}

template <typename Block>
void product(const Block* w, const std::vector<Row>& rows, float* out, int64_t n, int64_t blocks) {
  const int64_t m = static_cast<int64_t>(rows.size());
  // Enough rows per task that a thread's share outweighs waking it (~32 KB of blocks).
  const int64_t grain = std::max<int64_t>(1, 32768 / (blocks * static_cast<int64_t>(sizeof(Block))));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Block* row = w + r * blocks;
      int64_t i = 0;
      for (; i + 4 <= m; i += 4) dot_rows<Block, 4>(row, &rows[i], blocks, out + i * n + r, n);
      if (m - i == 3) dot_rows<Block, 3>(row, &rows[i], blocks, out + i * n + r, n);
      if (m - i == 2) dot_rows<Block, 2>(row, &rows[i], blocks, out + i * n + r, n);
      if (m - i == 1) dot_rows<Block, 1>(row, &rows[i], blocks, out + i * n + r, n);
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
  if (type == Q4_0) product(static_cast<const BlockQ4_0*>(data), rows, o, n, blocks);
  else if (type == Q4_1) product(static_cast<const BlockQ4_1*>(data), rows, o, n, blocks);
  else product(static_cast<const BlockQ8_0*>(data), rows, o, n, blocks);
  return out;
}

}  // namespace

// The namespace is set by the build (maestrale, or maestrale_scalar for the scalar build the tests load beside it).
TORCH_LIBRARY(MAESTRALE_OPS, m) { m.def("gguf_mm(Tensor x, Tensor weight, int type) -> Tensor"); }

TORCH_LIBRARY_IMPL(MAESTRALE_OPS, CPU, m) { m.impl("gguf_mm", gguf_mm); }
