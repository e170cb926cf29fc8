/*
 * MPI all-reduce, measured the way `burnrun bench allreduce --json` measures (src/bench/collective.rs).
 *
 * For each size (--min-bytes, then times --step-factor while at most --max-bytes; sizes rounded to
 * whole elements, repeated counts timed once) every rank fills its buffer with burnrun's pattern,
 * runs --warmup untimed and, after an MPI_Barrier, --iters timed back-to-back
 *   MPI_Allreduce(MPI_IN_PLACE, buf, count, <dtype>, MPI_SUM, MPI_COMM_WORLD).
 * A rank's time is the mean of its timed iterations; the reported time is the slowest rank's (a MAX
 * all-reduce of the times), since a collective is done when its last rank is. cpu_us is the CPU
 * time of one all-reduce (CLOCK_PROCESS_CPUTIME_ID over the timed loop, divided by --iters) summed
 * over ranks. busbw = algbw * 2(n-1)/n (nccl-tests). Then the buffer is filled again, reduced once,
 * and each rank counts the elements that differ from the exact expected sum; the counts are summed.
 *
 * The data is burnrun's (src/bench/values.rs): element i of rank r is a hash of (r, i) folded to
 * 0..=min(255/n, 3), so every sum is a small exact integer in every dtype and results compare with ==.
 *
 * Rank 0 prints one JSON object a line, as `burnrun bench allreduce --json` does:
 *   {"op","bytes","dtype","ranks","time_us","algbw_gbps","busbw_gbps","wrong","cpu_us"}
 * and the program exits 1 if any element was wrong.
 *
 * Transport: OpenMPI picks it. On one node that is the shared-memory BTL `vader` (with its default
 * single-copy mechanism, CMA, left on: large messages are copied once with process_vm_readv);
 * `--mca btl tcp,self` forces TCP, which is what crosses hosts. benches/compare_allreduce.py and
 * benches/shaped_allreduce.sh build this file with `mpicc -O2` into a temporary directory.
 *
 *   mpicc -O2 -o /tmp/mpi_allreduce benches/mpi_allreduce.c
 *   mpirun --allow-run-as-root --oversubscribe -np 2 /tmp/mpi_allreduce --min-bytes 4 --max-bytes 256M --step-factor 4
 *
 * Options: --min-bytes B (default 4K), --max-bytes B (64M), --step-factor F (2), --iters N,
 * --warmup N, --dtype f32|f64|i32|i64|u8 (f32), --no-check. Sizes accept 4096, 4K, 1M, 64MiB, 1G
 * (powers of 1024), like burnrun's. Without --iters, the iterations follow burnrun's rule
 * (src/bench/options.rs): 1 GiB / size timed iterations, between 10 and 10000, after a tenth as
 * many warm-ups (at least 2).
 */
#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Largest sum over ranks that every dtype holds exactly (burnrun's EXACT_SUM_LIMIT). */
#define EXACT_SUM_LIMIT 255u
/* burnrun's automatic iterations: AUTO_ITER_BYTES / size, clamped to [MIN, MAX]. */
#define AUTO_ITER_BYTES ((size_t)1 << 30)
#define MIN_AUTO_ITERS 10
#define MAX_AUTO_ITERS 10000

struct dtype {
    const char *name;
    MPI_Datatype mpi;
    size_t size;
};

static const struct dtype DTYPES[] = {
    {"f32", MPI_FLOAT, 4}, {"f64", MPI_DOUBLE, 8}, {"i32", MPI_INT32_T, 4},
    {"i64", MPI_INT64_T, 8}, {"u8", MPI_UINT8_T, 1},
};

struct options {
    size_t min_bytes, max_bytes, step_factor;
    long iters, warmup; /* -1: by size, burnrun's rule */
    const struct dtype *dtype;
    int check;
};

static void fail(int rank, const char *what, const char *value)
{
    if (rank == 0)
        fprintf(stderr, "mpi_allreduce: %s%s%s\n", what, value ? ": " : "", value ? value : "");
    MPI_Abort(MPI_COMM_WORLD, 2);
    exit(2);
}

/* 4096, 4K, 4k, 4KB, 4KiB, 1M, 1G: powers of 1024, as burnrun's parse_size. 0 when malformed. */
static size_t parse_size(const char *text)
{
    char *end;
    while (isspace((unsigned char)*text))
        text++;
    if (!isdigit((unsigned char)*text))
        return 0;
    unsigned long long value = strtoull(text, &end, 10);
    char unit[8] = {0};
    size_t n = 0;
    for (; *end && n + 1 < sizeof unit; end++)
        if (!isspace((unsigned char)*end))
            unit[n++] = (char)tolower((unsigned char)*end);
    if (*end)
        return 0;
    int shift;
    if (!strcmp(unit, "") || !strcmp(unit, "b"))
        shift = 0;
    else if (!strcmp(unit, "k") || !strcmp(unit, "kb") || !strcmp(unit, "kib"))
        shift = 10;
    else if (!strcmp(unit, "m") || !strcmp(unit, "mb") || !strcmp(unit, "mib"))
        shift = 20;
    else if (!strcmp(unit, "g") || !strcmp(unit, "gb") || !strcmp(unit, "gib"))
        shift = 30;
    else
        return 0;
    if (value > (SIZE_MAX >> shift))
        return 0;
    return (size_t)value << shift;
}

static struct options parse_options(int argc, char **argv, int rank)
{
    struct options o = {4 << 10, 64 << 20, 2, -1, -1, &DTYPES[0], 1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--no-check")) {
            o.check = 0;
            continue;
        }
        if (!v)
            fail(rank, "missing value after", a);
        if (!strcmp(a, "--min-bytes") || !strcmp(a, "-b")) {
            if (!(o.min_bytes = parse_size(v)))
                fail(rank, "invalid --min-bytes (expected bytes or a number with K, M or G, at least 1)", v);
        } else if (!strcmp(a, "--max-bytes") || !strcmp(a, "-e")) {
            if (!(o.max_bytes = parse_size(v)))
                fail(rank, "invalid --max-bytes", v);
        } else if (!strcmp(a, "--step-factor") || !strcmp(a, "-f")) {
            o.step_factor = strtoul(v, NULL, 10);
            if (o.step_factor < 2)
                fail(rank, "--step-factor must be at least 2", v);
        } else if (!strcmp(a, "--iters") || !strcmp(a, "-n")) {
            o.iters = strtol(v, NULL, 10);
            if (o.iters < 1)
                fail(rank, "--iters must be at least 1", v);
        } else if (!strcmp(a, "--warmup") || !strcmp(a, "-w")) {
            o.warmup = strtol(v, NULL, 10);
            if (o.warmup < 0)
                fail(rank, "--warmup must be at least 0", v);
        } else if (!strcmp(a, "--dtype") || !strcmp(a, "-d")) {
            o.dtype = NULL;
            for (size_t k = 0; k < sizeof DTYPES / sizeof DTYPES[0]; k++)
                if (!strcmp(v, DTYPES[k].name))
                    o.dtype = &DTYPES[k];
            if (!o.dtype)
                fail(rank, "unknown --dtype (f32, f64, i32, i64, u8; MPI has no f16/bf16 sum)", v);
        } else {
            fail(rank, "unknown option", a);
        }
        i++;
    }
    if (o.min_bytes > o.max_bytes)
        fail(rank, "--min-bytes is above --max-bytes", NULL);
    return o;
}

/* burnrun's values: 0..=max_value(n), so a sum over n ranks is at most 255. */
static uint32_t max_value(int world_size)
{
    uint32_t m = EXACT_SUM_LIMIT / (uint32_t)(world_size > 1 ? world_size : 1);
    return m < 3 ? m : 3;
}

/* Element `index` of rank `rank`'s buffer: two odd multipliers spread rank and index over the word,
 * a xor-shift and a third multiply mix the high bits into the ones kept (burnrun's pattern). */
static uint32_t pattern(uint64_t rank, uint64_t index, uint32_t max)
{
    if (max == 0)
        return 0;
    uint64_t key = (index * 0x9e3779b97f4a7c15ull) ^ (rank * 0xc2b2ae3d27d4eb4full);
    uint64_t hashed = (key ^ (key >> 31)) * 0x94d049bb133111ebull;
    return (uint32_t)((hashed >> 32) % ((uint64_t)max + 1));
}

static void store(const struct dtype *t, void *buf, size_t i, uint32_t v)
{
    switch (t->mpi == MPI_FLOAT ? 0 : t->mpi == MPI_DOUBLE ? 1 : t->mpi == MPI_INT32_T ? 2 : t->mpi == MPI_INT64_T ? 3 : 4) {
    case 0: ((float *)buf)[i] = (float)v; break;
    case 1: ((double *)buf)[i] = (double)v; break;
    case 2: ((int32_t *)buf)[i] = (int32_t)v; break;
    case 3: ((int64_t *)buf)[i] = (int64_t)v; break;
    default: ((uint8_t *)buf)[i] = (uint8_t)v; break;
    }
}

static int equals(const struct dtype *t, const void *buf, size_t i, uint32_t v)
{
    if (t->mpi == MPI_FLOAT)
        return ((const float *)buf)[i] == (float)v;
    if (t->mpi == MPI_DOUBLE)
        return ((const double *)buf)[i] == (double)v;
    if (t->mpi == MPI_INT32_T)
        return ((const int32_t *)buf)[i] == (int32_t)v;
    if (t->mpi == MPI_INT64_T)
        return ((const int64_t *)buf)[i] == (int64_t)v;
    return ((const uint8_t *)buf)[i] == (uint8_t)v;
}

static void fill(const struct dtype *t, void *buf, size_t count, int rank, uint32_t max)
{
    for (size_t i = 0; i < count; i++)
        store(t, buf, i, pattern((uint64_t)rank, i, max));
}

static double seconds(clockid_t clock)
{
    struct timespec now;
    clock_gettime(clock, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static double round3(double x)
{
    return (double)llround(x * 1000.0) / 1000.0;
}

/* Timed and untimed iterations for a buffer of `bytes`: the options', or burnrun's rule. */
static void iterations(const struct options *o, size_t bytes, long *iters, long *warmup)
{
    long auto_iters = (long)(AUTO_ITER_BYTES / (bytes ? bytes : 1));
    if (auto_iters < MIN_AUTO_ITERS)
        auto_iters = MIN_AUTO_ITERS;
    if (auto_iters > MAX_AUTO_ITERS)
        auto_iters = MAX_AUTO_ITERS;
    *iters = o->iters >= 0 ? o->iters : auto_iters;
    *warmup = o->warmup >= 0 ? o->warmup : (*iters / 10 > 2 ? *iters / 10 : 2);
}

/* Times and checks one size; rank 0 prints its JSON line. Returns the wrong elements summed over
 * ranks (-1 when not checked). */
static long long measure(const struct options *o, size_t count, int rank, int n)
{
    const struct dtype *t = o->dtype;
    uint32_t max = max_value(n);
    void *buf = malloc(count * t->size);
    if (!buf)
        fail(rank, "out of memory", NULL);
    fill(t, buf, count, rank, max);
    long iters, warmup;
    iterations(o, count * t->size, &iters, &warmup);

    for (long i = 0; i < warmup; i++)
        MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, t->mpi, MPI_SUM, MPI_COMM_WORLD);
    MPI_Barrier(MPI_COMM_WORLD);
    double cpu_start = seconds(CLOCK_PROCESS_CPUTIME_ID);
    double start = seconds(CLOCK_MONOTONIC);
    for (long i = 0; i < iters; i++)
        MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, t->mpi, MPI_SUM, MPI_COMM_WORLD);
    double local_us = (seconds(CLOCK_MONOTONIC) - start) * 1e6 / (double)iters;
    double local_cpu_us = (seconds(CLOCK_PROCESS_CPUTIME_ID) - cpu_start) * 1e6 / (double)iters;
    double time_us, cpu_us;
    MPI_Allreduce(&local_us, &time_us, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    MPI_Allreduce(&local_cpu_us, &cpu_us, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);

    long long wrong = -1;
    if (o->check) {
        fill(t, buf, count, rank, max);
        MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, t->mpi, MPI_SUM, MPI_COMM_WORLD);
        long long local_wrong = 0;
        for (size_t i = 0; i < count; i++) {
            uint32_t expected = 0;
            for (int s = 0; s < n; s++)
                expected += pattern((uint64_t)s, i, max);
            local_wrong += !equals(t, buf, i, expected);
        }
        MPI_Allreduce(&local_wrong, &wrong, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
    }
    free(buf);

    if (rank == 0) {
        size_t bytes = count * t->size;
        double algbw = time_us > 0 ? (double)bytes / (time_us * 1e-6) / 1e9 : 0.0;
        double busbw = algbw * 2.0 * (n - 1) / n;
        char wrong_text[32];
        if (wrong < 0)
            snprintf(wrong_text, sizeof wrong_text, "null");
        else
            snprintf(wrong_text, sizeof wrong_text, "%lld", wrong);
        printf("{\"op\":\"allreduce\",\"bytes\":%zu,\"dtype\":\"%s\",\"ranks\":%d,\"time_us\":%.3f,"
               "\"algbw_gbps\":%.3f,\"busbw_gbps\":%.3f,\"wrong\":%s,\"cpu_us\":%.3f}\n",
               bytes, t->name, n, round3(time_us), round3(algbw), round3(busbw), wrong_text, round3(cpu_us));
        fflush(stdout);
    }
    return wrong;
}

int main(int argc, char **argv)
{
    int rank, n;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    struct options o = parse_options(argc, argv, rank);
    long long total_wrong = 0;
    size_t previous_count = 0;
    size_t bytes = o.min_bytes;
    for (;;) {
        size_t count = bytes / o.dtype->size;
        if (count == 0)
            count = 1;
        if (count > INT_MAX)
            fail(rank, "size too large for one MPI_Allreduce call (count above INT_MAX)", NULL);
        /* Sizes that round to the count just timed are timed once, as burnrun does. */
        if (count != previous_count) {
            long long wrong = measure(&o, count, rank, n);
            if (wrong > 0)
                total_wrong += wrong;
            previous_count = count;
        }
        if (bytes > o.max_bytes / o.step_factor)
            break;
        bytes *= o.step_factor;
    }
    MPI_Finalize();
    return total_wrong > 0 ? 1 : 0;
}
