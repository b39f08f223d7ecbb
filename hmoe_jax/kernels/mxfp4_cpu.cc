// The MXFP4 grouped expert matmul for a host CPU, as an XLA FFI custom call (`hmoe_jax.kernels.cpu`).
//
//   out[r, n] = sum_k rows[r, k] * W_e[n, k]      for each row r of expert e's group
//
// rows [M, K] float32, sorted by expert; group_sizes [E] int32 (rows past their sum get zeros);
// W_e kept as the checkpoint stores it: blocks uint8 [E, N, K/32, 16] (byte b of a group holds
// element 2b in its low nibble, 2b+1 in its high one) and scales uint8 [E, N, K/32]; table float32
// [256, 16] is the decoded value of every (scale, code) pair, passed in by the caller from the XLA
// path's own decode table, so the weights this kernel multiplies are bit for bit the decoded ones.
//
// Why it is fast where the XLA path is not: the XLA path decodes a weight chunk into memory with a
// gather per element and then multiplies it; here each tile of kTileN output rows is decoded once into
// a buffer that stays in L2 (register permutes, no gather), then every row of the expert's group is
// multiplied against it, 4 rows x 2 outputs at a time over k in L1-sized chunks. With at most
// kFusedMaxRows rows (decode) nothing is buffered: each group is decoded into registers and used at once.
// Only the experts a row was routed to are touched. Work is split over the CPU's cores by (expert,
// output tile) with OpenMP. Built with -march=native: AVX-512 where the CPU has it (a 16-wide permute
// looks up a whole scale's values), else AVX2 (two 8-wide permutes and a blend), else scalar.
//
// Summation order differs from XLA's dot (one partial sum per vector lane, then a horizontal sum), so
// float32 results agree with the XLA path to float32 rounding, not bit for bit; the XLA path stays the
// oracle.
//
// The decoded tile is stored in "lane order" within each group of 32: per vector of kLanes bytes, the
// low nibbles (elements 0, 2, ..), then the high ones (1, 3, ..). The rows are permuted to the same
// order once per call, so the products pair up exactly as in natural order.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HMOE_AVX2 1
#endif
#if defined(HMOE_AVX2) && defined(__AVX512F__)
// A 512-bit permute looks up all 16 decoded values of a scale at once: a group decodes in 3 shuffles
// instead of 10 (the shuffle port is what bounds the decode).
#define HMOE_AVX512 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// XLA runs its CPU programs with denormals flushed (FTZ/DAZ set on its threads); OpenMP's worker threads
// start without. Each worker takes the calling thread's floating-point mode for the region, so a product
// is the same whichever thread computes it, and what XLA computes.
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
inline unsigned int CurrentFloatMode() { return _mm_getcsr(); }
class ScopedFloatMode {
 public:
  explicit ScopedFloatMode(unsigned int mode) : saved_(_mm_getcsr()) { _mm_setcsr(mode); }
  ~ScopedFloatMode() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
};
#else
inline unsigned int CurrentFloatMode() { return 0; }
struct ScopedFloatMode {
  explicit ScopedFloatMode(unsigned int) {}
};
#endif

// Buffers on cache-line boundaries: a 64-byte load that straddles two lines costs two.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const CacheLineAllocator&) const { return true; }
  bool operator!=(const CacheLineAllocator&) const { return false; }
};
using Floats = std::vector<float, CacheLineAllocator<float>>;

constexpr int kGroup = 32;      // values per scale
constexpr int kGroupBytes = 16; // two 4-bit codes per byte
constexpr int kTileN = 16;      // output rows decoded at a time: 16 x K floats, in L2 for K <= 8192
constexpr int kFusedMaxRows = 4; // up to this many rows per expert, decode straight into registers

// Natural element (within a group) of lane-order position p: per vector of kLanes bytes' codes, their low
// nibbles (elements 0, 2, ..), then their high ones (1, 3, ..).
#ifdef HMOE_AVX512
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
inline int LaneElement(int p) {
  const int half = p / (2 * kLanes), q = p % (2 * kLanes);
  return 2 * kLanes * half + 2 * (q % kLanes) + q / kLanes;
}

#ifdef HMOE_AVX512
// One group's 32 weights in lane order, as two vectors: the codes index the scale's 16 decoded values.
inline void DecodeGroup512(const uint8_t* bytes, const __m512 values, __m512* low, __m512* high) {
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  *low = _mm512_permutexvar_ps(_mm512_and_si512(codes, _mm512_set1_epi32(0x0F)), values);
  *high = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), values);
}
#endif

// One group: 16 bytes and the decoded values of its scale (16 floats) -> 32 floats in lane order.
inline void DecodeGroup(const uint8_t* bytes, const float* values, float* out) {
#if defined(HMOE_AVX512)
  __m512 low, high;
  DecodeGroup512(bytes, _mm512_loadu_ps(values), &low, &high);
  _mm512_storeu_ps(out, low);
  _mm512_storeu_ps(out + 16, high);
#elif defined(HMOE_AVX2)
  const __m256 positive = _mm256_loadu_ps(values), negative = _mm256_loadu_ps(values + 8);
  const __m256i low_mask = _mm256_set1_epi32(0x0F);
  for (int half = 0; half < 2; ++half) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * half)));
    const __m256i codes[2] = {_mm256_and_si256(v, low_mask), _mm256_srli_epi32(v, 4)};
    for (int j = 0; j < 2; ++j) {
      // permutevar reads the low 3 bits (the magnitude); bit 3 (the sign) picks the negative half.
      const __m256 pos = _mm256_permutevar8x32_ps(positive, codes[j]);
      const __m256 neg = _mm256_permutevar8x32_ps(negative, codes[j]);
      const __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(codes[j], 28));
      _mm256_storeu_ps(out + 16 * half + 8 * j, _mm256_blendv_ps(pos, neg, sign));
    }
  }
#else
  for (int p = 0; p < kGroup; ++p) {
    const int e = LaneElement(p);
    const uint8_t byte = bytes[e / 2];
    out[p] = values[(e % 2) ? (byte >> 4) : (byte & 0x0F)];
  }
#endif
}

#ifdef HMOE_AVX2
inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// lanes[(r * C + c) * kLanes + j] += x[r][i] * w[c][i] over the i of lane j, for R rows of x and C rows of w
// over one chunk of length k (a multiple of kLanes). The lane sums carry across chunks, so the chunks of x
// and w a block reads stay in L1: whole rows would stream from L2, which cannot feed the FMAs.
template <int R, int C>
inline void DotBlock(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k, float* lanes) {
#if defined(HMOE_AVX512)
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_loadu_ps(lanes + (r * C + c) * kLanes);
  for (int64_t i = 0; i < k; i += kLanes) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_ps(w + c * ldw + i);
    for (int r = 0; r < R; ++r) {
      __m512 xv = _mm512_loadu_ps(x + r * ldx + i);
      // Kept in a register: as a memory operand of each FMA it would be loaded C times, and the loads,
      // not the FMAs, would bound the loop.
      asm("" : "+v"(xv));
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(lanes + (r * C + c) * kLanes, acc[r][c]);
#elif defined(HMOE_AVX2)
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_loadu_ps(lanes + (r * C + c) * kLanes);
  for (int64_t i = 0; i < k; i += kLanes) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(w + c * ldw + i);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(lanes + (r * C + c) * kLanes, acc[r][c]);
#else
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      for (int64_t i = 0; i < k; ++i) lanes[(r * C + c) * kLanes + i % kLanes] += x[r * ldx + i] * w[c * ldw + i];
#endif
}

inline float LaneSum(const float* lanes) {
#if defined(HMOE_AVX512)
  return _mm512_reduce_add_ps(_mm512_loadu_ps(lanes));
#elif defined(HMOE_AVX2)
  return HorizontalSum(_mm256_loadu_ps(lanes));
#else
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += lanes[j];
  return s;
#endif
}

// R rows against every row of the tile over one chunk; `lanes` holds R x cols x kLanes sums, pair of tile
// rows by pair as DotBlock<R, 2> lays them out (a lone last row as DotBlock<R, 1>).
template <int R>
void DotRows(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k, int cols, float* lanes) {
  int c = 0;
  for (; c + 2 <= cols; c += 2) DotBlock<R, 2>(x, ldx, w + c * ldw, ldw, k, lanes + R * c * kLanes);
  if (c < cols) DotBlock<R, 1>(x, ldx, w + c * ldw, ldw, k, lanes + R * c * kLanes);
}

template <int R>
void StoreRows(const float* lanes, int cols, float* out, int64_t ldo) {
  int c = 0;
  for (; c + 2 <= cols; c += 2)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 2; ++j) out[r * ldo + c + j] = LaneSum(lanes + (R * c + r * 2 + j) * kLanes);
  if (c < cols)
    for (int r = 0; r < R; ++r) out[r * ldo + c] = LaneSum(lanes + (R * c + r) * kLanes);
}

// Few rows (decode: one token per expert): decoding into a buffer would cost more than the products, so
// R rows x C output rows are computed straight from the packed bytes, each group decoded into registers
// and used at once. packed/scale point at output row 0 of the C rows (row stride `groups`).
template <int R, int C>
inline void FusedBlock(const float* x, int64_t ldx, const uint8_t* packed, const uint8_t* scale, int64_t groups,
                       const float* values, float* out, int64_t ldo) {
#if defined(HMOE_AVX512)
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 w[C][2];
    for (int c = 0; c < C; ++c)
      DecodeGroup512(packed + (c * groups + g) * kGroupBytes, _mm512_loadu_ps(values + 16 * scale[c * groups + g]),
                     &w[c][0], &w[c][1]);
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < 2; ++q) {
        const __m512 xv = _mm512_loadu_ps(x + r * ldx + g * kGroup + 16 * q);
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, w[c][q], acc[r][c]);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * ldo + c] = _mm512_reduce_add_ps(acc[r][c]);
#elif defined(HMOE_AVX2)
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const __m256i low_mask = _mm256_set1_epi32(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    __m256 w[C][4];
    for (int c = 0; c < C; ++c) {
      const float* v = values + 16 * scale[c * groups + g];
      const __m256 positive = _mm256_loadu_ps(v), negative = _mm256_loadu_ps(v + 8);
      const uint8_t* bytes = packed + (c * groups + g) * kGroupBytes;
      for (int half = 0; half < 2; ++half) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * half)));
        const __m256i codes[2] = {_mm256_and_si256(b, low_mask), _mm256_srli_epi32(b, 4)};
        for (int j = 0; j < 2; ++j)
          w[c][2 * half + j] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(positive, codes[j]),
                                                _mm256_permutevar8x32_ps(negative, codes[j]),
                                                _mm256_castsi256_ps(_mm256_slli_epi32(codes[j], 28)));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < 4; ++q) {
        const __m256 xv = _mm256_loadu_ps(x + r * ldx + g * kGroup + 8 * q);
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, w[c][q], acc[r][c]);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * ldo + c] = HorizontalSum(acc[r][c]);
#else
  float w[kGroup];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        DecodeGroup(packed + (c * groups + g) * kGroupBytes, values + 16 * scale[c * groups + g], w);
        for (int p = 0; p < kGroup; ++p) s += x[r * ldx + g * kGroup + p] * w[p];
      }
      out[r * ldo + c] = s;
    }
#endif
}

template <int R>
void FusedRows(const float* x, int64_t ldx, const uint8_t* packed, const uint8_t* scale, int64_t groups,
               const float* values, int cols, float* out, int64_t ldo) {
  int c = 0;
  for (; c + 2 <= cols; c += 2)
    FusedBlock<R, 2>(x, ldx, packed + c * groups * kGroupBytes, scale + c * groups, groups, values, out + c, ldo);
  if (c < cols) FusedBlock<R, 1>(x, ldx, packed + c * groups * kGroupBytes, scale + c * groups, groups, values, out + c, ldo);
}

// rows [count, k] (lane order) times the decoded tile [cols, k] -> out rows (stride ldo), 4 rows at a time.
// Each sum runs over k in chunks of kChunk (4 rows' and the tile's chunks: 20 KB, in L1), its lane sums in
// `lanes` between chunks: the order of every sum is one pass's over k.
constexpr int64_t kChunk = 256;

template <int R>
void MultiplyRows(const float* x, int64_t k, const float* tile, int cols, float* lanes, float* out, int64_t ldo) {
  std::memset(lanes, 0, sizeof(float) * R * cols * kLanes);
  for (int64_t k0 = 0; k0 < k; k0 += kChunk)
    DotRows<R>(x + k0, k, tile + k0, k, std::min(kChunk, k - k0), cols, lanes);
  StoreRows<R>(lanes, cols, out, ldo);
}

void MultiplyTile(const float* rows, int64_t count, const float* tile, int cols, int64_t k, float* out,
                  int64_t ldo, Floats& lanes) {
  lanes.resize(static_cast<size_t>(4 * kTileN * kLanes));
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) MultiplyRows<4>(rows + r * k, k, tile, cols, lanes.data(), out + r * ldo, ldo);
  const float* x = rows + r * k;
  float* o = out + r * ldo;
  switch (count - r) {
    case 3: MultiplyRows<3>(x, k, tile, cols, lanes.data(), o, ldo); break;
    case 2: MultiplyRows<2>(x, k, tile, cols, lanes.data(), o, ldo); break;
    case 1: MultiplyRows<1>(x, k, tile, cols, lanes.data(), o, ldo); break;
    default: break;
  }
}

ffi::Error GroupedMatmulImpl(ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::S32> group_sizes,
                             ffi::Buffer<ffi::U8> blocks, ffi::Buffer<ffi::U8> scales,
                             ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> out) {
  const auto rd = rows.dimensions(), bd = blocks.dimensions(), sd = scales.dimensions();
  if (rd.size() != 2 || bd.size() != 4 || sd.size() != 3 || bd[3] != kGroupBytes)
    return ffi::Error::InvalidArgument("mxfp4 grouped matmul: rows must be [M, K], blocks [E, N, K/32, 16], "
                                       "scales [E, N, K/32]");
  const int64_t m = rd[0], k = rd[1], experts = bd[0], n = bd[1], groups = bd[2];
  if (groups * kGroup != k || sd[0] != experts || sd[1] != n || sd[2] != groups)
    return ffi::Error::InvalidArgument("mxfp4 grouped matmul: rows [" + std::to_string(m) + ", " +
                                       std::to_string(k) + "] do not match blocks [" + std::to_string(experts) +
                                       ", " + std::to_string(n) + ", " + std::to_string(groups) + ", 16]");
  if (group_sizes.element_count() != static_cast<size_t>(experts) || table.element_count() != 256 * 16)
    return ffi::Error::InvalidArgument("mxfp4 grouped matmul: group_sizes must be [E], table [256, 16]");

  const float* x = rows.typed_data();
  const int32_t* sizes = group_sizes.typed_data();
  const uint8_t* packed = blocks.typed_data();
  const uint8_t* scale = scales.typed_data();
  const float* values = table.typed_data();
  float* y = out->typed_data();

  std::vector<int64_t> start(experts + 1, 0);
  for (int64_t e = 0; e < experts; ++e) {
    if (sizes[e] < 0) return ffi::Error::InvalidArgument("mxfp4 grouped matmul: negative group size");
    start[e + 1] = start[e] + sizes[e];
  }
  if (start[experts] > m) return ffi::Error::InvalidArgument("mxfp4 grouped matmul: group sizes exceed the rows");
  const int64_t used = start[experts];
  std::memset(y + used * n, 0, sizeof(float) * (m - used) * n);

  // The rows in lane order (see the top of the file).
  Floats lanes(static_cast<size_t>(used * k));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < used; ++r)
    for (int64_t g = 0; g < groups; ++g)
      for (int p = 0; p < kGroup; ++p)
        lanes[r * k + g * kGroup + p] = x[r * k + g * kGroup + LaneElement(p)];

  // One task per (expert with rows, tile of output rows).
  const int64_t tiles = (n + kTileN - 1) / kTileN;
  std::vector<int64_t> task_expert;
  for (int64_t e = 0; e < experts; ++e)
    if (sizes[e] > 0) task_expert.push_back(e);
  const int64_t tasks = static_cast<int64_t>(task_expert.size()) * tiles;

  const unsigned int float_mode = CurrentFloatMode();
#pragma omp parallel
  {
    const ScopedFloatMode caller_mode(float_mode);
    Floats tile(static_cast<size_t>(kTileN * k)), sums;
#pragma omp for schedule(dynamic, 4)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t e = task_expert[t / tiles], n0 = (t % tiles) * kTileN;
      const int cols = static_cast<int>(std::min<int64_t>(kTileN, n - n0));
      const int64_t first = (e * n + n0) * groups;  // (output row n0, group 0) of expert e
      const float* x_e = lanes.data() + start[e] * k;
      float* y_e = y + start[e] * n + n0;
      if (sizes[e] <= kFusedMaxRows) {
        const uint8_t* p = packed + first * kGroupBytes;
        switch (sizes[e]) {
          case 1: FusedRows<1>(x_e, k, p, scale + first, groups, values, cols, y_e, n); break;
          case 2: FusedRows<2>(x_e, k, p, scale + first, groups, values, cols, y_e, n); break;
          case 3: FusedRows<3>(x_e, k, p, scale + first, groups, values, cols, y_e, n); break;
          default: FusedRows<4>(x_e, k, p, scale + first, groups, values, cols, y_e, n); break;
        }
        continue;
      }
      for (int c = 0; c < cols; ++c) {
        const int64_t row = (e * n + n0 + c) * groups;
        for (int64_t g = 0; g < groups; ++g)
          DecodeGroup(packed + (row + g) * kGroupBytes, values + 16 * scale[row + g], tile.data() + c * k + g * kGroup);
      }
      MultiplyTile(x_e, sizes[e], tile.data(), cols, k, y_e, n, sums);
    }
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ bf16 weights x float32 rows
//
//   out[m, n] = sum_k rows[m, k] * W[k, n]     W bfloat16 [K, N] ("in-out", as the projections and the
//                                               lm_head are stored), widened to float32 in registers
//
// XLA:CPU widens a bfloat16 weight to a float32 copy in memory before every product (read 2 bytes, write
// and read 4 more per weight); here each weight is read once, as stored. Widening is exact, so the
// products are XLA's float32 products; only the summation order differs.

// Few rows (decode): each task owns a block of kBlockN output columns and streams W's rows through it,
// kBlockN contiguous weights (2 KB) per row, into float32 accumulators that stay in L1. Narrow strided
// reads (a few dozen bytes per row of a 400 KB-wide lm_head) would cost a TLB miss each.
constexpr int kBlockN = 1024;
constexpr int kPrefetchRows = 4;  // rows of W ahead that are fetched while one is multiplied
constexpr int kMaxRows = 4;  // rows per pass over W (accumulators: kMaxRows x kBlockN floats = 16 KB)

inline float Widen(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <int R>
void Bf16Block(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t k, int cols, float* out,
               int64_t ldo) {
  alignas(32) float acc[R][kBlockN];
  for (int r = 0; r < R; ++r) std::memset(acc[r], 0, sizeof(float) * cols);
  const int vec = cols - cols % 8;
  for (int64_t i = 0; i < k; ++i) {
    const uint16_t* row = w + i * ldw;
#ifdef HMOE_AVX2
    __m256 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_broadcast_ss(x + r * ldx + i);
    // The hardware prefetcher stops at page boundaries, and every row of W starts a new stream.
    if (i + kPrefetchRows < k)
      for (int c = 0; c < cols; c += 32) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * ldw + c),
                                                      _MM_HINT_T0);
    for (int c = 0; c < vec; c += 8) {
      const __m256 wv = _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c))), 16));
      for (int r = 0; r < R; ++r)
        _mm256_store_ps(acc[r] + c, _mm256_fmadd_ps(xv[r], wv, _mm256_load_ps(acc[r] + c)));
    }
#else
    for (int c = 0; c < vec; ++c)
      for (int r = 0; r < R; ++r) acc[r][c] += x[r * ldx + i] * Widen(row[c]);
#endif
    for (int c = vec; c < cols; ++c)
      for (int r = 0; r < R; ++r) acc[r][c] += x[r * ldx + i] * Widen(row[c]);
  }
  for (int r = 0; r < R; ++r) std::memcpy(out + r * ldo, acc[r], sizeof(float) * cols);
}

ffi::Error Bf16MatmulImpl(ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::BF16> weights, ffi::ResultBuffer<ffi::F32> out) {
  const auto rd = rows.dimensions(), wd = weights.dimensions();
  if (rd.size() != 2 || wd.size() != 2 || rd[1] != wd[0])
    return ffi::Error::InvalidArgument("bf16 matmul: rows must be [M, K] and weights [K, N]");
  const int64_t m = rd[0], k = rd[1], n = wd[1];
  const float* x = rows.typed_data();
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weights.untyped_data());
  float* y = out->typed_data();
  const int64_t blocks = (n + kBlockN - 1) / kBlockN;
  const unsigned int float_mode = CurrentFloatMode();
#pragma omp parallel
  {
    const ScopedFloatMode caller_mode(float_mode);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * kBlockN;
      const int cols = static_cast<int>(std::min<int64_t>(kBlockN, n - n0));
      for (int64_t r = 0; r < m; r += kMaxRows) {
        const float* xr = x + r * k;
        float* yr = y + r * n + n0;
        switch (std::min<int64_t>(kMaxRows, m - r)) {
          case 4: Bf16Block<4>(xr, k, w + n0, n, k, cols, yr, n); break;
          case 3: Bf16Block<3>(xr, k, w + n0, n, k, cols, yr, n); break;
          case 2: Bf16Block<2>(xr, k, w + n0, n, k, cols, yr, n); break;
          default: Bf16Block<1>(xr, k, w + n0, n, k, cols, yr, n); break;
        }
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HmoeBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HmoeMxfp4GroupedMatmul, GroupedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Lets the loader check it runs the build it expects.
extern "C" int HmoeMxfp4KernelVersion() { return 2; }

// Which body this build compiled (2: AVX-512, 1: AVX2, 0: scalar): the tests build all three on one host.
extern "C" int HmoeKernelBody() {
#if defined(HMOE_AVX512)
  return 2;
#elif defined(HMOE_AVX2)
  return 1;
#else
  return 0;
#endif
}
