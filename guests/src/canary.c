/* canary: deep call chains under -fstack-protector-strong.
 *
 * Every function here has a local char array, so gcc's
 * -fstack-protector-strong makes each one load the canary from %gs:0x14 in
 * its prologue and compare it in its epilogue: a dense stream of positive
 * %gs accesses, which a segment-flipping hypervisor must serve after every
 * negative one (errno below, and our own __thread depth counter in
 * recurse(), keep those in the mix).
 *
 * Usage: canary [N]     (N rounds, default 200)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static __thread int tls_depth;               /* own TLS: -ve %gs, between canary loads */
static __thread int tls_max_depth;

static unsigned int mix(unsigned int h, const char *s, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

__attribute__((noinline)) static unsigned int leaf(unsigned int x)
{
    char buf[24];
    int len = snprintf(buf, sizeof buf, "%u", x);
    return mix(x, buf, (size_t)len);
}

__attribute__((noinline)) static unsigned int chain_b(unsigned int x, int d);

__attribute__((noinline)) static unsigned int chain_a(unsigned int x, int d)
{
    char buf[16];
    memset(buf, (int)(x & 0x7f), sizeof buf);
    buf[d & 15] = (char)d;
    if (d == 0)
        return leaf(x) ^ mix(0, buf, sizeof buf);
    return chain_b(x * 3u + (unsigned int)d, d - 1) + mix(x, buf, sizeof buf);
}

__attribute__((noinline)) static unsigned int chain_b(unsigned int x, int d)
{
    char buf[32];
    size_t i;
    for (i = 0; i < sizeof buf; i++)
        buf[i] = (char)(x >> (i & 7));
    if (d == 0)
        return leaf(x + 1);
    return chain_a(x ^ 0x9e3779b9u, d - 1) ^ mix(x, buf, sizeof buf);
}

__attribute__((noinline)) static unsigned int recurse(unsigned int x, int d)
{
    char name[8];
    unsigned int r;
    if (++tls_depth > tls_max_depth)
        tls_max_depth = tls_depth;
    name[0] = 'r';
    name[1] = (char)('0' + d % 10);
    name[2] = '\0';
    if (d <= 0)
        r = mix(x, name, 2);
    else
        r = recurse(x + (unsigned int)strlen(name), d - 1) * 7u + (unsigned int)d;
    tls_depth--;
    return r;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 200;
    unsigned int acc = 0;
    unsigned long errs = 0;
    long i;

    for (i = 0; i < n; i++) {
        acc += chain_a((unsigned int)i, 40);
        acc ^= recurse(acc, 64);
        errno = 0;
        if (strtol("99999999999999999999", NULL, 10) && errno == ERANGE)
            errs++;
    }
    printf("canary: %ld rounds, %lu ERANGE, max depth %d\n", n, errs, tls_max_depth);
    printf("result: %08x\n", acc);
    return 0;
}
