/* stdio: formatting and ctype.
 *
 * snprintf with many conversions (%d %u %x %o %c %s %ld %lld %5.2f %e %g %p-free),
 * then ctype classification (isalpha/isdigit/isspace/toupper/tolower: glibc
 * reaches its ctype tables through __thread locale pointers, i.e. negative
 * %gs accesses) and strtol/strtoul over the generated text.
 *
 * Usage: stdio [N]      (N lines generated, default 300)
 * Prints a few sample lines and a checksum. A __thread character counter
 * gives our own code a direct -ve access in the inner loop.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned int seed = 4242u;
static __thread unsigned long tls_chars;    /* own TLS: characters classified */

static unsigned int lcg(void)
{
    seed = seed * 1664525u + 1013904223u;
    return seed >> 8;
}

static const char *words[] = {
    "segment", "limit", "Xen", "glibc", "TLS", "gs", "expand-down", "flip",
    "emulate", "rewrite", "nosegneg", "hypervisor", "descriptor", "TCB",
};

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 300;
    char line[256], word[64];
    unsigned int sum = 0, alpha = 0, digit = 0, space = 0, upper = 0, punct = 0;
    long long numsum = 0;
    long i;

    for (i = 0; i < n; i++) {
        unsigned int r = lcg();
        const char *w = words[r % (sizeof words / sizeof words[0])];
        int len = snprintf(line, sizeof line,
                           "%05ld %-12s|%8u|%#x|%o|%c|%+d|%lld|%7.3f|%.2e|%g|%%|%.*s",
                           i, w, r, r & 0xffff, r & 0777, 'a' + (int)(r % 26),
                           (int)(r % 2001) - 1000, (long long)r * 1000003LL,
                           (double)(r % 100000) / 7.0, (double)r * 1.5e-3,
                           (double)(r % 1000) / 8.0, (int)(r % 6), w);
        char *p = line, *end;
        const char *c;

        if (len < 0 || len >= (int)sizeof line)
            len = (int)strlen(line);
        for (c = line; *c; c++) {
            unsigned char ch = (unsigned char)*c;
            tls_chars++;
            if (isalpha(ch)) alpha++;
            if (isdigit(ch)) digit++;
            if (isspace(ch)) space++;
            if (isupper(ch)) upper++;
            if (ispunct(ch)) punct++;
            sum = sum * 33u + (unsigned int)toupper(ch) + (unsigned int)tolower(ch);
        }
        /* parse every run of digits (and hex after "0x") with strtol */
        while (*p) {
            if (p[0] == '0' && p[1] == 'x') {
                numsum += (long long)strtoul(p, &end, 16);
            } else if (isdigit((unsigned char)*p) ||
                       ((*p == '-' || *p == '+') && isdigit((unsigned char)p[1]))) {
                numsum += strtol(p, &end, 10);
            } else {
                p++;
                continue;
            }
            p = end > p ? end : p + 1;
        }
        snprintf(word, sizeof word, "%s", w);
        for (c = word; *c; c++)
            word[c - word] = (char)toupper((unsigned char)*c);
        sum ^= (unsigned int)strlen(word) << (i & 15);
        if (i < 3 || i == n - 1)
            printf("%s\n", line);
    }
    printf("stdio: %ld lines: alpha %u digit %u space %u upper %u punct %u\n",
           n, alpha, digit, space, upper, punct);
    printf("numbers: %lld, chars (thread-local) %lu\n", numsum, tls_chars);
    printf("checksum: %08x\n", sum);
    return 0;
}
