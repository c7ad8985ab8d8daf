/* A static program linked to load at 0x1000, where rewrite-2004's fixup buffer lives
 * (tests/test_rewrite2004.py): it touches a thread variable (glibc's TLS, so it faults under Xen's
 * truncation) and prints where main is. */
#include <stdio.h>

__thread int counter;

int main(void) {
    counter += 1;
    printf("main at %p, counter %d\n", (void *)main, counter);
    return 0;
}
