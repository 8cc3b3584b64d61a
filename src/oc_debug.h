/* Live-object counters for debug builds (OBJCACHE_DEBUG).
 *
 * Every extension object that owns a resource bumps a counter on creation
 * and drops it on release; tests assert all counters are back to zero after
 * each test. In release builds the macros compile to nothing and
 * oc_debug_enabled() is 0.
 *
 * Each extension module includes this header and so has its own static
 * copy of the counters; each exports debug_counters() -> dict | None, and
 * objcache._ext.live_objects() sums them.
 */
#ifndef OC_DEBUG_H
#define OC_DEBUG_H

enum oc_counter {
    OC_PAGE_VIEWS = 0,
    OC_ARENAS,
    OC_LOG_APPENDS,
    OC_LOG_WRITERS,
    OC_NCOUNTERS
};

#ifdef OBJCACHE_DEBUG
static long oc_debug_counters[OC_NCOUNTERS];
#define OC_DEBUG_INC(c) (oc_debug_counters[(c)]++)
#define OC_DEBUG_DEC(c) (oc_debug_counters[(c)]--)
static inline int oc_debug_enabled(void) { return 1; }
static inline long oc_debug_get(int c) { return oc_debug_counters[c]; }
#else
#define OC_DEBUG_INC(c) ((void)0)
#define OC_DEBUG_DEC(c) ((void)0)
static inline int oc_debug_enabled(void) { return 0; }
static inline long oc_debug_get(int c) { (void)c; return 0; }
#endif

#endif
