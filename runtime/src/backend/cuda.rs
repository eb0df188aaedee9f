//! The CUDA driver, loaded at run time (cudarc's dynamic loading): whether
//! this machine has an NVIDIA driver and a GPU, and which. The workspace
//! builds and runs without either; `--device cuda` asks here first and
//! stops with what is missing.

use cudarc::driver::{result, sys};

/// A GPU the driver found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub ordinal: i32,
    pub name: String,
    /// Compute capability (8, 0) for an A100, (9, 0) for an H100 or H200.
    pub capability: (i32, i32),
    pub memory_bytes: usize,
}

/// Every GPU of this machine, or why there is none: no driver library, a
/// driver that does not start, or no device.
pub fn gpus() -> Result<Vec<Gpu>, String> {
    // SAFETY: only tries to open the library by its candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err("no NVIDIA driver on this machine: the CUDA driver library (libcuda.so.1) was not found; \
                    install the NVIDIA driver, or train on the CPU (`--device cpu`, the default)"
            .into());
    }
    result::init().map_err(|e| {
        format!("the NVIDIA driver did not start ({e:?}): check `nvidia-smi`, or train on the CPU (`--device cpu`)")
    })?;
    let n = result::device::get_count().map_err(|e| format!("the driver could not count GPUs ({e:?})"))?;
    if n == 0 {
        return Err("the NVIDIA driver found no GPU (check CUDA_VISIBLE_DEVICES and `nvidia-smi`), or train on the \
                    CPU (`--device cpu`)"
            .into());
    }
    (0..n)
        .map(|ordinal| {
            let dev = result::device::get(ordinal).map_err(|e| format!("GPU {ordinal}: {e:?}"))?;
            let name = result::device::get_name(dev).map_err(|e| format!("GPU {ordinal}: {e:?}"))?;
            let attr = |a| {
                // SAFETY: `dev` is a device the driver returned; `a` a valid attribute.
                unsafe { result::device::get_attribute(dev, a) }.map_err(|e| format!("GPU {ordinal}: {e:?}"))
            };
            let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            // SAFETY: as above.
            let memory_bytes =
                unsafe { result::device::total_mem(dev) }.map_err(|e| format!("GPU {ordinal}: {e:?}"))?;
            Ok(Gpu { ordinal, name, capability: (major, minor), memory_bytes })
        })
        .collect()
}

/// Why `--device cuda` cannot train here: no usable GPU (what is missing),
/// or, with one, that the CUDA backend is not built yet.
pub fn why_not() -> String {
    match gpus() {
        Err(e) => e,
        Ok(gpus) => {
            let list: Vec<String> = gpus
                .iter()
                .map(|g| format!("{} {} (sm_{}{})", g.ordinal, g.name, g.capability.0, g.capability.1))
                .collect();
            format!(
                "found GPU {}, but Tessera's CUDA backend is not built yet (issue 13; docs/cuda.md): train on the \
                 CPU (`--device cpu`)",
                list.join(", ")
            )
        }
    }
}
