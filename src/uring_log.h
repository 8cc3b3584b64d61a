/* uring_log: the C half of the durable append-only log writer.
 *
 * This layer knows nothing about Python. It provides:
 *
 *   ul_batch  - one group-commit batch: an iovec array (pointers into buffers
 *               that the CALLER keeps alive) cut into "segments", one writev
 *               per segment, each segment at most UL_IOV_MAX iovecs and
 *               UL_SEG_MAX_BYTES bytes.
 *   ul_ring   - an io_uring with an eventfd registered on it, so a Python
 *               event loop can watch one fd for completions.
 *   ul_ring_submit / ul_ring_reap / ul_ring_wait / ul_batch_finish
 *             - the io_uring path: one submission per batch = the writev SQEs
 *               linked (IOSQE_IO_LINK) in file order, followed by one linked
 *               fsync SQE with IORING_FSYNC_DATASYNC.
 *   ul_batch_write_sync
 *             - the portable path: pwritev (looping on short writes) then
 *               fdatasync, for a worker thread (blocking; call it without
 *               the GIL).
 *
 * Lifetimes (the caller's obligations):
 *   - Every iovec added with ul_batch_add must stay valid and unchanged until
 *     the batch is complete: ul_ring_reap returned 1 or ul_ring_wait returned,
 *     and ul_batch_finish returned (it may re-read the buffers for a
 *     synchronous retry), or ul_batch_write_sync returned.
 *   - At most ONE batch per ring is in flight; a ring must not be closed while
 *     a batch is in flight (wait for it with ul_ring_wait first).
 *
 * Error convention: functions return 0 or a NEGATIVE errno, except the
 * "finish" functions which return 0 or a POSITIVE errno (the errno that the
 * failed batch reports to every append in it).
 */
#ifndef OC_URING_LOG_H
#define OC_URING_LOG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <liburing.h>

/* Max iovecs per writev (Linux UIO_MAXIOV; POSIX IOV_MAX on Linux). */
#define UL_IOV_MAX 1024u
/* Max bytes per iovec and per writev SQE. The kernel caps one read/write at
 * MAX_RW_COUNT (2 GiB - 4 KiB) and returns a short count beyond it; staying
 * well under that keeps short writes meaning "something went wrong". */
#define UL_SEG_MAX_BYTES ((uint64_t)1 << 30)
/* Submission-queue size of each writer's ring. */
#define UL_RING_ENTRIES 128u
/* Max writev SQEs in one batch (one more SQE is the fsync). A batch therefore
 * holds at most UL_MAX_SEGS * UL_SEG_MAX_BYTES bytes; appends beyond that
 * start the next batch. */
#define UL_MAX_SEGS (UL_RING_ENTRIES - 1u)

/* Result slot value before the CQE for that SQE has been reaped. */
#define UL_RES_PENDING INT64_MIN

typedef struct ul_seg {
    size_t iov_first;    /* index of the first iovec of this writev */
    unsigned iov_count;  /* number of iovecs (<= UL_IOV_MAX) */
    uint64_t rel;        /* file offset of the segment minus batch start */
    uint64_t len;        /* bytes the writev must write */
    int64_t res;         /* CQE result, UL_RES_PENDING until reaped */
} ul_seg;

typedef struct ul_batch {
    struct iovec *iov;   /* malloc'd; the pointed-to memory is the caller's */
    size_t niov, iov_cap;
    ul_seg *segs;        /* malloc'd */
    unsigned nsegs, segs_cap;
    uint64_t start;      /* file offset where the batch begins (caller) */
    uint64_t total;      /* bytes in the batch */
    int64_t fsync_res;   /* CQE result of the fsync SQE */
    unsigned outstanding;/* CQEs still expected for this batch */
    uint32_t gen;        /* submission generation, tags user_data */
    unsigned syncs;      /* fdatasync calls actually performed for it */
} ul_batch;

typedef struct ul_ring {
    struct io_uring ring;
    int efd;             /* eventfd registered with the ring, or -1 */
    int live;            /* 1 between a successful ul_ring_open and close */
    uint32_t gen;        /* last generation handed to a batch */
} ul_ring;

/* ---- batches ---------------------------------------------------------- */

void ul_batch_init(ul_batch *b);
/* Free the batch's own arrays (never the buffers the iovecs point to). */
void ul_batch_free(ul_batch *b);
/* Append `len` bytes at `p` to the batch (zero-length: no-op). Returns 0,
 * -ENOMEM, or -E2BIG if the batch would need more than UL_MAX_SEGS writevs
 * (the batch is then unchanged; start a new one). */
int ul_batch_add(ul_batch *b, const void *p, size_t len);

/* ---- io_uring path ---------------------------------------------------- */

/* Set up the ring and its eventfd. Returns 0 or -errno (-EPERM/-ENOSYS when
 * io_uring is refused, e.g. by seccomp or kernel.io_uring_disabled). On
 * failure nothing needs closing. */
int ul_ring_open(ul_ring *r);
/* Tear down the ring and close the eventfd. No batch may be in flight. */
void ul_ring_close(ul_ring *r);
/* The eventfd the event loop watches for completions. */
static inline int ul_ring_fd(const ul_ring *r) { return r->efd; }

/* Queue and submit the batch: nsegs linked writev SQEs at b->start + rel,
 * then one fsync(DATASYNC) SQE. Returns 0 (all SQEs submitted), or -errno if
 * NOTHING was submitted (the batch is not in flight; the ring should be
 * treated as broken). If only part of the chain could be submitted, the
 * rest is marked -ECANCELED and 0 is returned; ul_batch_finish then repairs
 * the batch synchronously. */
int ul_ring_submit(ul_ring *r, int fd, ul_batch *b);
/* Non-blocking: drain the eventfd and every available CQE into `b`.
 * Returns 1 when the batch has all its completions, else 0. `b` may be
 * NULL (just drain). */
int ul_ring_reap(ul_ring *r, ul_batch *b);
/* Blocking: wait until every completion of `b` is reaped. Returns 0 or
 * -errno (then the kernel may still be using the batch's buffers). */
int ul_ring_wait(ul_ring *r, ul_batch *b);
/* Judge a complete batch. Returns 0 if everything was written and
 * fdatasync'ed. A short write (or cancelled SQE) is retried synchronously
 * with pwritev from where it stopped: that either succeeds (then fdatasync
 * runs synchronously and 0 is returned) or yields the real errno (e.g.
 * ENOSPC). On any failure the file is truncated back to b->start (best
 * effort) and the positive errno is returned. Blocking only on the rare
 * retry path; call without the GIL. */
int ul_batch_finish(int fd, ul_batch *b);

/* ---- portable path ---------------------------------------------------- */

/* pwritev all of the batch at b->start (IOV_MAX iovecs per call, looping on
 * short writes), then fdatasync. Returns 0 or a positive errno, having
 * truncated back to b->start on failure. Blocking: call without the GIL. */
int ul_batch_write_sync(int fd, ul_batch *b);

#endif
