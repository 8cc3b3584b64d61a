/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78).
 *
 * crc32c_update(crc, buf, len) extends a finished CRC value: the result of
 * crc32c_update(crc32c_update(0, a), b) equals the CRC of a || b, which is
 * the convention of RFC 3720 (iSCSI) and of the PyPI crc32c package.
 * The check value of "123456789" is 0xE3069283.
 *
 * crc32c_init() must run once before any other call (module import does it);
 * afterwards every function is thread-safe and may run without the GIL.
 */
#ifndef OC_CRC32C_H
#define OC_CRC32C_H

#include <stddef.h>
#include <stdint.h>

void crc32c_init(void);
uint32_t crc32c_update(uint32_t crc, const void *buf, size_t len);
/* The portable table-driven version, whatever the CPU offers (for tests). */
uint32_t crc32c_update_sw(uint32_t crc, const void *buf, size_t len);
/* "sse4.2" when the hardware instruction is used, else "software". */
const char *crc32c_backend(void);

#endif
