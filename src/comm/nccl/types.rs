//! burnrun's element types and reductions as NCCL's enums (`ncclDataType_t`, `ncclRedOp_t`).

use std::ffi::c_int;

use crate::comm::{DType, ReduceOp};

/// `ncclDataType_t` of `dtype`: every type burnrun's collectives carry has one.
pub fn nccl_dtype(dtype: DType) -> c_int {
    // nccl.h: ncclInt8 0, ncclUint8 1, ncclInt32 2, ncclUint32 3, ncclInt64 4, ncclUint64 5,
    // ncclFloat16 6, ncclFloat32 7, ncclFloat64 8, ncclBfloat16 9 (since 2.10).
    match dtype {
        DType::U8 => 1,
        DType::I32 => 2,
        DType::I64 => 4,
        DType::F16 => 6,
        DType::F32 => 7,
        DType::F64 => 8,
        DType::BF16 => 9,
    }
}

/// `ncclRedOp_t` of `op`.
pub fn nccl_op(op: ReduceOp) -> c_int {
    // nccl.h: ncclSum 0, ncclProd 1, ncclMax 2, ncclMin 3, ncclAvg 4 (since 2.10).
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Prod => 1,
        ReduceOp::Max => 2,
        ReduceOp::Min => 3,
        ReduceOp::Avg => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_maps_to_its_own_nccl_type() {
        let all = [
            DType::U8,
            DType::I32,
            DType::I64,
            DType::F16,
            DType::F32,
            DType::F64,
            DType::BF16,
        ];
        let mut codes: Vec<c_int> = all.iter().map(|&d| nccl_dtype(d)).collect();
        assert_eq!(codes, [1, 2, 4, 6, 7, 8, 9]);
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }

    #[test]
    fn every_reduction_maps_to_nccls() {
        let ops = [
            ReduceOp::Sum,
            ReduceOp::Prod,
            ReduceOp::Max,
            ReduceOp::Min,
            ReduceOp::Avg,
        ];
        assert_eq!(ops.map(nccl_op), [0, 1, 2, 3, 4]);
    }
}
