//! NVRTC, loaded at run time (cudarc's dynamic loading): compiles a
//! kernel's CUDA C (`compiler::kernel::cuda`) to a cubin for one GPU
//! architecture. It needs no GPU and no driver, so every generated kernel
//! is compile-checked on machines without one (CI installs NVRTC with
//! `pip install nvidia-cuda-nvrtc==13.0.*`).

use cudarc::nvrtc::{result, sys};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// What to do when NVRTC is not found.
pub const MISSING: &str = "NVRTC (libnvrtc.so.13) is not installed or not on the library path: run `pip install \
                           nvidia-cuda-nvrtc==13.0.*` and add its `lib` folder (`python3 -c \"import nvidia.cu13; \
                           print(list(nvidia.cu13.__path__)[0] + '/lib')\"`) to LD_LIBRARY_PATH, or run the tests \
                           with `tools/test`, which does both";

/// Whether NVRTC can be loaded, else the error that says how to get it
/// (looked up once per process).
pub fn available() -> Result<(), String> {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: only tries to open the library by its candidate names.
    if *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() }) { Ok(()) } else { Err(MISSING.to_string()) }
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32), String> {
    available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked); two out-parameters.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {r:?}"));
    }
    Ok((major, minor))
}

/// Compile `source` (one translation unit named `name`) to a cubin for
/// `arch` (`sm_80`, `sm_90`). A compile error returns NVRTC's log.
pub fn compile(source: &str, name: &str, arch: &str) -> Result<Vec<u8>, String> {
    available()?;
    let src = CString::new(source).map_err(|_| "CUDA source with a NUL byte".to_string())?;
    let file = CString::new(format!("{name}.cu")).map_err(|_| "a kernel name with a NUL byte".to_string())?;
    let prog = result::create_program(&src, Some(&file)).map_err(|e| format!("nvrtcCreateProgram: {e:?}"))?;
    let options = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    // SAFETY: `prog` is a live program until destroyed below, on every path.
    unsafe {
        let out = match result::compile_program(prog, &options) {
            Ok(()) => cubin(prog),
            Err(_) => {
                let log = result::get_program_log(prog).map(|l| text(&l)).unwrap_or_default();
                Err(format!("NVRTC could not compile `{name}` for {arch}:\n{log}"))
            }
        };
        let _ = result::destroy_program(prog);
        out
    }
}

/// The cubin of a compiled program.
///
/// # Safety
/// `prog` must be a live program that compiled for a real architecture.
unsafe fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    let mut n = 0usize;
    // SAFETY: the caller's contract; one out-parameter.
    let r = unsafe { sys::nvrtcGetCUBINSize(prog, &mut n) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS || n == 0 {
        return Err(format!("nvrtcGetCUBINSize: {r:?} ({n} bytes)"));
    }
    let mut buf = vec![0u8; n];
    // SAFETY: `buf` holds the `n` bytes NVRTC said it writes.
    let r = unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcGetCUBIN: {r:?}"));
    }
    Ok(buf)
}

/// A C string buffer (NUL-terminated) as text.
fn text(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Where compiled kernels are kept: `$TESSERA_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/tessera/kernels`, else `~/.cache/tessera/kernels`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TESSERA_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("tessera").join("kernels")
}

/// Where the cubin of `source` for `arch` is kept in `dir`: named by the
/// SHA-256 of the source, the architecture and NVRTC's version, so an
/// edited kernel, another GPU or another compiler never reads a stale one.
pub fn cache_path(dir: &Path, source: &str, arch: &str) -> Result<PathBuf, String> {
    use sha2::Digest;
    let (major, minor) = version()?;
    let hash: String = sha2::Sha256::digest(source.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    Ok(dir.join(format!("{hash}-{arch}-nvrtc{major}.{minor}.cubin")))
}

/// [`compile`], through the cache in `dir`: a cubin compiled before for the
/// same source, architecture and NVRTC is read back; a new one is written
/// atomically (a temporary file, then a rename), so a crash never leaves a
/// torn cubin. Returns the cubin and whether it came from the cache. A
/// cache that cannot be written is not an error: the cubin is compiled.
pub fn compile_cached(source: &str, name: &str, arch: &str, dir: &Path) -> Result<(Vec<u8>, bool), String> {
    let path = cache_path(dir, source, arch)?;
    if let Ok(cubin) = std::fs::read(&path)
        && !cubin.is_empty()
    {
        return Ok((cubin, true));
    }
    let cubin = compile(source, name, arch)?;
    if std::fs::create_dir_all(dir).is_ok() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &cubin).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok((cubin, false))
}
