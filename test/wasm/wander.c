/* A plain WASI program for the migration tests: it computes, prints and
 * sleeps, and keeps its state everywhere a C program does: in statics, on the
 * heap, in frames of a recursion on the shadow stack and in locals that live
 * across a sleep. Nothing in it knows it may move.
 *
 *   wander [rounds] [sleep_ms] [heap_mib] [spin]
 *
 * heap_mib fills that much heap with pseudo-random bytes (checkpoint sizes);
 * spin adds that many rounds of arithmetic without a host call to each round
 * (what the transform costs where a module never calls out).
 * Its output and exit code depend only on its arguments. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static unsigned long long total = 7;  /* a static */
static char *journal;                 /* the heap */
static unsigned char *ballast;
static size_t ballast_len;
static int sleep_us;
static long spin;

static unsigned long long mix(unsigned long long x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static unsigned long long descend(int depth, unsigned long long acc, int round) {
    char frame[48]; /* on the shadow stack, read again after the sleep below */
    snprintf(frame, sizeof frame, "r%d/d%d/%llx", round, depth, acc & 0xffff);
    if (depth == 0) {
        for (long i = 0; i < spin; i++)
            acc = acc * 2862933555777941757ULL + 3037000493ULL + (acc >> 29);
        size_t probe = ballast_len ? (size_t)(acc % ballast_len) : 0;
        printf("round %3d %-22s total=%020llu journal=%.12s ballast=%02x\n", round, frame, total,
               journal + (round % 8), ballast_len ? ballast[probe] : 0);
        fflush(stdout);
        usleep(sleep_us);
        return mix(acc) + (ballast_len ? ballast[probe] : 0);
    }
    unsigned long long below = descend(depth - 1, mix(acc + depth), round);
    return below + strlen(frame) * depth;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 20;
    sleep_us = (argc > 2 ? atoi(argv[2]) : 50) * 1000;
    ballast_len = (size_t)(argc > 3 ? atoi(argv[3]) : 0) * 1024 * 1024;
    spin = argc > 4 ? atol(argv[4]) : 0;
    journal = malloc(64);
    memset(journal, '.', 63);
    journal[63] = 0;
    if (ballast_len) {
        ballast = malloc(ballast_len);
        unsigned long long x = 12345;
        for (size_t i = 0; i < ballast_len; i++) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            ballast[i] = (unsigned char)(x >> 56);
        }
    }
    for (int r = 0; r < rounds; r++) {
        unsigned long long local = total + (unsigned long long)r; /* a local across the calls */
        total = descend(4, local, r) ^ local;
        journal[r % 20] = (char)('a' + total % 26);
    }
    printf("done total=%llu\n", total);
    fflush(stdout);
    free(journal);
    return (int)(total % 50) + 1;
}
