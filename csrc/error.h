// Errors are reported to the caller, never by exit(): a function that can fail returns -1
// (or NULL) and writes one line, without a trailing newline, into a char[ERR_LEN] buffer.
#ifndef ERROR_H
#define ERROR_H

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ERR_LEN 256

__attribute__((format(printf, 2, 3)))
static inline int fail(char *err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, ERR_LEN, fmt, ap);
    va_end(ap);
    return -1;
}

// Opens path for reading and gives its size: the first step of both loaders (checkpoint,
// tokenizer). Returns the file descriptor, or -1 with a message if it is missing or not a file.
static inline int open_regular_file(const char *path, size_t *size, char *err) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail(err, "%s: cannot open (%s)", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return fail(err, "%s: not a regular file", path);
    }
    *size = st.st_size;
    return fd;
}

#endif
