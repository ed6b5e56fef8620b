/* payload_cross.h - compares src/payload.c with the jansson reference on one input. */
#ifndef EVD_PAYLOAD_CROSS_H
#define EVD_PAYLOAD_CROSS_H

#include <stddef.h>
#include <stdint.h>

/* Parses data with both parsers. Returns 0 when they agree (status and every extracted value),
 * else -1 with the first difference in why. */
int payload_cross_check(const uint8_t *data, size_t size, char *why, size_t whylen);

#endif
