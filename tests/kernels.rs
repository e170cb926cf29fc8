//! The CUDA kernels of `kernels/` compile with NVRTC for every supported architecture, without a
//! GPU (feature `nccl`). CI installs PyPI's `nvidia-cuda-nvrtc-cu12` wheel; without NVRTC each test
//! says it is skipped. Running the kernels against the CPU codecs needs a GPU (the GPU check).
#![cfg(feature = "nccl")]

use std::path::PathBuf;

use burnrun::env::LibrarySearch;
use burnrun::kernels::{candidates, KernelError, KernelSource, Nvrtc, ARCHITECTURES, SOURCES};

fn nvrtc_or_skip(test: &str) -> Option<&'static Nvrtc> {
    match Nvrtc::get() {
        Ok(nvrtc) => Some(nvrtc),
        Err(e) => {
            eprintln!("{test}: skipped: {e}");
            None
        }
    }
}

#[test]
fn every_kernel_compiles_to_ptx_for_every_architecture_with_its_entries_and_conversions() {
    let Some(nvrtc) = nvrtc_or_skip("every_kernel_compiles") else {
        return;
    };
    eprintln!("NVRTC {:?} from {}", nvrtc.version(), nvrtc.path.display());
    for kernel in &SOURCES {
        for arch in ARCHITECTURES {
            let ptx = nvrtc.compile(kernel, arch).unwrap_or_else(|e| panic!("{e}"));
            let target = arch.replace("compute_", "sm_");
            assert!(
                ptx.text.contains(&format!(".target {target}")),
                "{} {arch}",
                kernel.file
            );
            for entry in kernel.entries {
                assert!(
                    ptx.text.contains(&format!(".entry {entry}(")),
                    "{} for {arch} lacks the entry {entry}",
                    kernel.file
                );
            }
        }
    }
    // The casts are the hardware's round-to-nearest-even conversions, not a software emulation.
    let cast = nvrtc.compile(&SOURCES[0], "compute_90").unwrap();
    assert!(cast.text.contains("cvt.rn.bf16.f32") && cast.text.contains("cvt.rn.f16.f32"));
}

#[test]
fn a_kernel_that_does_not_compile_is_an_error_with_nvrtcs_log_naming_the_line() {
    let Some(nvrtc) = nvrtc_or_skip("a_kernel_that_does_not_compile") else {
        return;
    };
    let broken = KernelSource {
        file: "broken.cu",
        source: "extern \"C\" __global__ void broken(float* x) {\n    x[0] = undefined_name;\n}\n",
        entries: &["broken"],
    };
    match nvrtc.compile(&broken, "compute_90") {
        Err(e @ KernelError::Compile { .. }) => {
            let text = e.to_string();
            assert!(text.contains("broken.cu") && text.contains("undefined_name"), "{text}");
            assert!(text.contains("broken.cu(2)"), "the log names the line: {text}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn nvrtc_is_searched_in_nvrtc_library_then_ld_library_path_then_cuda_then_the_wheels() {
    let search = LibrarySearch {
        nvrtc_library: Some(PathBuf::from("/opt/nvrtc/libnvrtc.so.12")),
        ld_library_path: vec![PathBuf::from("/opt/ld")],
        ..LibrarySearch::default()
    };
    let list = candidates(&search);
    let at = |p: &str| {
        list.iter()
            .position(|c| c == &PathBuf::from(p))
            .unwrap_or_else(|| panic!("{p}: {list:?}"))
    };
    assert!(at("/opt/nvrtc/libnvrtc.so.12") < at("/opt/ld/libnvrtc.so.12"));
    assert!(at("/opt/ld/libnvrtc.so.12") < at("/usr/local/cuda/lib64/libnvrtc.so.12"));
    assert!(at("/usr/local/cuda/lib64/libnvrtc.so.12") < at("libnvrtc.so.12"));
}
