// Top-k sparsification on the GPU, with error feedback: element for element what
// src/compress/topk.rs (TopK) computes, and src/kernels/reference.rs repeats in Rust.
//
// Selection. Element i of x = grad + residual has the key (|x_i|, -i): magnitude first (the bits of
// |x|, which order as f32::total_cmp orders magnitudes, NaN above inf), then the lower index. Keys
// are distinct, so "the k largest keys" is exactly the CPU codec's choice, ties included. A
// threshold (magnitude, last_tie) selects every element with a larger magnitude, and those of equal
// magnitude up to index last_tie; the host bisects it with count_selected (one number back per
// probe) until exactly k are selected, then gather_selected takes them as (index, value) pairs, in
// no particular order. After the all-gather, and only when every gathered value is finite,
// residual_topk keeps in the residual what was not sent. scatter_add sums one rank's pairs into
// the dense result; the host launches it rank after rank (the CPU codec's order) and divides.
//
// A null residual is a codec without error feedback (x = grad). Arithmetic goes through the _rn
// intrinsics (no FMA contraction). One atomic per warp in the counts: block sizes are multiples
// of 32.

__device__ __forceinline__ float input(const float* grad, const float* residual, unsigned long long i) {
    return residual ? __fadd_rn(grad[i], residual[i]) : grad[i];
}

__device__ __forceinline__ bool selected(float x, unsigned long long i, unsigned int magnitude,
                                         unsigned int last_tie) {
    unsigned int m = __float_as_uint(x) & 0x7fffffffu;
    return m > magnitude || (m == magnitude && i <= last_tie);
}

__device__ __forceinline__ void count_warp(bool hit, unsigned long long* count) {
    unsigned int votes = __ballot_sync(0xffffffffu, hit);
    if ((threadIdx.x & 31) == 0 && votes != 0) atomicAdd(count, (unsigned long long)__popc(votes));
}

// How many elements the threshold selects, added to *count.
extern "C" __global__ void count_selected(const float* grad, const float* residual, unsigned long long n,
                                          unsigned int magnitude, unsigned int last_tie,
                                          unsigned long long* count) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    count_warp(i < n && selected(input(grad, residual, i), i, magnitude, last_tie), count);
}

// Every selected element as (index, value) into the next free slot (*cursor counts them all, also
// those past `capacity`, which are not written); the residual is not touched.
extern "C" __global__ void gather_selected(const float* grad, const float* residual, unsigned long long n,
                                           unsigned int magnitude, unsigned int last_tie,
                                           unsigned long long* cursor, unsigned long long capacity,
                                           unsigned int* indices, float* values) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = input(grad, residual, i);
    if (!selected(x, i, magnitude, last_tie)) return;
    unsigned long long slot = atomicAdd(cursor, 1ULL);
    if (slot < capacity) {
        indices[slot] = (unsigned int)i;
        values[slot] = x;
    }
}

// The residual after a finite step: 0 where the element was sent, grad + residual elsewhere.
extern "C" __global__ void residual_topk(const float* grad, float* residual, unsigned long long n,
                                         unsigned int magnitude, unsigned int last_tie) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = __fadd_rn(grad[i], residual[i]);
    residual[i] = selected(x, i, magnitude, last_tie) ? 0.0f : x;
}

// How many of the k gathered indices are not below n, added to *count (checked before any
// scatter_add, so a corrupt payload writes nothing).
extern "C" __global__ void count_out_of_range(const unsigned int* indices, unsigned long long k,
                                              unsigned long long n, unsigned long long* count) {
    unsigned long long j = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    count_warp(j < k && indices[j] >= n, count);
}

// How many of n f32 values are inf or NaN, added to *count.
extern "C" __global__ void count_nonfinite(const float* values, unsigned long long n, unsigned long long* count) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    count_warp(i < n && (__float_as_uint(values[i]) & 0x7f800000u) == 0x7f800000u, count);
}

// out[index] += value for one rank's k pairs. A rank's indices are distinct (gather_selected takes
// each element once), so no two threads touch one element and the sum is the plain f32 addition of
// the CPU codec; an index not below n is skipped (count_out_of_range refuses it first).
extern "C" __global__ void scatter_add(const unsigned int* indices, const float* values, unsigned long long k,
                                       float* out, unsigned long long n) {
    unsigned long long j = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (j >= k) return;
    unsigned int index = indices[j];
    if (index < n) out[index] = __fadd_rn(out[index], values[j]);
}

// values /= divisor (the sum of the ranks' pairs into their average), correctly rounded.
extern "C" __global__ void divide(float* values, unsigned long long n, float divisor) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    values[i] = __fdiv_rn(values[i], divisor);
}
