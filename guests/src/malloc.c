/* malloc: allocator churn.
 *
 * A fixed-seed LCG drives malloc/free/realloc/calloc over a table of slots
 * with mostly small sizes, so glibc's tcache (reached through a __thread
 * pointer: register-indirect negative %gs accesses) is hit constantly, with
 * some larger sizes to reach the fastbin/smallbin/unsorted paths and a few
 * big blocks for mmap-free top-chunk growth. Our own __thread live/peak
 * byte counters add direct -ve accesses in our code.
 *
 * Usage: malloc [N]     (N operations, default 5000)
 * Prints a checksum of the bytes written and read back; no pointers printed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 512

static unsigned int seed = 12345u;
static __thread unsigned long tls_live;     /* own TLS: live bytes */
static __thread unsigned long tls_peak;

static unsigned int lcg(void)
{
    seed = seed * 1103515245u + 12345u;
    return (seed >> 16) & 0x7fff;
}

static size_t pick_size(void)
{
    unsigned int r = lcg() % 100;
    if (r < 70) return 1 + lcg() % 128;          /* tcache */
    if (r < 90) return 129 + lcg() % 896;        /* small bins */
    if (r < 99) return 1024 + lcg() % 8192;
    return 16384 + lcg() % 65536;                /* below mmap threshold */
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 5000;
    unsigned char *slot[SLOTS];
    size_t len[SLOTS];
    unsigned int sum = 0;
    unsigned long mallocs = 0, frees = 0, reallocs = 0, callocs = 0;
    long i;
    size_t j;

    memset(slot, 0, sizeof slot);
    memset(len, 0, sizeof len);
    for (i = 0; i < n; i++) {
        unsigned int k = lcg() % SLOTS;
        unsigned int op = lcg() % 10;
        if (slot[k] == NULL) {
            size_t sz = pick_size();
            if (op == 0) {
                slot[k] = calloc(1, sz);
                callocs++;
                for (j = 0; j < sz; j++)
                    sum += slot[k][j];           /* all zero */
            } else {
                slot[k] = malloc(sz);
                mallocs++;
            }
            if (!slot[k]) { perror("malloc"); return 1; }
            len[k] = sz;
            tls_live += sz;
            if (tls_live > tls_peak) tls_peak = tls_live;
            memset(slot[k], (int)(k & 0xff), sz);
        } else if (op < 3) {
            size_t sz = pick_size();
            unsigned char *p = realloc(slot[k], sz);
            if (!p) { perror("realloc"); return 1; }
            for (j = 0; j < (sz < len[k] ? sz : len[k]); j++)
                sum = sum * 31u + p[j];
            if (sz > len[k])
                memset(p + len[k], 0x5a, sz - len[k]);
            tls_live += sz - len[k];
            if (tls_live > tls_peak) tls_peak = tls_live;
            slot[k] = p;
            len[k] = sz;
            reallocs++;
        } else {
            sum = sum * 31u + slot[k][0] + slot[k][len[k] - 1] + (unsigned int)len[k];
            tls_live -= len[k];
            free(slot[k]);
            slot[k] = NULL;
            frees++;
        }
    }
    for (j = 0; j < SLOTS; j++) {
        if (slot[j]) {
            sum = sum * 31u + slot[j][len[j] / 2];
            free(slot[j]);
            frees++;
        }
    }
    printf("malloc: %ld ops: %lu malloc, %lu calloc, %lu realloc, %lu free\n",
           n, mallocs, callocs, reallocs, frees);
    printf("peak live bytes (thread-local): %lu\n", tls_peak);
    printf("checksum: %08x\n", sum);
    return 0;
}
