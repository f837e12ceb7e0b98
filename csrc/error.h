// Errors are reported to the caller, never by exit(): a function that can fail returns -1
// (or NULL) and writes one line, without a trailing newline, into a char[ERR_LEN] buffer.
#ifndef ERROR_H
#define ERROR_H

#include <stdarg.h>
#include <stdio.h>

#define ERR_LEN 256

__attribute__((format(printf, 2, 3)))
static inline int fail(char *err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, ERR_LEN, fmt, ap);
    va_end(ap);
    return -1;
}

#endif
