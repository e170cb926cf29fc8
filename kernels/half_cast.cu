// Gradient compression's hot loop on the GPU: cast f32 gradients to a 16-bit wire format with error
// feedback. Each element adds the residual left from the previous step, is rounded to nearest even,
// and what the rounding lost becomes the new residual, so nothing is lost over steps.
// CPU reference: src/compress/half_cast.rs (HalfCast with error feedback). No headers: the
// conversions are PTX's own cvt instructions (bf16 needs sm_80).

extern "C" __global__ void cast_bf16_ef(const float* grad, float* residual, unsigned short* out,
                                        unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float value = grad[i] + residual[i];
    unsigned short half;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(half) : "f"(value));
    float back = __uint_as_float(((unsigned int)half) << 16);  // bf16 is f32's top half
    residual[i] = value - back;
    out[i] = half;
}

extern "C" __global__ void cast_f16_ef(const float* grad, float* residual, unsigned short* out,
                                       unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float value = grad[i] + residual[i];
    unsigned short half;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(half) : "f"(value));
    float back;
    asm("cvt.f32.f16 %0, %1;" : "=f"(back) : "h"(half));
    residual[i] = value - back;
    out[i] = half;
}

// The sum of the ranks' halves comes back as 16-bit values: widen them into the f32 gradient.
extern "C" __global__ void widen_bf16(const unsigned short* in, float* out, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = __uint_as_float(((unsigned int)in[i]) << 16);
}

extern "C" __global__ void widen_f16(const unsigned short* in, float* out, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(in[i]));
    out[i] = value;
}
