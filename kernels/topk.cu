// Top-k sparsification's hot loops on the GPU, with error feedback. The threshold (the k-th
// largest magnitude) is found by bisection on the host over count_at_least, which needs one
// number back per probe; gather_at_least then takes every element at or above it.
// CPU reference: src/compress/topk.rs (TopK with error feedback).

// How many of grad + residual have a magnitude of at least `threshold`.
extern "C" __global__ void count_at_least(const float* grad, const float* residual, unsigned long long n,
                                          float threshold, unsigned long long* count) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (fabsf(grad[i] + residual[i]) >= threshold) atomicAdd(count, 1ULL);
}

// Takes every element of grad + residual with a magnitude of at least `threshold` (up to
// `capacity`, in any order) as (index, value) and zeroes its residual; every other element's
// value stays in the residual for the next step.
extern "C" __global__ void gather_at_least(const float* grad, float* residual, unsigned long long n,
                                           float threshold, unsigned long long* cursor,
                                           unsigned long long capacity, unsigned int* indices,
                                           float* values) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float value = grad[i] + residual[i];
    if (fabsf(value) >= threshold) {
        unsigned long long slot = atomicAdd(cursor, 1ULL);
        if (slot < capacity) {
            indices[slot] = (unsigned int)i;
            values[slot] = value;
            residual[i] = 0.0f;
            return;
        }
    }
    residual[i] = value;
}
