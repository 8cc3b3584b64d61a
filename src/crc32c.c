/* CRC-32C: SSE4.2 hardware path with three interleaved streams, and a
 * slicing-by-8 software path.
 *
 * Hardware path: the crc32 instruction has a latency of 3 cycles and a
 * throughput of 1 per cycle, so one dependency chain runs at a third of the
 * possible speed. Long buffers are split into three adjacent blocks whose
 * CRCs are computed in parallel and then combined: the CRC of A || B is
 * shift(crc(A), |B|) ^ crc(B), where shift() appends |B| zero bytes, a linear
 * map over GF(2) precomputed as four 256-entry tables per block length. This
 * is the scheme of Mark Adler's crc32c.c; the code here is our own.
 */
#include "crc32c.h"

#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define OC_HAVE_X86 1
#endif

#define POLY 0x82F63B78u

/* Block lengths of the three-way interleave; powers of two (see zeros_op). */
#define LONG_BLOCK 8192
#define SHORT_BLOCK 256

static uint32_t sw_table[8][256];
static uint32_t long_shift[4][256];
static uint32_t short_shift[4][256];
static int use_hw;

/* ---- GF(2) matrices: 32 columns of uint32, column n = image of bit n ---- */

static uint32_t gf2_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1)
            sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void gf2_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_times(mat, mat[n]);
}

/* The operator that appends `len` zero bytes to a raw (non-inverted) CRC
 * register. `len` must be a power of two >= 1. */
static void zeros_op(uint32_t *out, size_t len)
{
    uint32_t odd[32], even[32];
    uint32_t row = 1;

    odd[0] = POLY;                  /* one zero bit */
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    gf2_square(even, odd);          /* two zero bits */
    gf2_square(odd, even);          /* four zero bits */
    /* Each squaring doubles the number of zero bits: odd holds 4 bits, so
     * the next square holds 8 bits = one byte. */
    for (;;) {
        gf2_square(even, odd);      /* even: len_done bytes */
        len >>= 1;
        if (len == 0) {
            memcpy(out, even, sizeof(even));
            return;
        }
        gf2_square(odd, even);
        len >>= 1;
        if (len == 0) {
            memcpy(out, odd, sizeof(odd));
            return;
        }
    }
}

static void make_shift_table(uint32_t table[4][256], size_t len)
{
    uint32_t op[32];
    zeros_op(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        table[0][n] = gf2_times(op, n);
        table[1][n] = gf2_times(op, n << 8);
        table[2][n] = gf2_times(op, n << 16);
        table[3][n] = gf2_times(op, n << 24);
    }
}

static inline uint32_t shift_crc(const uint32_t table[4][256], uint32_t crc)
{
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^
           table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
}

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));       /* unaligned-safe; compiles to one mov */
    return v;
}

/* ---- software: slicing-by-8 (little-endian word loads) ---- */

uint32_t crc32c_update_sw(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    crc = ~crc;
    while (len && ((uintptr_t)p & 7)) {
        crc = sw_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (len >= 8) {
        uint64_t w = load64(p) ^ crc;
        crc = sw_table[7][w & 0xff] ^ sw_table[6][(w >> 8) & 0xff] ^
              sw_table[5][(w >> 16) & 0xff] ^ sw_table[4][(w >> 24) & 0xff] ^
              sw_table[3][(w >> 32) & 0xff] ^ sw_table[2][(w >> 40) & 0xff] ^
              sw_table[1][(w >> 48) & 0xff] ^ sw_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
#endif
    while (len--)
        crc = sw_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* ---- hardware: SSE4.2 ---- */

#ifdef OC_HAVE_X86
__attribute__((target("sse4.2")))
static uint32_t crc32c_update_hw(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    uint64_t c0 = (uint32_t)~crc, c1, c2;

    while (len && ((uintptr_t)p & 7)) {
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
        len--;
    }
    while (len >= 3 * LONG_BLOCK) {
        const unsigned char *end = p + LONG_BLOCK;
        c1 = c2 = 0;
        do {    /* unrolled twice: LONG_BLOCK is a multiple of 16 */
            c0 = _mm_crc32_u64(c0, load64(p));
            c1 = _mm_crc32_u64(c1, load64(p + LONG_BLOCK));
            c2 = _mm_crc32_u64(c2, load64(p + 2 * LONG_BLOCK));
            c0 = _mm_crc32_u64(c0, load64(p + 8));
            c1 = _mm_crc32_u64(c1, load64(p + 8 + LONG_BLOCK));
            c2 = _mm_crc32_u64(c2, load64(p + 8 + 2 * LONG_BLOCK));
            p += 16;
        } while (p < end);
        c0 = shift_crc(long_shift, (uint32_t)c0) ^ c1;
        c0 = shift_crc(long_shift, (uint32_t)c0) ^ c2;
        p += 2 * LONG_BLOCK;
        len -= 3 * LONG_BLOCK;
    }
    while (len >= 3 * SHORT_BLOCK) {
        const unsigned char *end = p + SHORT_BLOCK;
        c1 = c2 = 0;
        do {
            c0 = _mm_crc32_u64(c0, load64(p));
            c1 = _mm_crc32_u64(c1, load64(p + SHORT_BLOCK));
            c2 = _mm_crc32_u64(c2, load64(p + 2 * SHORT_BLOCK));
            p += 8;
        } while (p < end);
        c0 = shift_crc(short_shift, (uint32_t)c0) ^ c1;
        c0 = shift_crc(short_shift, (uint32_t)c0) ^ c2;
        p += 2 * SHORT_BLOCK;
        len -= 3 * SHORT_BLOCK;
    }
    while (len >= 8) {
        c0 = _mm_crc32_u64(c0, load64(p));
        p += 8;
        len -= 8;
    }
    while (len--)
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
    return ~(uint32_t)c0;
}
#endif

void crc32c_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ POLY : crc >> 1;
        sw_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = sw_table[0][n];
        for (int k = 1; k < 8; k++) {
            crc = sw_table[0][crc & 0xff] ^ (crc >> 8);
            sw_table[k][n] = crc;
        }
    }
    make_shift_table(long_shift, LONG_BLOCK);
    make_shift_table(short_shift, SHORT_BLOCK);
#ifdef OC_HAVE_X86
    __builtin_cpu_init();
    use_hw = __builtin_cpu_supports("sse4.2");
#endif
}

uint32_t crc32c_update(uint32_t crc, const void *buf, size_t len)
{
#ifdef OC_HAVE_X86
    if (use_hw)
        return crc32c_update_hw(crc, buf, len);
#endif
    return crc32c_update_sw(crc, buf, len);
}

const char *crc32c_backend(void)
{
    return use_hw ? "sse4.2" : "software";
}
