/* uring_log: batches, io_uring submission/completion, and the portable
 * pwritev+fdatasync path for the durable log writer. See uring_log.h for the
 * contract; docs/logwriter.md for the user-visible semantics.
 *
 * Nothing here touches Python objects or needs the GIL.
 */
#define _GNU_SOURCE
#include "uring_log.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* ---- batches ---------------------------------------------------------- */

void ul_batch_init(ul_batch *b)
{
    memset(b, 0, sizeof *b);
    b->fsync_res = UL_RES_PENDING;
}

void ul_batch_free(ul_batch *b)
{
    free(b->iov);
    free(b->segs);
    ul_batch_init(b);
}

static int grow_iov(ul_batch *b)
{
    size_t cap;
    struct iovec *iov;

    if (b->niov < b->iov_cap)
        return 0;
    cap = b->iov_cap ? b->iov_cap * 2 : 16;
    iov = realloc(b->iov, cap * sizeof *iov);
    if (!iov)
        return -ENOMEM;
    b->iov = iov;
    b->iov_cap = cap;
    return 0;
}

static int grow_segs(ul_batch *b)
{
    unsigned cap;
    ul_seg *segs;

    if (b->nsegs < b->segs_cap)
        return 0;
    cap = b->segs_cap ? b->segs_cap * 2 : 4;
    if (cap > UL_MAX_SEGS)
        cap = UL_MAX_SEGS;
    segs = realloc(b->segs, cap * sizeof *segs);
    if (!segs)
        return -ENOMEM;
    b->segs = segs;
    b->segs_cap = cap;
    return 0;
}

int ul_batch_add(ul_batch *b, const void *p, size_t len)
{
    /* Enough state to undo a partial add: only the last segment can have
     * been modified, and only niov/nsegs/total grew. */
    size_t save_niov = b->niov;
    unsigned save_nsegs = b->nsegs;
    uint64_t save_total = b->total;
    ul_seg save_last;
    const char *q = p;
    int rc;

    memset(&save_last, 0, sizeof save_last);
    if (save_nsegs)
        save_last = b->segs[save_nsegs - 1];

    while (len > 0) {
        ul_seg *s = b->nsegs ? &b->segs[b->nsegs - 1] : NULL;
        uint64_t room;
        size_t chunk;

        if (!s || s->iov_count == UL_IOV_MAX || s->len >= UL_SEG_MAX_BYTES) {
            if (b->nsegs == UL_MAX_SEGS) {
                rc = -E2BIG;
                goto undo;
            }
            if ((rc = grow_segs(b)) < 0)
                goto undo;
            s = &b->segs[b->nsegs++];
            s->iov_first = b->niov;
            s->iov_count = 0;
            s->rel = b->total;
            s->len = 0;
            s->res = UL_RES_PENDING;
        }
        if ((rc = grow_iov(b)) < 0)
            goto undo;
        room = UL_SEG_MAX_BYTES - s->len;
        chunk = (uint64_t)len < room ? len : (size_t)room;
        b->iov[b->niov].iov_base = (void *)q;
        b->iov[b->niov].iov_len = chunk;
        b->niov++;
        s->iov_count++;
        s->len += chunk;
        b->total += chunk;
        q += chunk;
        len -= chunk;
    }
    return 0;

undo:
    b->niov = save_niov;
    b->nsegs = save_nsegs;
    b->total = save_total;
    if (save_nsegs)
        b->segs[save_nsegs - 1] = save_last;
    return rc;
}

/* ---- synchronous helpers (blocking) ----------------------------------- */

/* Drop the first `skip` bytes of iov[0..n) in place. */
static void iov_skip(struct iovec *iov, size_t n, uint64_t skip)
{
    size_t i;

    for (i = 0; i < n && skip > 0; i++) {
        size_t take = skip < iov[i].iov_len ? (size_t)skip : iov[i].iov_len;
        iov[i].iov_base = (char *)iov[i].iov_base + take;
        iov[i].iov_len -= take;
        skip -= take;
    }
}

/* pwritev all of iov[0..n) at `off`, at most UL_IOV_MAX iovecs per call,
 * continuing after short writes until everything is written or the kernel
 * reports an error. CONSUMES the iovecs (advances them in place). Returns 0
 * or a positive errno. */
static int pwritev_all(int fd, struct iovec *iov, size_t n, uint64_t off)
{
    size_t i = 0;

    while (i < n) {
        size_t cnt;
        ssize_t w;

        if (iov[i].iov_len == 0) {
            i++;
            continue;
        }
        cnt = n - i < UL_IOV_MAX ? n - i : UL_IOV_MAX;
        w = pwritev(fd, iov + i, (int)cnt, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO; /* no progress and no errno: should not happen */
        off += (uint64_t)w;
        iov_skip(iov + i, cnt, (uint64_t)w);
    }
    return 0;
}

static int datasync(int fd)
{
    while (fdatasync(fd) != 0) {
        if (errno != EINTR)
            return errno;
    }
    return 0;
}

/* A failed batch must not leave a partial tail that a later batch would
 * overwrite only partly: cut the file back to where the batch began. Best
 * effort: the batch is reported failed whether or not this works. */
static void truncate_back(int fd, const ul_batch *b)
{
    if (ftruncate(fd, (off_t)b->start) != 0) {
        /* nothing more we can do; the caller reports the original errno */
    }
}

/* ---- io_uring path ---------------------------------------------------- */

int ul_ring_open(ul_ring *r)
{
    int rc;

    memset(r, 0, sizeof *r);
    r->efd = -1;
    rc = io_uring_queue_init(UL_RING_ENTRIES, &r->ring, 0);
    if (rc < 0)
        return rc;
    r->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->efd < 0) {
        rc = -errno;
        io_uring_queue_exit(&r->ring);
        return rc;
    }
    rc = io_uring_register_eventfd(&r->ring, r->efd);
    if (rc < 0) {
        close(r->efd);
        r->efd = -1;
        io_uring_queue_exit(&r->ring);
        return rc;
    }
    r->live = 1;
    return 0;
}

void ul_ring_close(ul_ring *r)
{
    if (!r->live)
        return;
    /* Closing the ring fd also unregisters the eventfd. */
    io_uring_queue_exit(&r->ring);
    close(r->efd);
    r->efd = -1;
    r->live = 0;
}

static inline uint64_t make_ud(uint32_t gen, uint32_t idx)
{
    return ((uint64_t)gen << 32) | idx;
}

/* Slot for completion `idx` of the batch, or NULL. */
static int64_t *slot_of(ul_batch *b, uint32_t idx)
{
    if (idx < b->nsegs)
        return &b->segs[idx].res;
    if (idx == b->nsegs)
        return &b->fsync_res;
    return NULL;
}

int ul_ring_submit(ul_ring *r, int fd, ul_batch *b)
{
    unsigned want = b->nsegs + 1, done = 0, i;
    int tries = 0;
    struct io_uring_sqe *sqe;

    if (io_uring_sq_space_left(&r->ring) < want)
        return -EBUSY; /* cannot happen: one batch at a time, and
                          nsegs < ring entries */

    b->gen = ++r->gen;
    /* Generation 0 is never used, so a zeroed tag never matches. */
    if (b->gen == 0)
        b->gen = ++r->gen;
    b->syncs = 0;
    b->fsync_res = UL_RES_PENDING;

    for (i = 0; i < b->nsegs; i++) {
        ul_seg *s = &b->segs[i];

        sqe = io_uring_get_sqe(&r->ring);
        io_uring_prep_writev(sqe, fd, b->iov + s->iov_first, s->iov_count,
                             b->start + s->rel);
        /* A failed or short write breaks the chain: the rest, including the
         * fsync, complete with -ECANCELED. */
        sqe->flags |= IOSQE_IO_LINK;
        io_uring_sqe_set_data64(sqe, make_ud(b->gen, i));
        s->res = UL_RES_PENDING;
    }
    sqe = io_uring_get_sqe(&r->ring);
    io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(sqe, make_ud(b->gen, b->nsegs));
    b->outstanding = want;

    while (done < want) {
        int rc = io_uring_submit(&r->ring);

        if (rc > 0) {
            done += (unsigned)rc;
            continue;
        }
        if ((rc == 0 || rc == -EINTR || rc == -EAGAIN || rc == -EBUSY)
            && ++tries < 1000)
            continue;
        if (rc == 0)
            rc = -EAGAIN;
        if (done == 0) {
            b->outstanding = 0;
            return rc;
        }
        /* Part of the chain is in flight: wait for that part only; the
         * unsubmitted tail counts as cancelled and ul_batch_finish redoes it
         * synchronously. (The caller stops using this ring afterwards.) */
        for (i = done; i < want; i++) {
            int64_t *slot = slot_of(b, i);
            if (slot)
                *slot = -ECANCELED;
        }
        b->outstanding = done;
        return 0;
    }
    return 0;
}

/* Record one CQE into the batch it belongs to; ignore anything else. */
static void take_cqe(ul_batch *b, const struct io_uring_cqe *cqe)
{
    uint64_t ud = io_uring_cqe_get_data64(cqe);
    int64_t *slot;

    if (!b || b->outstanding == 0 || (uint32_t)(ud >> 32) != b->gen)
        return; /* stale or foreign completion */
    slot = slot_of(b, (uint32_t)ud);
    if (!slot || *slot != UL_RES_PENDING)
        return;
    *slot = cqe->res;
    b->outstanding--;
}

int ul_ring_reap(ul_ring *r, ul_batch *b)
{
    uint64_t count;
    unsigned head, n = 0;
    struct io_uring_cqe *cqe;

    /* Drain the eventfd BEFORE looking at the CQ: a CQE posted after this
     * read signals the eventfd again, so none can be missed. */
    if (read(r->efd, &count, sizeof count) < 0) {
        /* EAGAIN: not signalled (spurious wakeup) - still look at the CQ */
    }
    io_uring_for_each_cqe(&r->ring, head, cqe) {
        n++;
        take_cqe(b, cqe);
    }
    if (n)
        io_uring_cq_advance(&r->ring, n);
    return b != NULL && b->outstanding == 0;
}

int ul_ring_wait(ul_ring *r, ul_batch *b)
{
    while (b->outstanding > 0) {
        struct io_uring_cqe *cqe;
        int rc = io_uring_wait_cqe(&r->ring, &cqe);

        if (rc == -EINTR)
            continue;
        if (rc < 0)
            return rc;
        take_cqe(b, cqe);
        io_uring_cqe_seen(&r->ring, cqe);
    }
    return 0;
}

/* Results that mean "the kernel did not do it, nothing is known to be
 * wrong": redo the work synchronously to learn the real outcome. */
static int retryable(int64_t res)
{
    return res == -ECANCELED || res == -EINTR || res == -EAGAIN
        || res == UL_RES_PENDING;
}

int ul_batch_finish(int fd, ul_batch *b)
{
    unsigned i;
    int err;

    if (b->fsync_res != UL_RES_PENDING && b->fsync_res != -ECANCELED)
        b->syncs++;

    for (i = 0; i < b->nsegs; i++) {
        ul_seg *s = &b->segs[i];
        uint64_t done;

        if (s->res == (int64_t)s->len)
            continue;
        if (s->res < 0 && !retryable(s->res)) {
            err = (int)-s->res;
            goto fail;
        }
        /* Short write (or the SQE never ran): the chain stopped here.
         * Write the rest of the batch synchronously from where the kernel
         * stopped; this either succeeds or yields the real errno. */
        done = s->res > 0 ? (uint64_t)s->res : 0;
        iov_skip(b->iov + s->iov_first, s->iov_count, done);
        err = pwritev_all(fd, b->iov + s->iov_first, b->niov - s->iov_first,
                          b->start + s->rel + done);
        if (err)
            goto fail;
        b->syncs++;
        if ((err = datasync(fd)) != 0)
            goto fail;
        return 0;
    }
    if (b->fsync_res == 0)
        return 0;
    if (retryable(b->fsync_res)) {
        b->syncs++;
        if ((err = datasync(fd)) == 0)
            return 0;
        goto fail;
    }
    err = (int)-b->fsync_res;
fail:
    truncate_back(fd, b);
    return err;
}

/* ---- portable path ---------------------------------------------------- */

int ul_batch_write_sync(int fd, ul_batch *b)
{
    int err;

    err = pwritev_all(fd, b->iov, b->niov, b->start);
    if (!err) {
        b->syncs++;
        err = datasync(fd);
    }
    if (err)
        truncate_back(fd, b);
    return err;
}
