/*
 * LD_PRELOAD shim for tests/powercut.rs: records every data-changing file operation a
 * process makes under the directory named by $POWERCUT_DIR, in the binary trace file
 * named by $POWERCUT_TRACE, so that the test can rebuild what a power cut at any moment
 * could have left on disk.
 *
 * Each record is one write(2) to the trace (so a kill -9 leaves at most one record cut
 * short, which the reader drops), emitted under one mutex, so the trace's order is the
 * order the operations took effect in. Layout (little endian):
 *
 *   u32 magic 0x50435452 | u32 op | u64 seq | u64 t0 | u64 t1 | i64 fd | i64 fd2
 *   | u64 ino | i64 off | i64 arg | u32 len_a | u32 len_b | a[len_a] | b[len_b]
 *
 * t1 is CLOCK_MONOTONIC (ns) taken after the real call returned; t0 is taken before it
 * (it only differs from t1 for fsync/fdatasync/sync_file_range). `seq` is the record's
 * number; for fsync/fdatasync/sync_file_range, `off` holds the number of the first record
 * that was NOT yet emitted when the real call began: writes numbered below it are the
 * ones the sync covers. A write holds the mutex across the real call, so its record's
 * number orders it against every other tracked operation.
 *
 * Only successful calls are recorded. Paths are made absolute (relative to the cwd or
 * to the directory fd) but not normalised; the server is given an absolute --data-dir.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum {
    OP_OPEN = 1,
    OP_CLOSE = 2,
    OP_WRITE = 3,
    OP_TRUNCATE = 4,
    OP_FALLOCATE = 5,
    OP_FSYNC = 6,
    OP_FDATASYNC = 7,
    OP_SYNC_FILE_RANGE = 8,
    OP_RENAME = 9,
    OP_UNLINK = 10,
    OP_MKDIR = 11,
    OP_RMDIR = 12,
    OP_DUP = 13,
};

#define MAGIC 0x50435452u
#define MAXFD 65536

struct header {
    uint32_t magic, op;
    uint64_t seq, t0, t1;
    int64_t fd, fd2;
    uint64_t ino;
    int64_t off, arg;
    uint32_t len_a, len_b;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char dir[PATH_MAX];
static size_t dirlen;
static int trace_fd = -1;
static uint64_t seq;
static unsigned char tracked[MAXFD];
static uint64_t inos[MAXFD];
static char *fd_paths[MAXFD];

static int (*r_open)(const char *, int, ...);
static int (*r_open64)(const char *, int, ...);
static int (*r_openat)(int, const char *, int, ...);
static int (*r_openat64)(int, const char *, int, ...);
static int (*r_creat)(const char *, mode_t);
static int (*r_creat64)(const char *, mode_t);
static int (*r_close)(int);
static ssize_t (*r_write)(int, const void *, size_t);
static ssize_t (*r_writev)(int, const struct iovec *, int);
static ssize_t (*r_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*r_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*r_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*r_pwritev64)(int, const struct iovec *, int, off_t);
static int (*r_ftruncate)(int, off_t);
static int (*r_ftruncate64)(int, off_t);
static int (*r_fallocate)(int, int, off_t, off_t);
static int (*r_fallocate64)(int, int, off_t, off_t);
static int (*r_fsync)(int);
static int (*r_fdatasync)(int);
static int (*r_sync_file_range)(int, off_t, off_t, unsigned int);
static int (*r_rename)(const char *, const char *);
static int (*r_renameat)(int, const char *, int, const char *);
static int (*r_renameat2)(int, const char *, int, const char *, unsigned int);
static int (*r_unlink)(const char *);
static int (*r_unlinkat)(int, const char *, int);
static int (*r_mkdir)(const char *, mode_t);
static int (*r_mkdirat)(int, const char *, mode_t);
static int (*r_rmdir)(const char *);
static int (*r_dup)(int);
static int (*r_dup2)(int, int);
static int (*r_dup3)(int, int, int);
static int (*r_fcntl)(int, int, ...);
static int (*r_fcntl64)(int, int, ...);

#define RESOLVE(name) r_##name = dlsym(RTLD_NEXT, #name)

static void resolve_all(void) {
    RESOLVE(open); RESOLVE(open64); RESOLVE(openat); RESOLVE(openat64);
    RESOLVE(creat); RESOLVE(creat64); RESOLVE(close); RESOLVE(write); RESOLVE(writev);
    RESOLVE(pwrite); RESOLVE(pwrite64); RESOLVE(pwritev); RESOLVE(pwritev64);
    RESOLVE(ftruncate); RESOLVE(ftruncate64); RESOLVE(fallocate); RESOLVE(fallocate64);
    RESOLVE(fsync); RESOLVE(fdatasync); RESOLVE(sync_file_range);
    RESOLVE(rename); RESOLVE(renameat); RESOLVE(renameat2);
    RESOLVE(unlink); RESOLVE(unlinkat); RESOLVE(mkdir); RESOLVE(mkdirat); RESOLVE(rmdir);
    RESOLVE(dup); RESOLVE(dup2); RESOLVE(dup3); RESOLVE(fcntl); RESOLVE(fcntl64);
}

static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init(void) {
    resolve_all();
    const char *d = getenv("POWERCUT_DIR");
    const char *t = getenv("POWERCUT_TRACE");
    if (!d || !t || !*d || !*t) return;
    snprintf(dir, sizeof dir, "%s", d);
    dirlen = strlen(dir);
    while (dirlen > 1 && dir[dirlen - 1] == '/') dir[--dirlen] = 0;
    trace_fd = r_open(t, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
    if (trace_fd < 0) {
        fprintf(stderr, "powercut shim: cannot open trace %s: %s\n", t, strerror(errno));
        abort();
    }
}

__attribute__((constructor)) static void ctor(void) { pthread_once(&once, init); }
static inline void ensure(void) { pthread_once(&once, init); }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int is_tracked(int fd) { return trace_fd >= 0 && fd >= 0 && fd < MAXFD && tracked[fd]; }

static int under(const char *p) {
    return trace_fd >= 0 && strncmp(p, dir, dirlen) == 0 && (p[dirlen] == '/' || p[dirlen] == 0);
}

/* Makes `path` (relative to `dirfd`) absolute in `out` (PATH_MAX bytes). */
static void absolute(int dirfd, const char *path, char *out) {
    char base[PATH_MAX];
    if (!path) { out[0] = 0; return; }
    if (path[0] == '/') { snprintf(out, PATH_MAX, "%s", path); return; }
    if (dirfd == AT_FDCWD) {
        if (!getcwd(base, sizeof base)) { out[0] = 0; return; }
    } else if (dirfd >= 0 && dirfd < MAXFD && fd_paths[dirfd]) {
        snprintf(base, sizeof base, "%s", fd_paths[dirfd]);
    } else {
        char link[64];
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        ssize_t n = readlink(link, base, sizeof base - 1);
        if (n < 0) { out[0] = 0; return; }
        base[n] = 0;
    }
    snprintf(out, PATH_MAX, "%s/%s", base, path);
}

/* Emits one record; the caller holds `lock`. Data comes from `a` (or the iovecs). */
static void emit_v(uint32_t op, uint64_t t0, uint64_t t1, int64_t fd, int64_t fd2, uint64_t ino,
                   int64_t off, int64_t arg, const void *a, size_t len_a, const struct iovec *iov,
                   int iovcnt, const void *b, size_t len_b) {
    struct header h = {MAGIC, op, seq++, t0, t1, fd, fd2, ino, off, arg, (uint32_t)len_a,
                       (uint32_t)len_b};
    size_t total = sizeof h + len_a + len_b;
    char *buf = malloc(total);
    if (!buf) abort();
    memcpy(buf, &h, sizeof h);
    char *p = buf + sizeof h;
    if (iov) {
        size_t left = len_a;
        for (int i = 0; i < iovcnt && left > 0; i++) {
            size_t n = iov[i].iov_len < left ? iov[i].iov_len : left;
            memcpy(p, iov[i].iov_base, n);
            p += n;
            left -= n;
        }
    } else if (len_a) {
        memcpy(p, a, len_a);
        p += len_a;
    }
    if (len_b) memcpy(p, b, len_b);
    size_t done = 0;
    while (done < total) {
        ssize_t n = r_write(trace_fd, buf + done, total - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            static const char msg[] = "powercut shim: cannot write the trace\n";
            r_write(2, msg, sizeof msg - 1);
            abort();
        }
        done += (size_t)n;
    }
    free(buf);
}

static void emit(uint32_t op, uint64_t t0, uint64_t t1, int64_t fd, int64_t fd2, uint64_t ino,
                 int64_t off, int64_t arg, const char *a, const char *b) {
    emit_v(op, t0, t1, fd, fd2, ino, off, arg, a, a ? strlen(a) : 0, NULL, 0, b,
           b ? strlen(b) : 0);
}

/* ---- opening and closing ---------------------------------------------------------- */

static int after_open(int fd, int dirfd, const char *path, int flags) {
    if (fd < 0 || trace_fd < 0) return fd;
    int saved = errno;
    char abs[PATH_MAX];
    absolute(dirfd, path, abs);
    if (under(abs) && fd < MAXFD) {
        struct stat st;
        uint64_t ino = fstat(fd, &st) == 0 ? (uint64_t)st.st_ino : 0;
        pthread_mutex_lock(&lock);
        uint64_t t = now_ns();
        tracked[fd] = 1;
        inos[fd] = ino;
        free(fd_paths[fd]);
        fd_paths[fd] = strdup(abs);
        emit(OP_OPEN, t, t, fd, -1, ino, 0, flags, abs, NULL);
        pthread_mutex_unlock(&lock);
    }
    errno = saved;
    return fd;
}

static mode_t mode_arg(int flags, va_list ap) {
    if (flags & (O_CREAT | __O_TMPFILE)) return (mode_t)va_arg(ap, int);
    return 0;
}

int open(const char *path, int flags, ...) {
    ensure();
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return after_open(r_open(path, flags, m), AT_FDCWD, path, flags);
}
int open64(const char *path, int flags, ...) {
    ensure();
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return after_open(r_open64(path, flags, m), AT_FDCWD, path, flags);
}
int openat(int dirfd, const char *path, int flags, ...) {
    ensure();
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return after_open(r_openat(dirfd, path, flags, m), dirfd, path, flags);
}
int openat64(int dirfd, const char *path, int flags, ...) {
    ensure();
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return after_open(r_openat64(dirfd, path, flags, m), dirfd, path, flags);
}
int creat(const char *path, mode_t m) {
    ensure();
    return after_open(r_creat(path, m), AT_FDCWD, path, O_WRONLY | O_CREAT | O_TRUNC);
}
int creat64(const char *path, mode_t m) {
    ensure();
    return after_open(r_creat64(path, m), AT_FDCWD, path, O_WRONLY | O_CREAT | O_TRUNC);
}

int close(int fd) {
    ensure();
    if (!is_tracked(fd)) return r_close(fd);
    /* Closed and forgotten under the lock: a tracked open that reuses the number
     * registers only after this. */
    pthread_mutex_lock(&lock);
    int r = r_close(fd);
    int saved = errno;
    uint64_t t = now_ns();
    if (tracked[fd]) {
        emit(OP_CLOSE, t, t, fd, -1, inos[fd], 0, r, NULL, NULL);
        tracked[fd] = 0;
        free(fd_paths[fd]);
        fd_paths[fd] = NULL;
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}

static int after_dup(int newfd, int oldfd) {
    if (newfd < 0 || newfd >= MAXFD) return newfd;
    int saved = errno;
    pthread_mutex_lock(&lock);
    if (tracked[oldfd]) {
        uint64_t t = now_ns();
        tracked[newfd] = 1;
        inos[newfd] = inos[oldfd];
        free(fd_paths[newfd]);
        fd_paths[newfd] = fd_paths[oldfd] ? strdup(fd_paths[oldfd]) : NULL;
        emit(OP_DUP, t, t, oldfd, newfd, inos[oldfd], 0, 0, NULL, NULL);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return newfd;
}

int dup(int fd) {
    ensure();
    int r = r_dup(fd);
    return is_tracked(fd) ? after_dup(r, fd) : r;
}
int dup2(int fd, int fd2) {
    ensure();
    if (is_tracked(fd2) && fd2 != fd) close(fd2);
    int r = r_dup2(fd, fd2);
    return is_tracked(fd) ? after_dup(r, fd) : r;
}
int dup3(int fd, int fd2, int flags) {
    ensure();
    if (is_tracked(fd2) && fd2 != fd) close(fd2);
    int r = r_dup3(fd, fd2, flags);
    return is_tracked(fd) ? after_dup(r, fd) : r;
}
static int fcntl_common(int (*real)(int, int, ...), int fd, int cmd, void *arg) {
    int r = real(fd, cmd, arg);
    if ((cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && is_tracked(fd)) return after_dup(r, fd);
    return r;
}
int fcntl(int fd, int cmd, ...) {
    ensure();
    va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
    return fcntl_common(r_fcntl, fd, cmd, arg);
}
int fcntl64(int fd, int cmd, ...) {
    ensure();
    va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
    return fcntl_common(r_fcntl64 ? r_fcntl64 : r_fcntl, fd, cmd, arg);
}

/* ---- data ------------------------------------------------------------------------- */

/* Where the `n` bytes just written through `fd`'s file offset began (O_APPEND too: the
 * offset is then the end of what was just appended). Called under the lock. */
static int64_t written_at(int fd, ssize_t n) {
    off_t end = lseek(fd, 0, SEEK_CUR);
    return end < 0 ? -1 : (int64_t)end - (int64_t)n;
}

ssize_t write(int fd, const void *buf, size_t count) {
    ensure();
    if (!is_tracked(fd)) return r_write(fd, buf, count);
    pthread_mutex_lock(&lock);
    ssize_t n = r_write(fd, buf, count);
    int saved = errno;
    if (n > 0) {
        uint64_t t = now_ns();
        emit_v(OP_WRITE, t, t, fd, -1, inos[fd], written_at(fd, n), 0, buf, (size_t)n, NULL, 0,
               NULL, 0);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return n;
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    ensure();
    if (!is_tracked(fd)) return r_writev(fd, iov, iovcnt);
    pthread_mutex_lock(&lock);
    ssize_t n = r_writev(fd, iov, iovcnt);
    int saved = errno;
    if (n > 0) {
        uint64_t t = now_ns();
        emit_v(OP_WRITE, t, t, fd, -1, inos[fd], written_at(fd, n), 0, NULL, (size_t)n, iov,
               iovcnt, NULL, 0);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return n;
}

static ssize_t pwrite_common(ssize_t (*real)(int, const void *, size_t, off_t), int fd,
                             const void *buf, size_t count, off_t off) {
    ensure();
    if (!is_tracked(fd)) return real(fd, buf, count, off);
    pthread_mutex_lock(&lock);
    ssize_t n = real(fd, buf, count, off);
    int saved = errno;
    if (n > 0) {
        uint64_t t = now_ns();
        emit_v(OP_WRITE, t, t, fd, -1, inos[fd], off, 0, buf, (size_t)n, NULL, 0, NULL, 0);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return n;
}
ssize_t pwrite(int fd, const void *buf, size_t count, off_t off) {
    ensure();
    return pwrite_common(r_pwrite, fd, buf, count, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off) {
    ensure();
    return pwrite_common(r_pwrite64, fd, buf, count, off);
}

static ssize_t pwritev_common(ssize_t (*real)(int, const struct iovec *, int, off_t), int fd,
                              const struct iovec *iov, int iovcnt, off_t off) {
    if (!is_tracked(fd)) return real(fd, iov, iovcnt, off);
    pthread_mutex_lock(&lock);
    ssize_t n = real(fd, iov, iovcnt, off);
    int saved = errno;
    if (n > 0) {
        uint64_t t = now_ns();
        emit_v(OP_WRITE, t, t, fd, -1, inos[fd], off, 0, NULL, (size_t)n, iov, iovcnt, NULL, 0);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return n;
}
ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t off) {
    ensure();
    return pwritev_common(r_pwritev, fd, iov, iovcnt, off);
}
ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off_t off) {
    ensure();
    return pwritev_common(r_pwritev64, fd, iov, iovcnt, off);
}

static int truncate_common(int (*real)(int, off_t), int fd, off_t len) {
    if (!is_tracked(fd)) return real(fd, len);
    pthread_mutex_lock(&lock);
    int r = real(fd, len);
    int saved = errno;
    if (r == 0) {
        uint64_t t = now_ns();
        emit(OP_TRUNCATE, t, t, fd, -1, inos[fd], 0, len, NULL, NULL);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}
int ftruncate(int fd, off_t len) { ensure(); return truncate_common(r_ftruncate, fd, len); }
int ftruncate64(int fd, off_t len) { ensure(); return truncate_common(r_ftruncate64, fd, len); }

static int fallocate_common(int (*real)(int, int, off_t, off_t), int fd, int mode, off_t off,
                            off_t len) {
    if (!is_tracked(fd)) return real(fd, mode, off, len);
    pthread_mutex_lock(&lock);
    int r = real(fd, mode, off, len);
    int saved = errno;
    if (r == 0) {
        uint64_t t = now_ns();
        emit_v(OP_FALLOCATE, t, t, fd, mode, inos[fd], off, len, NULL, 0, NULL, 0, NULL, 0);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}
int fallocate(int fd, int mode, off_t off, off_t len) {
    ensure();
    return fallocate_common(r_fallocate, fd, mode, off, len);
}
int fallocate64(int fd, int mode, off_t off, off_t len) {
    ensure();
    return fallocate_common(r_fallocate64, fd, mode, off, len);
}

/* ---- syncs: stamped before and after; the lock is NOT held during the real call ---- */

static int sync_common(uint32_t op, int fd, int r_kind, off_t a, off_t b, unsigned int flags) {
    if (!is_tracked(fd)) {
        if (r_kind == 0) return r_fsync(fd);
        if (r_kind == 1) return r_fdatasync(fd);
        return r_sync_file_range(fd, a, b, flags);
    }
    pthread_mutex_lock(&lock);
    uint64_t first_uncovered = seq;
    uint64_t ino = inos[fd];
    pthread_mutex_unlock(&lock);
    uint64_t t0 = now_ns();
    int r = r_kind == 0 ? r_fsync(fd) : r_kind == 1 ? r_fdatasync(fd)
                                                   : r_sync_file_range(fd, a, b, flags);
    int saved = errno;
    uint64_t t1 = now_ns();
    if (r == 0) {
        pthread_mutex_lock(&lock);
        emit(op, t0, t1, fd, -1, ino, (int64_t)first_uncovered, r_kind == 2 ? (int64_t)flags : 0,
             NULL, NULL);
        pthread_mutex_unlock(&lock);
    }
    errno = saved;
    return r;
}
int fsync(int fd) { ensure(); return sync_common(OP_FSYNC, fd, 0, 0, 0, 0); }
int fdatasync(int fd) { ensure(); return sync_common(OP_FDATASYNC, fd, 1, 0, 0, 0); }
int sync_file_range(int fd, off_t off, off_t n, unsigned int flags) {
    ensure();
    return sync_common(OP_SYNC_FILE_RANGE, fd, 2, off, n, flags);
}

/* ---- names ------------------------------------------------------------------------- */

static void name_op(uint32_t op, int r, int dfa, const char *a, int dfb, const char *b) {
    if (r != 0 || trace_fd < 0) return;
    int saved = errno;
    char pa[PATH_MAX], pb[PATH_MAX];
    absolute(dfa, a, pa);
    if (b) absolute(dfb, b, pb);
    if (under(pa) || (b && under(pb))) {
        pthread_mutex_lock(&lock);
        uint64_t t = now_ns();
        emit(op, t, t, -1, -1, 0, 0, 0, pa, b ? pb : NULL);
        pthread_mutex_unlock(&lock);
    }
    errno = saved;
}

int rename(const char *a, const char *b) {
    ensure();
    int r = r_rename(a, b);
    name_op(OP_RENAME, r, AT_FDCWD, a, AT_FDCWD, b);
    return r;
}
int renameat(int da, const char *a, int db, const char *b) {
    ensure();
    int r = r_renameat(da, a, db, b);
    name_op(OP_RENAME, r, da, a, db, b);
    return r;
}
int renameat2(int da, const char *a, int db, const char *b, unsigned int flags) {
    ensure();
    int r = r_renameat2(da, a, db, b, flags);
    /* RENAME_EXCHANGE is not modelled (the server does not use it): recorded as a rename. */
    name_op(OP_RENAME, r, da, a, db, b);
    return r;
}
int unlink(const char *p) {
    ensure();
    int r = r_unlink(p);
    name_op(OP_UNLINK, r, AT_FDCWD, p, AT_FDCWD, NULL);
    return r;
}
int unlinkat(int d, const char *p, int flags) {
    ensure();
    int r = r_unlinkat(d, p, flags);
    name_op(flags & AT_REMOVEDIR ? OP_RMDIR : OP_UNLINK, r, d, p, AT_FDCWD, NULL);
    return r;
}
int rmdir(const char *p) {
    ensure();
    int r = r_rmdir(p);
    name_op(OP_RMDIR, r, AT_FDCWD, p, AT_FDCWD, NULL);
    return r;
}
int mkdir(const char *p, mode_t m) {
    ensure();
    int r = r_mkdir(p, m);
    name_op(OP_MKDIR, r, AT_FDCWD, p, AT_FDCWD, NULL);
    return r;
}
int mkdirat(int d, const char *p, mode_t m) {
    ensure();
    int r = r_mkdirat(d, p, m);
    name_op(OP_MKDIR, r, d, p, AT_FDCWD, NULL);
    return r;
}
