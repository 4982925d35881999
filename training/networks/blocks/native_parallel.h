/* Running one function on several parts of the work at once, for the native kernels.
 *
 * OpenMP when built with -fopenmp against torch's own runtime (same soname, already
 * loaded: its threads are the ones that spin between torch's parallel ops, so they take
 * these parts at once; see native_build.py), else POSIX threads (a second OpenMP runtime
 * in the process would fight torch's). Part 0 runs on the calling thread.
 */
#ifndef NAPARI_DMOE_NATIVE_PARALLEL_H
#define NAPARI_DMOE_NATIVE_PARALLEL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_THREADS 256

/* The part count for `threads` threads and `items` items: 1 .. MAX_THREADS, <= items. */
static inline int64_t part_count(int64_t threads, int64_t items) {
    int64_t n = threads < 1 ? 1 : threads;
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (n > items) n = items > 0 ? items : 1;
    return n;
}

/* fn(parts + i * size) for i < n, in parallel; returns when all are done. */
static void run_parallel(void *(*fn)(void *), void *parts, size_t size, int64_t n) {
    char *base = parts;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n) schedule(static, 1)
    for (int64_t i = 0; i < n; ++i) fn(base + i * size);
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int64_t i = 1; i < n; ++i) {
        started[i] = pthread_create(&ids[i], NULL, fn, base + i * size) == 0;
        if (!started[i]) fn(base + i * size);
    }
    fn(base);
    for (int64_t i = 1; i < n; ++i)
        if (started[i]) pthread_join(ids[i], NULL);
#endif
}

#endif
