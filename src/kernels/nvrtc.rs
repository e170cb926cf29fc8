//! NVRTC, the CUDA runtime compiler, found where users have it and loaded at run time: the CUDA
//! toolkit, or PyPI's `nvidia-cuda-nvrtc-cu12`/`-cu13` wheels (which PyTorch installs). NVRTC
//! loads its builtins library (`libnvrtc-builtins.so.*`) by name; from a wheel that folder is not
//! on the loader's path, so the builtins beside the library are loaded first, by path, and the
//! later by-name load finds them already there.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::env::LibrarySearch;

use super::error::KernelError;
use super::KernelSource;

/// The library names tried in each folder, newest first.
const NAMES: [&str; 3] = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

type Program = *mut c_void;
type Version = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type CreateProgram = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileProgram = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
type GetSize = unsafe extern "C" fn(Program, *mut usize) -> c_int;
type GetText = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
type DestroyProgram = unsafe extern "C" fn(*mut Program) -> c_int;

/// NVRTC's functions, resolved from the loaded library.
pub struct Nvrtc {
    /// Where the library was loaded from.
    pub path: PathBuf,
    _builtins: Vec<libloading::Library>,
    _library: libloading::Library,
    version: Version,
    error_string: ErrorString,
    create_program: CreateProgram,
    compile_program: CompileProgram,
    get_ptx_size: GetSize,
    get_ptx: GetText,
    get_log_size: GetSize,
    get_log: GetText,
    destroy_program: DestroyProgram,
}

impl std::fmt::Debug for Nvrtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvrtc")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A kernel compiled to PTX for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ptx {
    /// The kernel file.
    pub file: &'static str,
    /// The virtual architecture (`compute_90`).
    pub arch: &'static str,
    /// The PTX text.
    pub text: String,
}

impl Nvrtc {
    /// The process's NVRTC, found and loaded on first use.
    pub fn get() -> Result<&'static Nvrtc, KernelError> {
        static LOADED: OnceLock<Result<Nvrtc, KernelError>> = OnceLock::new();
        LOADED
            .get_or_init(|| Nvrtc::find(&LibrarySearch::from_env()))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Finds NVRTC where `search` says and loads the first candidate that loads.
    pub fn find(search: &LibrarySearch) -> Result<Nvrtc, KernelError> {
        let (mut looked, mut failures) = (Vec::new(), Vec::new());
        for candidate in candidates(search) {
            let shown = candidate.display().to_string();
            if candidate.components().count() > 1 && !candidate.exists() {
                looked.push(shown);
                continue;
            }
            match Self::load(&candidate) {
                Ok(nvrtc) => return Ok(nvrtc),
                Err(e) => failures.push(e.to_string()),
            }
            looked.push(shown);
        }
        Err(KernelError::LibraryNotFound { looked, failures })
    }

    /// Loads the library at `path`, after the builtins library beside it.
    pub fn load(path: &Path) -> Result<Nvrtc, KernelError> {
        let load_err = |why: String| KernelError::Load {
            path: path.display().to_string(),
            why,
        };
        let mut builtins = Vec::new();
        if let Some(folder) = path.parent().filter(|f| !f.as_os_str().is_empty()) {
            for entry in std::fs::read_dir(folder).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with("libnvrtc-builtins.so") {
                    // SAFETY: the builtins library only registers NVRTC's built-in headers.
                    if let Ok(lib) = unsafe { libloading::Library::new(entry.path()) } {
                        builtins.push(lib);
                    }
                }
            }
        }
        // SAFETY: loading NVRTC runs its initialisers, which only set up its own state.
        let library = unsafe { libloading::Library::new(path) }.map_err(|e| load_err(e.to_string()))?;
        macro_rules! symbol {
            ($name:literal) => {{
                // SAFETY: the symbol is NVRTC's function of that name, whose C signature the type
                // it is assigned to repeats (nvrtc.h).
                let f = unsafe { library.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|_| load_err(format!("no `{}`", $name)))?;
                *f
            }};
        }
        Ok(Nvrtc {
            version: symbol!("nvrtcVersion"),
            error_string: symbol!("nvrtcGetErrorString"),
            create_program: symbol!("nvrtcCreateProgram"),
            compile_program: symbol!("nvrtcCompileProgram"),
            get_ptx_size: symbol!("nvrtcGetPTXSize"),
            get_ptx: symbol!("nvrtcGetPTX"),
            get_log_size: symbol!("nvrtcGetProgramLogSize"),
            get_log: symbol!("nvrtcGetProgramLog"),
            destroy_program: symbol!("nvrtcDestroyProgram"),
            path: path.to_path_buf(),
            _builtins: builtins,
            _library: library,
        })
    }

    /// NVRTC's version, `(major, minor)` (the CUDA version it belongs to).
    pub fn version(&self) -> (i32, i32) {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: nvrtcVersion writes two ints through valid pointers.
        unsafe { (self.version)(&mut major, &mut minor) };
        (major, minor)
    }

    /// Compiles `kernel` to PTX for `arch` (a virtual architecture, `compute_90`).
    pub fn compile(&self, kernel: &KernelSource, arch: &'static str) -> Result<Ptx, KernelError> {
        let call_err = |call: &'static str, code: c_int| KernelError::Call {
            call,
            file: kernel.file.to_string(),
            arch: arch.to_string(),
            message: self.message(code),
        };
        // Invariant: the sources and names are ours and hold no NUL byte.
        let source = CString::new(kernel.source).expect("a kernel source without NUL");
        let name = CString::new(kernel.file).expect("a file name without NUL");
        let options: Vec<CString> = [format!("--gpu-architecture={arch}"), "--std=c++17".to_string()]
            .into_iter()
            .map(|o| CString::new(o).expect("an option without NUL"))
            .collect();
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        let mut program: Program = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; no headers are passed (count 0, nulls).
        let code = unsafe {
            (self.create_program)(
                &mut program,
                source.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if code != 0 {
            return Err(call_err("nvrtcCreateProgram", code));
        }
        let guard = ProgramGuard { nvrtc: self, program };
        // SAFETY: the program is alive (guard); the options outlive the call.
        let code = unsafe { (self.compile_program)(program, option_ptrs.len() as c_int, option_ptrs.as_ptr()) };
        if code != 0 {
            let log = self
                .text(program, self.get_log_size, self.get_log)
                .unwrap_or_else(|| self.message(code));
            return Err(KernelError::Compile {
                file: kernel.file.to_string(),
                arch: arch.to_string(),
                log,
            });
        }
        let text = self
            .text(program, self.get_ptx_size, self.get_ptx)
            .ok_or_else(|| call_err("nvrtcGetPTX", -1))?;
        drop(guard);
        Ok(Ptx {
            file: kernel.file,
            arch,
            text,
        })
    }

    /// A text NVRTC holds for `program` (its PTX or its log), through its size and copy calls.
    fn text(&self, program: Program, size: GetSize, copy: GetText) -> Option<String> {
        let mut len = 0usize;
        // SAFETY: the program is alive; NVRTC writes the size.
        if unsafe { size(program, &mut len) } != 0 {
            return None;
        }
        let mut buffer = vec![0u8; len.max(1)];
        // SAFETY: the buffer holds the `len` bytes NVRTC said it writes (NUL included).
        if unsafe { copy(program, buffer.as_mut_ptr().cast()) } != 0 {
            return None;
        }
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        Some(String::from_utf8_lossy(&buffer[..end]).into_owned())
    }

    fn message(&self, code: c_int) -> String {
        // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for any code.
        let text = unsafe { (self.error_string)(code) };
        if text.is_null() {
            return format!("NVRTC error {code}");
        }
        // SAFETY: not null, NUL-terminated, static.
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    }
}

/// Destroys an NVRTC program when dropped.
struct ProgramGuard<'a> {
    nvrtc: &'a Nvrtc,
    program: Program,
}

impl Drop for ProgramGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once.
        let _ = unsafe { (self.nvrtc.destroy_program)(&mut self.program) };
    }
}

/// Where to try, in order: `NVRTC_LIBRARY` (a file, or a folder), the folders of
/// `LD_LIBRARY_PATH`, a CUDA install, the wheels in the Python environments (`nvidia/cu13/lib`,
/// `nvidia/cuda_nvrtc/lib`), then the loader's own search by name.
pub fn candidates(search: &LibrarySearch) -> Vec<PathBuf> {
    let mut folders: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    if let Some(given) = &search.nvrtc_library {
        if given.is_dir() {
            folders.push(given.clone());
        } else {
            out.push(given.clone());
        }
    }
    folders.extend(search.ld_library_path.iter().cloned());
    folders.push(PathBuf::from("/usr/local/cuda/lib64"));
    for site in search.site_packages() {
        folders.push(site.join("nvidia/cu13/lib"));
        folders.push(site.join("nvidia/cuda_nvrtc/lib"));
    }
    for folder in folders {
        out.extend(NAMES.iter().map(|name| folder.join(name)));
    }
    out.extend(NAMES.iter().map(PathBuf::from));
    out
}
