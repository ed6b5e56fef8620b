/* alloc_fail.h - allocation failures on demand for tests (alloc_fail.c). */
#ifndef EVD_ALLOC_FAIL_H
#define EVD_ALLOC_FAIL_H

#include <stdbool.h>
#include <stddef.h>

/* Allocation number `at` (0-based, counted from this call) fails, once. */
void evd_oom_arm(long at);
/* Stops counting; true when the armed allocation failed. */
bool evd_oom_disarm(void);
/* An allocation that never fails (the test's own bookkeeping). */
void *__real_malloc(size_t n);

#endif
