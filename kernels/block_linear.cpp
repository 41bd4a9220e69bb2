// propd::block_linear: y = x @ W^T with W stored in a block format that represents its fp32
// values exactly (4-bit affine or 8-bit scaled blocks of 32 along K, or bf16). Each weight is
// rebuilt in registers to its exact fp32 value and multiplied in fp32, so the result is an fp32
// GEMM with the model's own weights; only the summation order differs, as between any two GEMMs.
//
// Layout: the N outputs are cut into tiles of 16. q holds, per tile and k, the 16 weights of
// that k (Q4_1: 8 bytes, byte j = n j low nibble | n j+8 high nibble; Q8_0: 16 int8; BF16: 16
// uint16); d (and m for Q4_1) hold fp16 scale (and offset) per tile, block of 32 k, and n.
// Up to 4 rows multiply each rebuilt weight straight from registers; more rows rebuild a tile
// once into a [K][16] fp32 panel (L1/L2) and run over it with an AVX2 6x16 register block.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

constexpr int64_t NT = 16;
constexpr int64_t KB = 32;

// Blocks of 32 k read ahead of the one being multiplied: the weights stream from memory once
// per step, and each k takes few instructions, so the hardware prefetcher alone leaves the
// loads waiting. Reading past a tile runs into the next one (tiles are contiguous).
// Distances of 2, 4, 8 and 16 blocks measured alike.
constexpr int64_t AHEAD = 4;

inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// Prefetches block b + AHEAD of a tile: its weights (q_block bytes a block) and scales d, m.
inline void read_ahead(int64_t b, const void* q, int64_t q_block, const at::Half* d = nullptr, const at::Half* m = nullptr) {
  prefetch(static_cast<const char*>(q) + (b + AHEAD) * q_block, q_block);
  if (d) prefetch(d + (b + AHEAD) * NT, NT * 2);
  if (m) prefetch(m + (b + AHEAD) * NT, NT * 2);
}

// Each format rebuilds the 16 weights of one k of a tile as two fp32 vectors (n 0-7, n 8-15),
// after `block(b)` loaded the scales of block b.
struct Q4_1 {
  const uint8_t* q;
  const at::Half* d;
  const at::Half* m;
  __m256 d0, d1, m0, m1;
  void block(int64_t b) {
    read_ahead(b, q, KB * 8, d, m);
    d0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + b * NT)));
    d1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + b * NT + 8)));
    m0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + b * NT)));
    m1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + b * NT + 8)));
  }
  void get(int64_t k, __m256& w0, __m256& w1) const {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k * 8)));
    const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(0x0F));
    const __m256i hi = _mm256_srli_epi32(v, 4);
    // d * q is exact in fp32 (11 x 4 bits), so the fused multiply-add rounds once, like d * q + m
    w0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(lo), m0);
    w1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(hi), m1);
  }
};

struct Q8_0 {
  const int8_t* q;
  const at::Half* d;
  __m256 d0, d1;
  void block(int64_t b) {
    read_ahead(b, q, KB * NT, d);
    d0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + b * NT)));
    d1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + b * NT + 8)));
  }
  void get(int64_t k, __m256& w0, __m256& w1) const {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k * NT));
    // d * q is exact in fp32 (11 x 8 bits)
    w0 = _mm256_mul_ps(d0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
    w1 = _mm256_mul_ps(d1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8))));
  }
};

struct BF16 {
  const uint16_t* q;
  void block(int64_t b) { read_ahead(b, q, KB * NT * 2); }
  void get(int64_t k, __m256& w0, __m256& w1) const {
    const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k * NT)));
    const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k * NT + 8)));
    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
    w1 = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
  }
};

// out[i][0:16] = x[i] . W_tile for MR rows, rebuilding each weight as it is used (one pass:
// few rows); U accumulators per row and half split K to hide the FMA latency (U divides 32).
template <int MR, int U, class Fmt>
void rows_times_tile(Fmt fmt, const float* x, int64_t ldx, int64_t K, float* out, int64_t ldo) {
  __m256 c0[U][MR], c1[U][MR];
  #pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) c0[u][i] = c1[u][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / KB; ++b) {
    fmt.block(b);
    for (int64_t k = b * KB; k < (b + 1) * KB; k += U) {
      #pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        __m256 w0, w1;
        fmt.get(k + u, w0, w1);
        #pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
          const __m256 a = _mm256_broadcast_ss(x + i * ldx + k + u);
          c0[u][i] = _mm256_fmadd_ps(a, w0, c0[u][i]);
          c1[u][i] = _mm256_fmadd_ps(a, w1, c1[u][i]);
        }
      }
    }
  }
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    __m256 s0 = c0[0][i], s1 = c1[0][i];
    #pragma GCC unroll 8
    for (int u = 1; u < U; ++u) {
      s0 = _mm256_add_ps(s0, c0[u][i]);
      s1 = _mm256_add_ps(s1, c1[u][i]);
    }
    _mm256_storeu_ps(out + i * ldo, s0);
    _mm256_storeu_ps(out + i * ldo + 8, s1);
  }
}

// The same product over a tile rebuilt once into a [K][16] fp32 panel (more than 4 rows).
template <int MR>
void rows_times_panel(const float* x, int64_t ldx, const float* panel, int64_t K, float* out, int64_t ldo) {
  __m256 c0[MR], c1[MR];
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * NT), w1 = _mm256_loadu_ps(panel + k * NT + 8);
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
      c0[i] = _mm256_fmadd_ps(a, w0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, w1, c1[i]);
    }
  }
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(out + i * ldo, c0[i]);
    _mm256_storeu_ps(out + i * ldo + 8, c1[i]);
  }
}

template <class Fmt>
void tile_product(Fmt fmt, const float* x, int64_t M, int64_t K, float* out, int64_t N, float* panel) {
  switch (M) {
    case 1: return rows_times_tile<1, 4>(fmt, x, K, K, out, N);
    case 2: return rows_times_tile<2, 2>(fmt, x, K, K, out, N);
    case 3: return rows_times_tile<3, 1>(fmt, x, K, K, out, N);
    case 4: return rows_times_tile<4, 1>(fmt, x, K, K, out, N);
    default: break;
  }
  for (int64_t b = 0; b < K / KB; ++b) {
    fmt.block(b);
    for (int64_t k = b * KB; k < (b + 1) * KB; ++k) {
      __m256 w0, w1;
      fmt.get(k, w0, w1);
      _mm256_storeu_ps(panel + k * NT, w0);
      _mm256_storeu_ps(panel + k * NT + 8, w1);
    }
  }
  // passes of at most 6 rows, as even as possible (8 -> 4 + 4: enough accumulators per pass)
  const int64_t passes = (M + 5) / 6;
  for (int64_t p = 0, r = 0; p < passes; ++p) {
    const int64_t rows = (M - r) / (passes - p);
    const float* xr = x + r * K;
    float* o = out + r * N;
    switch (rows) {
      case 1: rows_times_panel<1>(xr, K, panel, K, o, N); break;
      case 2: rows_times_panel<2>(xr, K, panel, K, o, N); break;
      case 3: rows_times_panel<3>(xr, K, panel, K, o, N); break;
      case 4: rows_times_panel<4>(xr, K, panel, K, o, N); break;
      case 5: rows_times_panel<5>(xr, K, panel, K, o, N); break;
      default: rows_times_panel<6>(xr, K, panel, K, o, N); break;
    }
    r += rows;
  }
}

// The same products with AVX-512 (one zmm holds a k's 16 weights; 32 registers let up to 16
// rows multiply each rebuilt weight straight from registers, so no panel is needed): built for
// AVX-512 in this region and run only where the CPU reports it (`isa`).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

struct Q4_1x {
  const uint8_t* q;
  const at::Half* d;
  const at::Half* m;
  __m512 dv, mv;
  void block(int64_t b) {
    read_ahead(b, q, KB * 8, d, m);
    dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + b * NT)));
    mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + b * NT)));
  }
  __m512 get(int64_t k) const {
    // the 8 bytes twice: n 0-7 are the low nibbles of the first copy, n 8-15 the high ones of the second
    const __m512i v = _mm512_cvtepu8_epi32(_mm_set1_epi64x(*reinterpret_cast<const int64_t*>(q + k * 8)));
    const __m512i shift = _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i n = _mm512_and_si512(_mm512_srlv_epi32(v, shift), _mm512_set1_epi32(0x0F));
    return _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(n), mv);  // exact, as in Q4_1
  }
};

struct Q8_0x {
  const int8_t* q;
  const at::Half* d;
  __m512 dv;
  void block(int64_t b) {
    read_ahead(b, q, KB * NT, d);
    dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + b * NT)));
  }
  __m512 get(int64_t k) const {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k * NT));
    return _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
  }
};

struct BF16x {
  const uint16_t* q;
  void block(int64_t b) { read_ahead(b, q, KB * NT * 2); }
  __m512 get(int64_t k) const {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k * NT)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
};

template <int MR, int U, class Fmt>
void rows_times_tile512(Fmt fmt, const float* x, int64_t ldx, int64_t K, float* out, int64_t ldo) {
  __m512 c[U][MR];
  #pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
    #pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) c[u][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / KB; ++b) {
    fmt.block(b);
    for (int64_t k = b * KB; k < (b + 1) * KB; k += U) {
      #pragma GCC unroll 16
      for (int u = 0; u < U; ++u) {
        const __m512 w = fmt.get(k + u);
        #pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) c[u][i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k + u]), w, c[u][i]);
      }
    }
  }
  #pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    __m512 s = c[0][i];
    #pragma GCC unroll 16
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, c[u][i]);
    _mm512_storeu_ps(out + i * ldo, s);
  }
}

template <class Fmt>
void tile_product512(Fmt fmt, const float* x, int64_t M, int64_t K, float* out, int64_t N) {
  // passes of at most 16 rows, as even as possible, each rebuilding the tile's weights again
  // (a tile's few KB stay in L1 between passes)
  const int64_t passes = (M + 15) / 16;
  for (int64_t p = 0, r = 0; p < passes; ++p) {
    const int64_t rows = (M - r) / (passes - p);
    const float* xr = x + r * K;
    float* o = out + r * N;
    switch (rows) {
      case 1: rows_times_tile512<1, 4>(fmt, xr, K, K, o, N); break;
      case 2: rows_times_tile512<2, 2>(fmt, xr, K, K, o, N); break;
      case 3: rows_times_tile512<3, 2>(fmt, xr, K, K, o, N); break;
      case 4: rows_times_tile512<4, 1>(fmt, xr, K, K, o, N); break;
      case 5: rows_times_tile512<5, 1>(fmt, xr, K, K, o, N); break;
      case 6: rows_times_tile512<6, 1>(fmt, xr, K, K, o, N); break;
      case 7: rows_times_tile512<7, 1>(fmt, xr, K, K, o, N); break;
      case 8: rows_times_tile512<8, 1>(fmt, xr, K, K, o, N); break;
      case 9: rows_times_tile512<9, 1>(fmt, xr, K, K, o, N); break;
      case 10: rows_times_tile512<10, 1>(fmt, xr, K, K, o, N); break;
      case 11: rows_times_tile512<11, 1>(fmt, xr, K, K, o, N); break;
      case 12: rows_times_tile512<12, 1>(fmt, xr, K, K, o, N); break;
      case 13: rows_times_tile512<13, 1>(fmt, xr, K, K, o, N); break;
      case 14: rows_times_tile512<14, 1>(fmt, xr, K, K, o, N); break;
      case 15: rows_times_tile512<15, 1>(fmt, xr, K, K, o, N); break;
      default: rows_times_tile512<16, 1>(fmt, xr, K, K, o, N); break;
    }
    r += rows;
  }
}

void tiles_avx512(int64_t begin, int64_t end, bool q4, bool q8, const uint8_t* qbase, int64_t bytes_per_tile,
                  const at::Half* dp, const at::Half* mp, const float* xp, int64_t M, int64_t K, float* op, int64_t N) {
  for (int64_t t = begin; t < end; ++t) {
    const uint8_t* qt = qbase + t * bytes_per_tile;
    const int64_t scales = t * (K / KB) * NT;
    float* o = op + t * NT;
    if (q4) tile_product512(Q4_1x{qt, dp + scales, mp + scales}, xp, M, K, o, N);
    else if (q8) tile_product512(Q8_0x{reinterpret_cast<const int8_t*>(qt), dp + scales}, xp, M, K, o, N);
    else tile_product512(BF16x{reinterpret_cast<const uint16_t*>(qt)}, xp, M, K, o, N);
  }
}

#pragma GCC pop_options

// Which instruction set the products run on: AVX-512 where the CPU has it (F, BW and VL), else
// AVX2; `block_linear_isa` reads or sets it (PROPD_BLOCK_ISA=avx2 at load keeps AVX2).
std::atomic<int> isa{-1};  // 0: AVX2, 1: AVX-512, -1: not decided yet

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

int current_isa() {
  int v = isa.load();
  if (v < 0) {
    const char* env = std::getenv("PROPD_BLOCK_ISA");
    v = has_avx512() && !(env && std::string(env) == "avx2") ? 1 : 0;
    isa.store(v);
  }
  return v;
}

std::string block_linear_isa(c10::optional<std::string> name) {
  if (name.has_value()) {
    TORCH_CHECK(*name == "avx2" || *name == "avx512", "propd::block_linear_isa: unknown instruction set '", *name,
                "' (avx2 or avx512)");
    TORCH_CHECK(*name == "avx2" || has_avx512(), "propd::block_linear_isa: this CPU has no AVX-512 (F, BW, VL)");
    isa.store(*name == "avx512" ? 1 : 0);
  }
  return current_isa() == 1 ? "avx512" : "avx2";
}

at::Tensor block_linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& d, const c10::optional<at::Tensor>& m) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "propd::block_linear: x must be float32, got ", x_in.scalar_type());
  TORCH_CHECK(q.dim() == 3 && q.size(2) * (q.scalar_type() == at::kByte ? 2 : 1) == NT && q.is_contiguous(),
              "propd::block_linear: q must be a contiguous [N/16, K, 16-weight] tile tensor");
  const int64_t tiles = q.size(0), K = q.size(1), N = tiles * NT;
  TORCH_CHECK(x_in.size(-1) == K, "propd::block_linear: x has ", x_in.size(-1), " features, the weight ", K);
  TORCH_CHECK(K % KB == 0, "propd::block_linear: K must be a multiple of 32, got ", K);
  const bool q4 = q.scalar_type() == at::kByte, q8 = q.scalar_type() == at::kChar, bf = q.scalar_type() == at::kShort;
  TORCH_CHECK(q4 || q8 || bf, "propd::block_linear: q must be uint8 (Q4_1), int8 (Q8_0) or int16 (bf16 bits)");
  if (!bf) {
    TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.numel() == tiles * (K / KB) * NT,
                "propd::block_linear: d must be contiguous float16 [N/16, K/32, 16]");
  }
  if (q4) {
    TORCH_CHECK(m.has_value() && m->scalar_type() == at::kHalf && m->is_contiguous() && m->numel() == d.numel(),
                "propd::block_linear: Q4_1 needs m, contiguous float16 like d");
  }
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.numel() / K;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  if (M == 0) return out;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t bytes_per_tile = q.stride(0) * q.element_size();
  const auto* qbase = static_cast<const uint8_t*>(q.data_ptr());
  const at::Half* dp = bf ? nullptr : d.data_ptr<at::Half>();
  const at::Half* mp = q4 ? m->data_ptr<at::Half>() : nullptr;
  if (current_isa() == 1) {
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      tiles_avx512(begin, end, q4, q8, qbase, bytes_per_tile, dp, mp, xp, M, K, op, N);
    });
    return out;
  }
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(M > 4 ? K * NT : 0);
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* qt = qbase + t * bytes_per_tile;
      const int64_t scales = t * (K / KB) * NT;
      float* o = op + t * NT;
      if (q4) tile_product(Q4_1{qt, dp + scales, mp + scales}, xp, M, K, o, N, panel.data());
      else if (q8) tile_product(Q8_0{reinterpret_cast<const int8_t*>(qt), dp + scales}, xp, M, K, o, N, panel.data());
      else tile_product(BF16{reinterpret_cast<const uint16_t*>(qt)}, xp, M, K, o, N, panel.data());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(propd, lib) {
  lib.def("block_linear(Tensor x, Tensor q, Tensor d, Tensor? m) -> Tensor");
  lib.def("block_linear_isa(str? name=None) -> str", &block_linear_isa);
}

TORCH_LIBRARY_IMPL(propd, CPU, lib) {
  lib.impl("block_linear", &block_linear);
}
