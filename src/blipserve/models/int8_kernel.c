// blipserve's int8 linear for CPUs with AVX-512 VNNI (compiled on first use by int8_kernel.py).
//
// out = dequantize(quantize(x) @ W^T) + bias, every row of x quantized on its own (one
// scale per row, symmetric, codes stored as uint8 with zero point 128), W int8 with one
// scale per output.  Sums are exact int32s, and everything after them is per element, so a
// row's output is bit-identical alone or in any batch, on any number of threads.
//
// Why not fbgemm (torch's quantized::linear_dynamic): decoding runs ~75 of these per token on
// one to eight rows, where fbgemm reads the weights at about half the memory bandwidth and
// needs extra passes to make its one scale per call batch-invariant (optimize.py).  Here the
// weights are packed so that one 64-byte load feeds one VPDPBUSD for each row: 16 outputs x
// 4 inputs, and the weights stream through the core once whatever the number of rows.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 16  // outputs per block: one zmm of int32 sums
#define ROWS 8    // rows sharing each weight load (8 accumulators)

// Rows of x (m x k, row stride ldx) -> codes q (m x kp, uint8, zero point 128; columns k..kp
// hold 128, i.e. zero) and scales: x ~= scale * (q - 128), q in [1, 255].
static void quantize_rows(const float* x, int64_t m, int64_t k, int64_t kp, int64_t ldx,
                          uint8_t* q, float* scale) {
    for (int64_t i = 0; i < m; i++) {
        const float* row = x + i * ldx;
        __m512 top = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= k; j += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(row + j)));
        float amax = _mm512_reduce_max_ps(top);
        for (; j < k; j++) amax = fmaxf(amax, fabsf(row[j]));
        float inv = amax > 0.f ? 127.f / amax : 0.f;  // an all-zero row: codes 128, output = bias
        scale[i] = amax / 127.f;
        __m512 vinv = _mm512_set1_ps(inv);
        __m512i zero = _mm512_set1_epi32(128);
        uint8_t* out = q + i * kp;
        for (j = 0; j + 16 <= k; j += 16) {
            // round to nearest even (MXCSR's default), +128: 1..255, which VPMOVDB keeps
            __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + j), vinv)), zero);
            _mm_storeu_si128((__m128i*)(out + j), _mm512_cvtepi32_epi8(c));
        }
        for (; j < k; j++) out[j] = (uint8_t)(lrintf(row[j] * inv) + 128);
        for (; j < kp; j++) out[j] = 128;
    }
}

// R rows (1..ROWS, a constant after inlining) against one block of 16 outputs.
static inline __attribute__((always_inline)) void rows_block(
    const uint8_t* q, int64_t kp, int R, const int8_t* w, const int32_t* zsum, const float* wscale,
    const float* bias, const float* xscale, float* out, int64_t ldo, __mmask16 mask) {
    __m512i acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
    for (int64_t g = 0; g < kp / 4; g++) {
        __m512i wv = _mm512_loadu_si512((const void*)(w + g * 64));  // [16 outputs][4 inputs]
        for (int r = 0; r < R; r++) {
            int32_t a;  // this row's 4 codes, broadcast to the 16 outputs
            __builtin_memcpy(&a, q + r * kp + 4 * g, 4);
            acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(a), wv);
        }
    }
    __m512i zs = _mm512_loadu_si512((const void*)zsum);  // 128 * sum of each output's weights
    __m512 ws = _mm512_loadu_ps(wscale);
    __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) {
        __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], zs));
        __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(xscale[r]));
        _mm512_mask_storeu_ps(out + r * ldo, mask, _mm512_fmadd_ps(f, s, b));
    }
}

// x: m x k floats, row stride ldx.  w: (np / 16) blocks, each (kp / 4) groups of
// [16 outputs][4 inputs] int8 (zeros past n outputs and k inputs).  zsum (int32), wscale
// and bias (float; bias may be NULL): np each.  out: m x n floats.  q, xscale: scratch of
// m * kp bytes and m floats.  kp % 4 == 0, kp >= k; np % 16 == 0, np >= n.
void blipserve_int8_linear(const float* x, int64_t m, int64_t k, int64_t kp, int64_t ldx,
                           const int8_t* w, const int32_t* zsum, const float* wscale,
                           const float* bias, int64_t n, int64_t np, float* out, uint8_t* q,
                           float* xscale) {
    quantize_rows(x, m, k, kp, ldx, q, xscale);
    int64_t blocks = np / BLOCK;
    // Threads split the outputs (torch's OpenMP runtime and its per-thread count); small
    // layers stay on the calling thread, where waking a team would cost more than it saves.
#pragma omp parallel for schedule(static) if (blocks * kp * (m < ROWS ? m : ROWS) >= 65536)
    for (int64_t nb = 0; nb < blocks; nb++) {
        int64_t left = n - nb * BLOCK;
        __mmask16 mask = left >= BLOCK ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        const int8_t* wb = w + nb * BLOCK * kp;
        const float* bb = bias ? bias + nb * BLOCK : 0;
        const int32_t* zs = zsum + nb * BLOCK;
        const float* ws = wscale + nb * BLOCK;
        // The block's weights (16 x kp bytes) stay in L1/L2 across the row groups.
        for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
            int64_t R = m - r0 < ROWS ? m - r0 : ROWS;
            const uint8_t* qr = q + r0 * kp;
            float* o = out + r0 * n + nb * BLOCK;
            const float* xs = xscale + r0;
            switch (R) {
                case 1: rows_block(qr, kp, 1, wb, zs, ws, bb, xs, o, n, mask); break;
                case 2: rows_block(qr, kp, 2, wb, zs, ws, bb, xs, o, n, mask); break;
                case 3: rows_block(qr, kp, 3, wb, zs, ws, bb, xs, o, n, mask); break;
                case 4: rows_block(qr, kp, 4, wb, zs, ws, bb, xs, o, n, mask); break;
                case 5: rows_block(qr, kp, 5, wb, zs, ws, bb, xs, o, n, mask); break;
                case 6: rows_block(qr, kp, 6, wb, zs, ws, bb, xs, o, n, mask); break;
                case 7: rows_block(qr, kp, 7, wb, zs, ws, bb, xs, o, n, mask); break;
                default: rows_block(qr, kp, ROWS, wb, zs, ws, bb, xs, o, n, mask); break;
            }
        }
    }
}
