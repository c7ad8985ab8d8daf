/* A file mapping placed inside the heap and then removed by shrinking the break (tests/test_rewrite.py).
 *
 * The program maps libc.so.6 with MAP_FIXED over pages of its own heap, shrinks the break below them
 * (which unmaps them, file mapping included), grows it again (plain anonymous memory) and fills it
 * with 0x65 bytes -- the gs prefix a rewrite patch replaces. A child then execs ls, whose libc sites
 * rewrite patches in the shared page cache. Nothing may be written into the parent's heap: it prints
 * how many heap bytes changed. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void) {
    const unsigned long page = 4096;
    int fd = open("/lib/i386-linux-gnu/libc.so.6", O_RDONLY);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb)) return 2;
    unsigned long length = (sb.st_size + page - 1) & ~(page - 1);
    char *start = (char *)(((unsigned long)sbrk(0) + page - 1) & ~(page - 1));
    if (brk(start + length)) return 3;
    if (mmap(start, length, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_FIXED, fd, 0) != start) return 4;
    if (brk(start)) return 5;
    if (brk(start + length)) return 6;
    memset(start, 0x65, length);
    pid_t pid = fork();
    if (pid == 0) {
        char *argv[] = {"/bin/ls", "/nonexistent", NULL};
        execv(argv[0], argv);
        _exit(127);
    }
    int status;
    waitpid(pid, &status, 0);
    unsigned long changed = 0;
    for (unsigned long i = 0; i < length; i++)
        changed += start[i] != 0x65;
    printf("ls exit %d, heap bytes changed: %lu\n", WEXITSTATUS(status), changed);
    return changed != 0;
}
