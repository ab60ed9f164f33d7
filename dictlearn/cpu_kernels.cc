// CPU kernels for dictlearn.sparse, as XLA FFI custom calls (see cpu_kernels.py).
//
// SelectActive: row-wise compaction of JumpReLU-active latents. XLA:CPU's only selection
// primitive, TopK, costs ~3 ns per element whatever k is; on 2 cores it added ~18% to a
// block scan whose matmul it follows. Compaction needs one compare per element and a
// store per active latent, which is what this does.
//
//   pre   (n, B) float32   pre-activations of one block of the width
//   thr   (B,)   float32   thresholds of that block
//   vals  (n, kb) float32  the first kb values with pre > thr, in column order, then 0
//   cols  (n, kb) int32    their columns within the block, then 0
//   count (n,)   int32     how many columns have pre > thr (may exceed kb)

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

// -DDICTLEARN_PORTABLE builds only the portable loops (tests use it to check them on x86).
#if (defined(__x86_64__) || defined(__i386__)) && !defined(DICTLEARN_PORTABLE)
#include <immintrin.h>
#define DICTLEARN_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error SelectActive(ffi::Buffer<ffi::F32> pre, ffi::Buffer<ffi::F32> thr,
                               ffi::ResultBuffer<ffi::F32> vals,
                               ffi::ResultBuffer<ffi::S32> cols,
                               ffi::ResultBuffer<ffi::S32> count) {
  auto dims = pre.dimensions();
  if (dims.size() != 2 || thr.dimensions().size() != 1 || thr.dimensions()[0] != dims[1] ||
      vals->dimensions().size() != 2 || vals->dimensions()[0] != dims[0]) {
    return ffi::Error::InvalidArgument("select_active: expects pre (n, B), thr (B,), vals (n, kb)");
  }
  const int64_t n = dims[0], b = dims[1], kb = vals->dimensions()[1];
  const float* p = pre.typed_data();
  const float* t = thr.typed_data();
  float* v = vals->typed_data();
  int32_t* c = cols->typed_data();
  int32_t* cnt = count->typed_data();
  constexpr int64_t kChunk = 16;
  for (int64_t r = 0; r < n; ++r) {
    const float* row = p + r * b;
    float* vr = v + r * kb;
    int32_t* cr = c + r * kb;
    int64_t m = 0;
    int64_t j = 0;
    // Actives are rare: test a chunk with a branch-free (vectorisable) reduction first.
    for (; j + kChunk <= b; j += kChunk) {
      int any = 0;
      for (int64_t q = 0; q < kChunk; ++q) any |= row[j + q] > t[j + q];
      if (!any) continue;
      for (int64_t q = j; q < j + kChunk; ++q) {
        if (row[q] > t[q]) {
          if (m < kb) { vr[m] = row[q]; cr[m] = static_cast<int32_t>(q); }
          ++m;
        }
      }
    }
    for (; j < b; ++j) {
      if (row[j] > t[j]) {
        if (m < kb) { vr[m] = row[j]; cr[m] = static_cast<int32_t>(j); }
        ++m;
      }
    }
    for (int64_t s = m; s < kb; ++s) { vr[s] = 0.0f; cr[s] = 0; }
    cnt[r] = static_cast<int32_t>(m);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnSelectActive, SelectActive,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Widening bfloat16 weights. XLA:CPU turns a bf16 parameter into a float32 copy of the
// whole array before any loop that reads it (and this CPU has no bf16 arithmetic), but
// leaves operands of custom calls alone: these read only the slice a block needs and
// widen it (bf16 is the top half of a float32) into a block-sized float32 buffer.
//
//   WidenColumns  w (R, C) bf16, start () int32 -> out (R, B) f32 = w[:, s:s+B]
//   WidenRows     w (R, C) bf16, start () int32 -> out (B, C) f32 = w[s:s+B, :]
//   GatherRows    w (R, C) bf16, idx (m,) int32 -> out (m, C) f32 = w[idx, :]
// Starts are clamped to [0, extent - B] and indices to [0, R - 1] (jnp's "clip").

// A bf16 value is the top half of a float32.
static inline float Bf16(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline void Widen(const uint16_t* src, float* dst, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = Bf16(src[j]);
}

static const uint16_t* Bits(ffi::Buffer<ffi::BF16>& w) {
  return reinterpret_cast<const uint16_t*>(w.typed_data());
}

static ffi::Error WidenColumns(ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> start,
                               ffi::ResultBuffer<ffi::F32> out) {
  const int64_t r = w.dimensions()[0], c = w.dimensions()[1], b = out->dimensions()[1];
  if (out->dimensions()[0] != r || b > c) {
    return ffi::Error::InvalidArgument("widen_columns: out must be (R, B) with B <= C");
  }
  const int64_t s = std::clamp<int64_t>(*start.typed_data(), 0, c - b);
  float* dst = out->typed_data();
  for (int64_t i = 0; i < r; ++i) Widen(Bits(w) + i * c + s, dst + i * b, b);
  return ffi::Error::Success();
}

static ffi::Error WidenRows(ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> start,
                            ffi::ResultBuffer<ffi::F32> out) {
  const int64_t r = w.dimensions()[0], c = w.dimensions()[1], b = out->dimensions()[0];
  if (out->dimensions()[1] != c || b > r) {
    return ffi::Error::InvalidArgument("widen_rows: out must be (B, C) with B <= R");
  }
  const int64_t s = std::clamp<int64_t>(*start.typed_data(), 0, r - b);
  Widen(Bits(w) + s * c, out->typed_data(), b * c);
  return ffi::Error::Success();
}

static ffi::Error GatherRows(ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> idx,
                             ffi::ResultBuffer<ffi::F32> out) {
  const int64_t r = w.dimensions()[0], c = w.dimensions()[1];
  const int64_t m = idx.element_count();
  if (out->dimensions()[0] != m || out->dimensions()[1] != c || r == 0) {
    return ffi::Error::InvalidArgument("gather_rows: out must be (m, C) and R > 0");
  }
  const int32_t* ix = idx.typed_data();
  float* dst = out->typed_data();
  for (int64_t i = 0; i < m; ++i) {
    const int64_t row = std::clamp<int64_t>(ix[i], 0, r - 1);
    Widen(Bits(w) + row * c, dst + i * c, c);
  }
  return ffi::Error::Success();
}

#define DICTLEARN_WIDEN_HANDLER(symbol, fn)                                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn,                                            \
                                ffi::Ffi::Bind()                                       \
                                    .Arg<ffi::Buffer<ffi::BF16>>()                     \
                                    .Arg<ffi::Buffer<ffi::S32>>()                      \
                                    .Ret<ffi::Buffer<ffi::F32>>());

DICTLEARN_WIDEN_HANDLER(DictlearnWidenColumns, WidenColumns)
DICTLEARN_WIDEN_HANDLER(DictlearnWidenRows, WidenRows)
DICTLEARN_WIDEN_HANDLER(DictlearnGatherRows, GatherRows)

// MatmulBf16: x (n, R) f32 @ w[:, s:s+B] (R, C) bf16 -> out (n, B) f32, s clamped to
// [0, C - B]; for few rows n (the generation loop's one token). Widening a block and
// handing it to XLA's dot writes and rereads a float32 copy; at one token the product is
// bound by reading w, so this reads each bf16 weight once, widens it in registers and
// accumulates in float32: half the bytes of a float32 matvec.
//
// Work: the B columns are cut into tiles whose (n, tile) float32 accumulator stays in
// L2 (at most 256 KiB); a tile streams all R rows, 8 at a time, each row segment
// contiguous (long segments keep the hardware prefetcher busy: 16k-64k-column tiles ran
// ~1.5x faster than 1k ones). Tiles are claimed from an atomic counter by the calling thread and
// by tasks on XLA's intra-op pool; the caller then waits only for tiles another thread
// has already claimed and is running, so a busy or absent pool cannot deadlock it.

namespace {

constexpr int64_t kAccFloats = 65536;  // Per tile: n * tile float32 accumulators.
constexpr int kRowBlock = 8;

struct MatmulArgs {
  const float* x;
  const uint16_t* w;
  float* out;
  int64_t n, r, c, s, b, tile;
};

// Portable tile: columns [t0, t0 + len) of the block, natural accumulator layout.
void TilePortable(const MatmulArgs& a, int64_t t0, int64_t len, float* acc) {
  std::fill(acc, acc + a.n * len, 0.0f);
  for (int64_t i = 0; i < a.r; ++i) {
    const uint16_t* wr = a.w + i * a.c + a.s + t0;
    for (int64_t q = 0; q < a.n; ++q) {
      const float xq = a.x[q * a.r + i];
      float* ac = acc + q * len;
      for (int64_t j = 0; j < len; ++j) ac[j] += xq * Bf16(wr[j]);
    }
  }
  for (int64_t q = 0; q < a.n; ++q) std::memcpy(a.out + q * a.b + t0, acc + q * len, 4 * len);
}

#ifdef DICTLEARN_X86
// Adds rows [i, i + rb) of the tile (rb <= kRowBlock) to the accumulator. 16 bf16 weights
// are one 256-bit load; shifting each 32-bit lane left by 16 gives the even columns as
// float32, masking off the low half gives the odd ones, so the accumulator holds each 16
// columns as [8 even | 8 odd] (TileAvx2 interleaves them on the way out).
__attribute__((target("avx2,fma"))) void RowsAvx2(const MatmulArgs& a, int64_t t0,
                                                   int64_t len, float* acc, int64_t i,
                                                   int rb) {
  const int64_t vec = len & ~int64_t{15};
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const uint16_t* wr = a.w + i * a.c + a.s + t0;
  for (int64_t q = 0; q < a.n; ++q) {
    __m256 xs[kRowBlock];
    for (int h = 0; h < rb; ++h) xs[h] = _mm256_set1_ps(a.x[q * a.r + i + h]);
    float* ac = acc + q * len;
    for (int64_t j = 0; j < vec; j += 16) {
      __m256 e = _mm256_loadu_ps(ac + j), o = _mm256_loadu_ps(ac + j + 8);
      for (int h = 0; h < rb; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + h * a.c + j));
        e = _mm256_fmadd_ps(xs[h], _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), e);
        o = _mm256_fmadd_ps(xs[h], _mm256_castsi256_ps(_mm256_and_si256(v, odd)), o);
      }
      _mm256_storeu_ps(ac + j, e);
      _mm256_storeu_ps(ac + j + 8, o);
    }
    for (int64_t j = vec; j < len; ++j) {  // Tail columns, natural layout.
      float s = ac[j];
      for (int h = 0; h < rb; ++h) s += a.x[q * a.r + i + h] * Bf16(wr[h * a.c + j]);
      ac[j] = s;
    }
  }
}

void TileAvx2(const MatmulArgs& a, int64_t t0, int64_t len, float* acc) {
  std::fill(acc, acc + a.n * len, 0.0f);
  int64_t i = 0;
  for (; i + kRowBlock <= a.r; i += kRowBlock) RowsAvx2(a, t0, len, acc, i, kRowBlock);
  if (i < a.r) RowsAvx2(a, t0, len, acc, i, static_cast<int>(a.r - i));
  const int64_t vec = len & ~int64_t{15};
  for (int64_t q = 0; q < a.n; ++q) {
    const float* ac = acc + q * len;
    float* o = a.out + q * a.b + t0;
    for (int64_t j = 0; j < vec; j += 16) {
      for (int h = 0; h < 8; ++h) {
        o[j + 2 * h] = ac[j + h];
        o[j + 2 * h + 1] = ac[j + 8 + h];
      }
    }
    std::memcpy(o + vec, ac + vec, 4 * (len - vec));
  }
}

bool HasAvx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

void RunTile(const MatmulArgs& a, int64_t t, float* acc) {
  const int64_t t0 = t * a.tile, len = std::min(a.tile, a.b - t0);
#ifdef DICTLEARN_X86
  if (HasAvx2()) return TileAvx2(a, t0, len, acc);
#endif
  TilePortable(a, t0, len, acc);
}

struct TileQueue {
  MatmulArgs args;
  int64_t tiles;
  std::atomic<int64_t> next{0}, done{0};

  // Runs tiles until none is left to claim.
  void Drain() {
    std::unique_ptr<float[]> acc;
    for (int64_t t; (t = next.fetch_add(1)) < tiles;) {
      if (!acc) acc.reset(new float[args.n * args.tile]);
      RunTile(args, t, acc.get());
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

}  // namespace

static ffi::Error MatmulBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> start,
                             ffi::ResultBuffer<ffi::F32> out) {
  const int64_t n = x.dimensions()[0], r = w.dimensions()[0], c = w.dimensions()[1];
  const int64_t b = out->dimensions()[1];
  if (x.dimensions()[1] != r || out->dimensions()[0] != n || b > c) {
    return ffi::Error::InvalidArgument(
        "matmul_bf16: expects x (n, R), w (R, C) and out (n, B) with B <= C");
  }
  if (n == 0 || b == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Tiles: as wide as the accumulator budget allows, a multiple of 16 columns, and a
  // multiple of `threads` in number so every thread gets the same share.
  int64_t tile = std::max<int64_t>(16, kAccFloats / n / 16 * 16);
  int64_t tiles = (b + tile - 1) / tile;
  tiles = (tiles + threads - 1) / threads * threads;
  tile = ((b + tiles - 1) / tiles + 15) / 16 * 16;
  tiles = (b + tile - 1) / tile;

  auto q = std::make_shared<TileQueue>();
  q->args = {x.typed_data(), reinterpret_cast<const uint16_t*>(w.typed_data()),
             out->typed_data(), n, r, c,
             std::clamp<int64_t>(*start.typed_data(), 0, c - b), b, tile};
  q->tiles = tiles;
  for (int64_t t = 1; t < std::min(threads, tiles); ++t) pool.Schedule([q] { q->Drain(); });
  q->Drain();
  while (q->done.load(std::memory_order_acquire) < tiles) std::this_thread::yield();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnMatmulBf16, MatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
