/* selfread: a program that reads its own code (hazard guest).
 *
 * Binary rewriting (XenLinux fixup.c, Jakub's 0x65 -> 0x64 prefix rewrite)
 * changes code bytes in memory; a program that checksums its own code sees
 * the difference. This guest checksums (FNV-1a) the machine code of
 * `tls_probe` (which writes errno and its own __thread variable: negative
 * %gs accesses), and the first 64 bytes of libc's `strerror` and `malloc`,
 * after running them, and prints the checksums. tls_probe sits alone in its
 * own section, whose exact extent the linker gives us (__start_/__stop_).
 *
 * The bytes printed are those of this exact binary: the default and
 * nosegneg builds print different checksums (their code differs).
 *
 * Usage: selfread [N]   (N calls of tls_probe before checksumming, default 100)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static __thread int tls_counter;

/* The probe lives alone in section "selfread_text": the linker then defines
 * __start_selfread_text and __stop_selfread_text around exactly its code. */
extern const unsigned char __start_selfread_text[], __stop_selfread_text[];

__attribute__((noinline, section("selfread_text")))
int tls_probe(int x)
{
    errno = x & 63;
    tls_counter += x;
    return errno + tls_counter;
}

__attribute__((noinline))
int tls_counter_value(void)
{
    return tls_counter;
}

static unsigned int fnv(const unsigned char *p, size_t n)
{
    unsigned int h = 2166136261u;
    size_t i;
    for (i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

static size_t count_gs_prefix(const unsigned char *p, size_t n)
{
    size_t i, c = 0;
    for (i = 0; i < n; i++)
        c += p[i] == 0x65;
    return c;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 100;
    const unsigned char *a = (const unsigned char *)(void *)tls_probe;
    size_t len = (size_t)(__stop_selfread_text - __start_selfread_text);
    long i, acc = 0;
    void *m;

    for (i = 0; i < n; i++)
        acc += tls_probe((int)i);
    m = malloc(32);
    (void)strerror(ENOENT);
    free(m);

    printf("selfread: %ld probes, acc %ld, counter %d\n", n, acc, tls_counter_value());
    printf("tls_probe span: %zu bytes, %zu bytes 0x65, fnv %08x\n",
           len, count_gs_prefix(a, len), fnv(a, len));
    printf("strerror: 64 bytes, fnv %08x\n",
           fnv((const unsigned char *)(void *)strerror, 64));
    printf("malloc: 64 bytes, fnv %08x\n",
           fnv((const unsigned char *)(void *)malloc, 64));
    return 0;
}
