# cython: language_level=3, boundscheck=False, wraparound=False
"""The walk of audit_walk, in C, for the replay's key only: the same records that
audit_walk.key_records makes of the walk's entries, without a Python object per file.

A replay of a large registry spends most of its time listing and stat'ing the tree to prove that
nothing changed; in Python each file costs a DirEntry, an os.stat_result and a tuple. Here each
costs one fstatat call and a few bytes in a buffer. Directories stay Python-level: the order in
which they are walked decides which of two paths to one directory is listed (the walk lists each
directory once), so they are sorted by the names Python would compare.

Anything the Python walk would report rather than list (a path that cannot be stat'ed, a
directory that cannot be read, a FIFO or device) returns None: such a tree has no report to
replay (audit_memo stores none), and the Python walk describes it. tests/unit/test_audit_treewalk.py
checks that both give the same bytes, tree by tree.
"""

from libc.errno cimport errno
from libc.stdint cimport int64_t, uint32_t, uint64_t
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport free, qsort, realloc
from libc.string cimport memcmp, memcpy, strlen
from posix.stat cimport S_ISDIR, S_ISLNK, S_ISREG, fstatat, lstat, stat, struct_stat

import os


cdef extern from "<dirent.h>" nogil:
    ctypedef struct DIR:
        pass

    struct dirent:
        unsigned char d_type
        char d_name[256]

    DIR *opendir(const char *)
    dirent *readdir(DIR *)
    int closedir(DIR *)
    int dirfd(DIR *)
    enum:
        DT_UNKNOWN
        DT_DIR
        DT_LNK

cdef extern from "<fcntl.h>" nogil:
    enum:
        AT_SYMLINK_NOFOLLOW

cdef extern from *:
    # The timestamps as os.stat reads them on Linux (st_mtime_ns = tv_sec * 10**9 + tv_nsec).
    """
    #include <sys/stat.h>
    static inline long long sl_mtime_sec(const struct stat *st) { return (long long)st->st_mtim.tv_sec; }
    static inline long sl_mtime_nsec(const struct stat *st) { return st->st_mtim.tv_nsec; }
    static inline long long sl_ctime_sec(const struct stat *st) { return (long long)st->st_ctim.tv_sec; }
    static inline long sl_ctime_nsec(const struct stat *st) { return st->st_ctim.tv_nsec; }
    """
    long long sl_mtime_sec(const struct_stat *st) nogil
    long sl_mtime_nsec(const struct_stat *st) nogil
    long long sl_ctime_sec(const struct_stat *st) nogil
    long sl_ctime_nsec(const struct_stat *st) nogil


cdef enum:
    # Bytes of a file record after the path and its NUL (see audit_walk.key_records): kind "F",
    # named, link, then dev, ino, size, mtime (seconds, nanoseconds), ctime (seconds, nanoseconds).
    FIXED = 1 + 1 + 1 + 8 + 8 + 8 + 8 + 4 + 8 + 4


cdef struct Span:
    size_t start
    size_t length


cdef struct Records:
    char *data
    size_t used
    size_t size
    Span *spans  # each record's place in data
    size_t count
    size_t capacity


cdef int _grow(Records *r, size_t extra) except -1:
    cdef size_t size
    cdef char *data
    cdef Span *spans
    if r.used + extra > r.size:
        size = r.size * 2 if r.size else 1 << 16
        while size < r.used + extra:
            size *= 2
        data = <char *>realloc(r.data, size)
        if data == NULL:
            raise MemoryError()
        r.data, r.size = data, size
    if r.count == r.capacity:
        size = r.capacity * 2 if r.capacity else 1024
        spans = <Span *>realloc(r.spans, size * sizeof(Span))
        if spans == NULL:
            raise MemoryError()
        r.spans, r.capacity = spans, size
    return 0


cdef inline void _put_u64(char *out, uint64_t value) noexcept nogil:
    cdef int i
    for i in range(8):
        out[i] = <char>((value >> (8 * i)) & 0xFF)


cdef inline void _put_u32(char *out, uint32_t value) noexcept nogil:
    cdef int i
    for i in range(4):
        out[i] = <char>((value >> (8 * i)) & 0xFF)


cdef int _add_file(
    Records *r, const char *folder, size_t folder_len, bint sep, const char *name, size_t name_len,
    bint named, bint link, const struct_stat *st,
) except -1:
    cdef size_t path_len = folder_len + (1 if sep else 0) + name_len
    _grow(r, path_len + 1 + FIXED)
    cdef char *out = r.data + r.used
    r.spans[r.count].start = r.used
    r.spans[r.count].length = path_len + 1 + FIXED
    r.count += 1
    memcpy(out, folder, folder_len)
    out += folder_len
    if sep:
        out[0] = b'/'
        out += 1
    memcpy(out, name, name_len)
    out += name_len
    out[0] = 0
    out[1] = b'F'
    out[2] = 1 if named else 0
    out[3] = 1 if link else 0
    out += 4
    _put_u64(out, <uint64_t>st.st_dev)
    _put_u64(out + 8, <uint64_t>st.st_ino)
    _put_u64(out + 16, <uint64_t><int64_t>st.st_size)
    _put_u64(out + 24, <uint64_t><int64_t>sl_mtime_sec(st))
    _put_u32(out + 32, <uint32_t>sl_mtime_nsec(st))
    _put_u64(out + 36, <uint64_t><int64_t>sl_ctime_sec(st))
    _put_u32(out + 44, <uint32_t>sl_ctime_nsec(st))
    r.used += path_len + 1 + FIXED
    return 0


cdef const char *_sort_data = NULL  # qsort passes no context: the buffer being sorted (GIL held)


cdef int _compare(const void *a, const void *b) noexcept nogil:
    # Python's order of bytes: memcmp over the shorter, then the shorter first.
    cdef const Span *x = <const Span *>a
    cdef const Span *y = <const Span *>b
    cdef size_t n = x.length if x.length < y.length else y.length
    cdef int c = memcmp(_sort_data + x.start, _sort_data + y.start, n)
    if c != 0:
        return c
    return -1 if x.length < y.length else (1 if x.length > y.length else 0)


cdef class _Walk:
    cdef Records r
    cdef object skip_dirs  # (dev, ino) of directories never walked (the audit's cache)
    cdef object report  # (dev, ino, name) of the report's folder and name, or None

    def __cinit__(self):
        self.r.data = NULL
        self.r.spans = NULL
        self.r.used = self.r.size = self.r.count = self.r.capacity = 0

    def __dealloc__(self):
        free(self.r.data)
        free(self.r.spans)

    cdef bint _is_report(self, const char *name, size_t name_len, bytes report_name):
        # The report, or a temporary twin of it (".<name>.<anything>.tmp", safeload.atomic).
        cdef bytes entry = name[:name_len]
        return entry == report_name or (
            entry.startswith(b"." + report_name + b".") and entry.endswith(b".tmp")
        )

    cdef int tree(self, bytes root) except -2:
        """0 when every path under root was a regular file or a directory it could list; -1
        where the Python walk would report something instead (the caller returns None)."""
        cdef set seen = set(self.skip_dirs)
        cdef list stack = [root]
        cdef bytes folder, report_name
        cdef const char *folder_c
        cdef size_t folder_len
        cdef bint sep, check_report
        cdef struct_stat st
        cdef DIR *d
        cdef dirent *item
        cdef int fd
        cdef size_t name_len
        cdef unsigned char kind
        cdef list subdirs
        while stack:
            folder = stack.pop()
            folder_c = folder
            folder_len = len(folder)
            if stat(folder_c, &st) != 0:
                return -1
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            check_report = self.report is not None and (st.st_dev, st.st_ino) == self.report[:2]
            report_name = self.report[2] if check_report else None
            # os.scandir's DirEntry.path: the folder, a separator unless it ends with one, the name.
            sep = folder_len > 0 and folder_c[folder_len - 1] != b'/'
            subdirs = []
            d = opendir(folder_c)
            if d == NULL:
                return -1
            try:
                fd = dirfd(d)
                while True:
                    errno = 0
                    item = readdir(d)
                    if item == NULL:
                        if errno != 0:
                            return -1
                        break
                    name_len = strlen(item.d_name)
                    if item.d_name[0] == b'.' and (
                        name_len == 1 or (name_len == 2 and item.d_name[1] == b'.')
                    ):
                        continue
                    if check_report and self._is_report(item.d_name, name_len, report_name):
                        continue
                    kind = item.d_type
                    if kind == DT_DIR:
                        subdirs.append(item.d_name[:name_len])
                        continue
                    # As DirEntry.is_dir and .stat: the target of a link, and a stat where the
                    # listing does not say what the entry is.
                    if fstatat(fd, item.d_name, &st, 0) != 0:
                        return -1
                    if (kind == DT_LNK or kind == DT_UNKNOWN) and S_ISDIR(st.st_mode):
                        subdirs.append(item.d_name[:name_len])
                        continue
                    if not S_ISREG(st.st_mode):
                        return -1
                    link = kind == DT_LNK
                    if kind == DT_UNKNOWN:
                        link = _is_link_at(fd, item.d_name)
                    _add_file(&self.r, folder_c, folder_len, sep, item.d_name, name_len, False, link, &st)
            finally:
                closedir(d)
            if len(subdirs) > 1:
                # The Python walk sorts names as str (os.fsdecode): the same order here.
                subdirs.sort(key=os.fsdecode)
            for name in reversed(subdirs):
                stack.append(folder + b"/" + name if sep else folder + name)
        return 0

    cdef int named_file(self, bytes path) except -2:
        cdef struct_stat st
        cdef struct_stat lst
        cdef const char *path_c = path
        if stat(path_c, &st) != 0 or not S_ISREG(st.st_mode):
            return -1
        link = lstat(path_c, &lst) == 0 and S_ISLNK(lst.st_mode)
        _add_file(&self.r, path_c, len(path), False, b"", 0, True, link, &st)
        return 0

    cdef bytes joined(self):
        """The records in Python's order of bytes, one after another."""
        global _sort_data
        cdef size_t k
        cdef char *dest
        if self.r.count == 0:
            return b""
        _sort_data = self.r.data
        try:
            qsort(self.r.spans, self.r.count, sizeof(Span), _compare)
        finally:
            _sort_data = NULL
        cdef bytes out = PyBytes_FromStringAndSize(NULL, self.r.used)
        dest = out
        for k in range(self.r.count):
            memcpy(dest, self.r.data + self.r.spans[k].start, self.r.spans[k].length)
            dest += self.r.spans[k].length
        return out


cdef bint _is_link_at(int fd, const char *name):
    cdef struct_stat st
    return fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 and S_ISLNK(st.st_mode)


def tree_records(list roots, skip_dirs, report):
    """audit_walk.key_records(audit_walk.walk(...)) for the same roots (as bytes), the (dev, ino)
    of excluded directories and the report's (folder dev, folder ino, name as bytes) or None;
    None where the Python walk would report a path it could not list."""
    cdef _Walk walk = _Walk()
    cdef struct_stat st
    cdef bytes root
    walk.skip_dirs = skip_dirs
    walk.report = report
    for root in roots:
        if b"\0" in root:
            return None  # no path holds one (os.stat refuses it); C would read it as its end
        # os.path.isdir: a directory, links followed; anything else is a file named by the user.
        if stat(root, &st) == 0 and S_ISDIR(st.st_mode):
            if walk.tree(root) != 0:
                return None
        elif walk.named_file(root) != 0:
            return None
    return walk.joined()
