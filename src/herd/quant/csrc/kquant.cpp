// Matrix products on K-quant weights (Q4_K, Q6_K) kept at their own width, for the CPU.
//
// The weights are laid out once (herd/quant/native.py, `pack_*`) in blocks of 16 output rows: for each
// super-block of 256 values, one record with the codes interleaved so that one 64-byte load holds 4 (Q6_K
// high bits: 16) consecutive values of each of the 16 rows, then the rows' integer sub-scales and their
// float16 super-block scales. The input rows are quantized to int8 per 256 values (as llama.cpp's Q8_K),
// and every product of a sub-block is an exact int32 sum (AVX512-VNNI `vpdpbusd`: unsigned codes times
// signed input), scaled in integers by the sub-scale and in float32 once per super-block -- llama.cpp's
// own arithmetic for these types. Without AVX512-VNNI the same sums run as plain loops (same results).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <deque>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HERD_VNNI512 1
#endif

namespace {

constexpr int64_t ROWS = 16;      // output rows per block
constexpr int64_t SUPER = 256;    // values per super-block
constexpr int64_t REC_Q4K = 2048 + 128 + 128 + 32 + 32;  // codes, scales, mins, d, dmin
constexpr int64_t REC_Q6K = 256 + 32 + 32 + 16 * 192;    // scales, d, padding, then per 16 values 192 bytes of codes
constexpr int64_t Q6K_CODES = 320;  // (the codes in the order they are read: one forward stream per record)
constexpr int64_t Q4K = 12, Q6K = 14;                    // GGUF type numbers
constexpr int64_t TILE = 4;       // input rows multiplied per pass over a block's codes

int64_t record_bytes(int64_t qtype) { return qtype == Q4K ? REC_Q4K : REC_Q6K; }

// The input rows quantized per super-block: x ~ xq * xd, with the sums of each 16 codes.
struct QuantizedRows {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> d;       // [M, K/256]
  std::vector<int32_t> sum16; // [M, K/16]
};

QuantizedRows quantize_rows(const float* x, int64_t m, int64_t k) {
  QuantizedRows r;
  r.q.resize(m * k);
  r.d.resize(m * (k / SUPER));
  r.sum16.resize(m * (k / 16));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t s = 0; s < k / SUPER; ++s) {
      const float* v = x + i * k + s * SUPER;
      float amax = 0.f;
      for (int64_t j = 0; j < SUPER; ++j) amax = std::fmax(amax, std::fabs(v[j]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      r.d[i * (k / SUPER) + s] = amax / 127.f;
      int8_t* q = r.q.data() + i * k + s * SUPER;
      for (int64_t j = 0; j < SUPER; ++j) q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
      for (int64_t t = 0; t < SUPER / 16; ++t) {
        int32_t sum = 0;
        for (int64_t j = 0; j < 16; ++j) sum += q[t * 16 + j];
        r.sum16[i * (k / 16) + s * 16 + t] = sum;
      }
    }
  }
  return r;
}

inline float half_to_float(uint16_t h) {
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

#ifdef HERD_VNNI512

inline __m512i bcast(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One block of 16 output rows times `mt` (<= TILE) input rows -> y[i * ldy + row].
void block_q4k(const uint8_t* blk, int64_t supers, const QuantizedRows& x, int64_t row0, int64_t mt,
               int64_t k, float* y, int64_t ldy) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 acc[TILE];
  for (int i = 0; i < TILE; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t s = 0; s < supers; ++s) {
    const uint8_t* rec = blk + s * REC_Q4K;
    const uint8_t* sc = rec + 2048;
    const uint8_t* mn = rec + 2176;
    __m512i accq[TILE], accm[TILE];
    for (int i = 0; i < TILE; ++i) accq[i] = accm[i] = _mm512_setzero_si512();
    for (int g = 0; g < 8; ++g) {
      __m512i dlo[TILE], dhi[TILE];
      for (int i = 0; i < TILE; ++i) dlo[i] = dhi[i] = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {
        const __m512i w = _mm512_loadu_si512(rec + (g * 4 + c) * 64);
        const __m512i lo = _mm512_and_si512(w, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
        for (int64_t i = 0; i < mt; ++i) {
          const int8_t* xq = x.q.data() + (row0 + i) * k + s * SUPER + g * 32 + c * 8;
          dlo[i] = _mm512_dpbusd_epi32(dlo[i], lo, bcast(xq));
          dhi[i] = _mm512_dpbusd_epi32(dhi[i], hi, bcast(xq + 4));
        }
      }
      const __m512i scv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * 16)));
      const __m512i mnv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + g * 16)));
      for (int64_t i = 0; i < mt; ++i) {
        const int32_t* s16 = x.sum16.data() + (row0 + i) * (k / 16) + s * 16 + g * 2;
        accq[i] = _mm512_add_epi32(accq[i], _mm512_mullo_epi32(_mm512_add_epi32(dlo[i], dhi[i]), scv));
        accm[i] = _mm512_add_epi32(accm[i], _mm512_mullo_epi32(mnv, _mm512_set1_epi32(s16[0] + s16[1])));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 2304)));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 2336)));
    for (int64_t i = 0; i < mt; ++i) {
      const __m512 xd = _mm512_set1_ps(x.d[(row0 + i) * (k / SUPER) + s]);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(accq[i]), _mm512_mul_ps(d, xd), acc[i]);
      acc[i] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(accm[i]), _mm512_mul_ps(dmin, xd), acc[i]);
    }
  }
  for (int64_t i = 0; i < mt; ++i) _mm512_storeu_ps(y + i * ldy, acc[i]);
}

void block_q6k(const uint8_t* blk, int64_t supers, const QuantizedRows& x, int64_t row0, int64_t mt,
               int64_t k, float* y, int64_t ldy) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i top = _mm512_set1_epi8(0x30);
  __m512 acc[TILE];
  for (int i = 0; i < TILE; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t s = 0; s < supers; ++s) {
    const uint8_t* rec = blk + s * REC_Q6K;
    const int8_t* sc = reinterpret_cast<const int8_t*>(rec);
    __m512i acci[TILE];
    for (int i = 0; i < TILE; ++i) acci[i] = _mm512_setzero_si512();
    for (int t = 0; t < 16; ++t) {
      const uint8_t* chunk = rec + Q6K_CODES + t * 192;
      const __m512i l0 = _mm512_loadu_si512(chunk);
      const __m512i l1 = _mm512_loadu_si512(chunk + 64);
      const __m512i h = _mm512_loadu_si512(chunk + 128);
      const __m512i q0 = _mm512_or_si512(_mm512_and_si512(l0, nib), _mm512_and_si512(_mm512_slli_epi16(h, 4), top));
      const __m512i q1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l0, 4), nib),
                                         _mm512_and_si512(_mm512_slli_epi16(h, 2), top));
      const __m512i q2 = _mm512_or_si512(_mm512_and_si512(l1, nib), _mm512_and_si512(h, top));
      const __m512i q3 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l1, 4), nib),
                                         _mm512_and_si512(_mm512_srli_epi16(h, 2), top));
      const __m512i scv = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + t * 16)));
      for (int64_t i = 0; i < mt; ++i) {
        const int8_t* xq = x.q.data() + (row0 + i) * k + s * SUPER + t * 16;
        __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q0, bcast(xq));
        __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q2, bcast(xq + 8));
        a = _mm512_dpbusd_epi32(a, q1, bcast(xq + 4));
        b = _mm512_dpbusd_epi32(b, q3, bcast(xq + 12));
        const int32_t bias = 32 * x.sum16[(row0 + i) * (k / 16) + s * 16 + t];
        const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(a, b), _mm512_set1_epi32(bias));
        acci[i] = _mm512_add_epi32(acci[i], _mm512_mullo_epi32(dot, scv));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 256)));
    for (int64_t i = 0; i < mt; ++i) {
      const __m512 xd = _mm512_set1_ps(x.d[(row0 + i) * (k / SUPER) + s]);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acci[i]), _mm512_mul_ps(d, xd), acc[i]);
    }
  }
  for (int64_t i = 0; i < mt; ++i) _mm512_storeu_ps(y + i * ldy, acc[i]);
}

#else  // the same integer sums and float steps, one output row at a time

inline int code4(const uint8_t* rec, int r, int v) {  // 4-bit code of row r, value v (0..255) of a record
  const int chunk = v / 8, j = v % 8;
  const uint8_t b = rec[chunk * 64 + r * 4 + (j & 3)];
  return j < 4 ? (b & 0x0F) : (b >> 4);
}

void block_q4k(const uint8_t* blk, int64_t supers, const QuantizedRows& x, int64_t row0, int64_t mt,
               int64_t k, float* y, int64_t ldy) {
  for (int64_t i = 0; i < mt; ++i) {
    float acc[ROWS] = {0};
    for (int64_t s = 0; s < supers; ++s) {
      const uint8_t* rec = blk + s * REC_Q4K;
      const int8_t* xq = x.q.data() + (row0 + i) * k + s * SUPER;
      const int32_t* s16 = x.sum16.data() + (row0 + i) * (k / 16) + s * 16;
      const float xd = x.d[(row0 + i) * (k / SUPER) + s];
      for (int r = 0; r < ROWS; ++r) {
        int32_t accq = 0, accm = 0;
        for (int g = 0; g < 8; ++g) {
          int32_t dot = 0;
          for (int v = 0; v < 32; ++v) dot += code4(rec, r, g * 32 + v) * xq[g * 32 + v];
          accq += dot * rec[2048 + g * 16 + r];
          accm += rec[2176 + g * 16 + r] * (s16[2 * g] + s16[2 * g + 1]);
        }
        uint16_t dh, mh;
        std::memcpy(&dh, rec + 2304 + 2 * r, 2);
        std::memcpy(&mh, rec + 2336 + 2 * r, 2);
        acc[r] = std::fma(static_cast<float>(accq), half_to_float(dh) * xd, acc[r]);
        acc[r] = std::fma(-static_cast<float>(accm), half_to_float(mh) * xd, acc[r]);
      }
    }
    std::memcpy(y + i * ldy, acc, sizeof(acc));
  }
}

void block_q6k(const uint8_t* blk, int64_t supers, const QuantizedRows& x, int64_t row0, int64_t mt,
               int64_t k, float* y, int64_t ldy) {
  for (int64_t i = 0; i < mt; ++i) {
    float acc[ROWS] = {0};
    for (int64_t s = 0; s < supers; ++s) {
      const uint8_t* rec = blk + s * REC_Q6K;
      const int8_t* xq = x.q.data() + (row0 + i) * k + s * SUPER;
      const int32_t* s16 = x.sum16.data() + (row0 + i) * (k / 16) + s * 16;
      const float xd = x.d[(row0 + i) * (k / SUPER) + s];
      for (int r = 0; r < ROWS; ++r) {
        int32_t acci = 0;
        for (int t = 0; t < 16; ++t) {
          int32_t dot = 0;
          for (int v = 0; v < 16; ++v) {
            const int val = t * 16 + v;
            const uint8_t* chunk = rec + Q6K_CODES + t * 192;
            const uint8_t lo = chunk[(v / 8) * 64 + r * 4 + (v & 3)];
            const int high = (chunk[128 + r * 4 + (v & 3)] >> (2 * (v / 4))) & 3;
            dot += ((v % 8 < 4 ? lo & 0x0F : lo >> 4) | (high << 4)) * xq[val];
          }
          acci += (dot - 32 * s16[t]) * static_cast<int8_t>(rec[t * 16 + r]);
        }
        uint16_t dh;
        std::memcpy(&dh, rec + 256 + 2 * r, 2);
        acc[r] = std::fma(static_cast<float>(acci), half_to_float(dh) * xd, acc[r]);
      }
    }
    std::memcpy(y + i * ldy, acc, sizeof(acc));
  }
}

#endif

at::Tensor product(const at::Tensor& x, const at::Tensor& blob, int64_t qtype, int64_t n, int64_t k) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) == k && x.is_contiguous(),
              "kquant: x must be contiguous float32 [M, ", k, "]");
  TORCH_CHECK(n % ROWS == 0 && k % SUPER == 0, "kquant: shape must be a multiple of [16, 256]");
  const int64_t m = x.size(0), supers = k / SUPER, rec = record_bytes(qtype);
  TORCH_CHECK(blob.numel() == n / ROWS * supers * rec, "kquant: packed weight has the wrong size");
  const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), m, k);
  at::Tensor y = at::empty({m, n}, x.options());
  float* out = y.data_ptr<float>();
  const uint8_t* base = blob.data_ptr<uint8_t>();
  auto run = qtype == Q4K ? block_q4k : block_q6k;
  at::parallel_for(0, n / ROWS, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = 0; i < m; i += TILE)
        run(base + b * supers * rec, supers, xq, i, std::min(TILE, m - i), k, out + i * n + b * ROWS, n);
  });
  return y;
}

// Weights registered once (a matrix, or one per expert), named by a handle: the compiled decode step calls
// `mm` with the handle, so the graph never holds the weights and the routed expert is picked in here.
struct Entry {
  std::vector<at::Tensor> blobs;
  int64_t qtype, n, k;
};
std::mutex registry_lock;
std::deque<Entry> registry;  // a deque: adding a weight never moves the others

int64_t add(std::vector<at::Tensor> blobs, int64_t qtype, int64_t n, int64_t k) {
  TORCH_CHECK(qtype == Q4K || qtype == Q6K, "kquant: type ", qtype, " is not Q4_K or Q6_K");
  for (auto& b : blobs)
    TORCH_CHECK(b.dtype() == at::kByte && b.is_contiguous() && b.numel() == n / ROWS * (k / SUPER) * record_bytes(qtype),
                "kquant: packed weight has the wrong size");
  std::lock_guard<std::mutex> g(registry_lock);
  registry.push_back(Entry{std::move(blobs), qtype, n, k});
  return static_cast<int64_t>(registry.size()) - 1;
}

void drop(int64_t handle) {
  std::lock_guard<std::mutex> g(registry_lock);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()), "kquant: no weight ", handle);
  registry[handle].blobs.clear();
}

at::Tensor mm(const at::Tensor& x, const at::Tensor& expert, int64_t handle) {
  at::Tensor blob;
  int64_t qtype, n, k;
  {
    std::lock_guard<std::mutex> g(registry_lock);
    TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()) && !registry[handle].blobs.empty(),
                "kquant: no weight ", handle);
    const Entry& e = registry[handle];
    int64_t pick = 0;
    if (e.blobs.size() > 1) pick = expert.reshape({-1})[0].item<int64_t>();
    TORCH_CHECK(pick >= 0 && pick < static_cast<int64_t>(e.blobs.size()), "kquant: expert ", pick, " out of range");
    blob = e.blobs[pick];
    qtype = e.qtype, n = e.n, k = e.k;
  }
  return product(x.contiguous(), blob, qtype, n, k);
}

bool vnni512() {
#ifdef HERD_VNNI512
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(herd_kquant, m) {
  m.def("add(Tensor[] blobs, int qtype, int n, int k) -> int", add);
  m.def("drop(int handle) -> ()", drop);
  m.def("mm(Tensor x, Tensor expert, int handle) -> Tensor");  // a CPU kernel (below): torch.compile traces it
  m.def("vnni512() -> bool", vnni512);
}

TORCH_LIBRARY_IMPL(herd_kquant, CPU, m) { m.impl("mm", mm); }
