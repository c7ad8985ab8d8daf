/* prelink: read a "library", relocate it, write a new file (hazard guest).
 *
 * In 2004 code patched in the page cache of /lib/tls libraries reached the
 * disk when prelink read the patched library, relocated it and wrote a new
 * file. This guest does the same thing in miniature: it reads INPUT with
 * read(2), applies a fake relocation (adds DELTA to every aligned 32-bit word
 * whose value lies in [0x08048000, 0x08048000 + 16 MiB), i.e. looks like an
 * address in a classic i386 executable), writes the result to OUTPUT.tmp and
 * renames it over OUTPUT. If INPUT's bytes were patched in memory by a
 * binary-rewriting hypervisor, the patch is now in OUTPUT.
 *
 * Usage: prelink INPUT OUTPUT
 * Prints sizes, number of words relocated and checksums of input and output.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define LO 0x08048000u
#define HI (0x08048000u + 0x01000000u)
#define DELTA 0x00100000u

static unsigned int fnv(const unsigned char *p, size_t n)
{
    unsigned int h = 2166136261u;
    size_t i;
    for (i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

static int fail(const char *what, const char *path)
{
    printf("prelink: %s %s: %s\n", what, path, strerror(errno));
    return 1;
}

int main(int argc, char **argv)
{
    unsigned char *buf = NULL;
    size_t size = 0, cap = 0, i, nrel = 0;
    unsigned int in_sum;
    char tmp[4096];
    int fd;

    if (argc != 3) {
        fprintf(stderr, "usage: prelink INPUT OUTPUT\n");
        return 2;
    }
    fd = open(argv[1], O_RDONLY);
    if (fd < 0)
        return fail("open", argv[1]);
    for (;;) {
        ssize_t r;
        if (size == cap) {
            cap = cap ? cap * 2 : 65536;
            buf = realloc(buf, cap);
            if (!buf)
                return fail("realloc", argv[1]);
        }
        r = read(fd, buf + size, cap - size);
        if (r < 0)
            return fail("read", argv[1]);
        if (r == 0)
            break;
        size += (size_t)r;
    }
    close(fd);
    in_sum = fnv(buf, size);

    for (i = 0; i + 4 <= size; i += 4) {
        unsigned int w;
        memcpy(&w, buf + i, 4);
        if (w >= LO && w < HI) {
            w += DELTA;
            memcpy(buf + i, &w, 4);
            nrel++;
        }
    }

    snprintf(tmp, sizeof tmp, "%s.tmp", argv[2]);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return fail("open", tmp);
    for (i = 0; i < size;) {
        ssize_t w = write(fd, buf + i, size - i);
        if (w < 0)
            return fail("write", tmp);
        i += (size_t)w;
    }
    if (fsync(fd) != 0 && errno != EINVAL)
        return fail("fsync", tmp);
    if (close(fd) != 0)
        return fail("close", tmp);
    if (rename(tmp, argv[2]) != 0)
        return fail("rename", tmp);

    printf("prelink: read %zu bytes, relocated %zu words by +0x%x, wrote %zu bytes\n",
           size, nrel, DELTA, size);
    printf("input fnv %08x, output fnv %08x\n", in_sum, fnv(buf, size));
    free(buf);
    return 0;
}
