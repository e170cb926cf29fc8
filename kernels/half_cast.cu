// Gradient compression's half casts on the GPU, with error feedback: f32 gradients to a 16-bit wire
// format and back. Element for element what src/compress/half_cast.rs (HalfCast) computes, and
// src/kernels/reference.rs repeats in Rust:
//   cast:     out = half((grad + residual) / world)            (round to nearest even)
//   widen:    out = f32(in)                                    (exact)
//   residual: residual = (grad + residual) - f32(sent) * world (after the all-reduce, when finite)
// The residual is updated by its own kernel, once the reduced sum is known to be finite, as the CPU
// codec commits it only then; `sent` is this rank's own cast output, kept beside the reduced copy.
// A null residual is a codec without error feedback: the input is the gradient alone (not
// grad + 0, which would turn -0 into +0). Arithmetic goes through the _rn intrinsics, which the
// compiler never contracts into FMAs, so every operation rounds once, as in Rust. No headers: the
// conversions are PTX's own cvt instructions (bf16 needs sm_80).

__device__ __forceinline__ float input(const float* grad, const float* residual, unsigned long long i) {
    return residual ? __fadd_rn(grad[i], residual[i]) : grad[i];
}

__device__ __forceinline__ unsigned short to_bf16(float value) {
    unsigned short half;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(half) : "f"(value));
    return half;
}

__device__ __forceinline__ unsigned short to_f16(float value) {
    unsigned short half;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(half) : "f"(value));
    return half;
}

__device__ __forceinline__ float from_bf16(unsigned short half) {
    return __uint_as_float(((unsigned int)half) << 16);  // bf16 is f32's top half
}

__device__ __forceinline__ float from_f16(unsigned short half) {
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(half));
    return value;
}

extern "C" __global__ void cast_bf16(const float* grad, const float* residual, unsigned short* out,
                                     unsigned long long n, float world) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = to_bf16(__fdiv_rn(input(grad, residual, i), world));
}

extern "C" __global__ void cast_f16(const float* grad, const float* residual, unsigned short* out,
                                    unsigned long long n, float world) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = to_f16(__fdiv_rn(input(grad, residual, i), world));
}

// The sum of the ranks' halves comes back as 16-bit values: widen them into the f32 gradient.
extern "C" __global__ void widen_bf16(const unsigned short* in, float* out, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = from_bf16(in[i]);
}

extern "C" __global__ void widen_f16(const unsigned short* in, float* out, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = from_f16(in[i]);
}

// What the cast lost stays for the next step: residual = (grad + residual) - sent * world.
extern "C" __global__ void residual_bf16(const float* grad, float* residual, const unsigned short* sent,
                                         unsigned long long n, float world) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    residual[i] = __fsub_rn(__fadd_rn(grad[i], residual[i]), __fmul_rn(from_bf16(sent[i]), world));
}

extern "C" __global__ void residual_f16(const float* grad, float* residual, const unsigned short* sent,
                                        unsigned long long n, float world) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    residual[i] = __fsub_rn(__fadd_rn(grad[i], residual[i]), __fmul_rn(from_f16(sent[i]), world));
}

// How many 16-bit values are inf or NaN (all exponent bits set: 0x7F80 for bf16, 0x7C00 for f16),
// added to *count: the codec commits the residual only when the reduced sum has none. One atomic
// per warp; the block size must be a multiple of 32.
extern "C" __global__ void count_nonfinite_half(const unsigned short* in, unsigned long long n,
                                                unsigned int exponent, unsigned long long* count) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    bool bad = i < n && (in[i] & exponent) == exponent;
    unsigned int votes = __ballot_sync(0xffffffffu, bad);
    if ((threadIdx.x & 31) == 0 && votes != 0) atomicAdd(count, (unsigned long long)__popc(votes));
}
