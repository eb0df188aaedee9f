//! Accelerator profiles, as data: memory, dense peak rate per dtype, HBM
//! bandwidth, GPUs per node, NVLink bandwidth inside a node and the
//! interconnect (InfiniBand) bandwidth per GPU across nodes. `train.device`
//! names one; the checker validates the name, and the cost model and the
//! driver's memory check (`driver::check_memory`) read them.
//!
//! The built-in profiles are the TOML files in `compiler/devices/`, compiled
//! in. Users add their own: `TESSERA_DEVICES` lists TOML files or folders of
//! them (`:`-separated), each in the same format; a user profile with a
//! built-in's name replaces it.
//!
//! A profile's optional `[achievable]` table calibrates the cost model
//! (`cost::time`): the fraction of peak large matmuls and the attention core
//! reach, a fixed cost per kernel, the fractions of HBM and link bandwidth
//! achieved, and the latency of one collective step inside and across nodes.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One accelerator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    pub name: String,
    pub description: String,
    /// HBM capacity in bytes.
    pub memory: u64,
    /// Dense peak rates, FLOP/s, by dtype (`bf16`, `fp16`, `fp8`, `tf32`, `fp32`).
    pub peak: BTreeMap<String, f64>,
    /// HBM bandwidth, bytes/s.
    pub hbm_bandwidth: f64,
    pub gpus_per_node: u32,
    /// NVLink bandwidth per GPU and direction, bytes/s.
    pub nvlink_bandwidth: f64,
    /// Interconnect (InfiniBand) bandwidth per GPU and direction, bytes/s.
    pub interconnect_bandwidth: f64,
    /// What the cost model assumes kernels and links achieve on it.
    pub achievable: Achievable,
    /// The file it came from (`None` for a built-in).
    pub source: Option<PathBuf>,
}

/// Achievable rates: the cost model's calibration for a device, the
/// `[achievable]` table of a profile. Every field has a default.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Achievable {
    /// Fraction of the dense peak a large matmul reaches.
    pub matmul: f64,
    /// Fraction of the dense peak the attention core (scores, softmax,
    /// values) reaches.
    pub attention: f64,
    /// Fixed cost of one matmul or attention kernel, microseconds (what
    /// makes small matmuls run below `matmul` of peak).
    pub kernel_us: f64,
    /// Fraction of the HBM bandwidth memory-bound kernels reach.
    pub hbm: f64,
    /// Fraction of the link bandwidths collectives reach (NCCL bus bandwidth).
    pub link: f64,
    /// Whether the attention core runs as one fused kernel whose score
    /// matrix stays on chip (FlashAttention). When false, the scores go
    /// through HBM: softmax and dropout read and write them.
    pub fused_attention: bool,
    /// Latency of one step of a collective inside a node, microseconds.
    pub nvlink_latency_us: f64,
    /// Latency of one step of a collective across nodes, microseconds.
    pub interconnect_latency_us: f64,
}

impl Default for Achievable {
    fn default() -> Achievable {
        Achievable {
            matmul: 0.8,
            attention: 0.5,
            kernel_us: 5.0,
            hbm: 0.8,
            link: 0.8,
            fused_attention: true,
            nvlink_latency_us: 5.0,
            interconnect_latency_us: 10.0,
        }
    }
}

impl Device {
    /// The dense peak rate for a dtype, FLOP/s.
    pub fn peak_flops(&self, dtype: &str) -> Option<f64> {
        self.peak.get(dtype).copied()
    }

    /// The dense bf16 peak, FLOP/s (0 when the profile has none).
    pub fn bf16_flops(&self) -> f64 {
        self.peak_flops("bf16").unwrap_or(0.0)
    }
}

/// A profile file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFile {
    name: String,
    description: Option<String>,
    memory_gib: f64,
    hbm_tb_s: f64,
    gpus_per_node: u32,
    nvlink_gb_s: f64,
    interconnect_gb_s: f64,
    peak_tflops: BTreeMap<String, f64>,
    #[serde(default)]
    achievable: Achievable,
}

const BUILT_IN: &[(&str, &str)] = &[
    ("a100_40gb.toml", include_str!("../devices/a100_40gb.toml")),
    ("a100_80gb.toml", include_str!("../devices/a100_80gb.toml")),
    ("h100_80gb.toml", include_str!("../devices/h100_80gb.toml")),
    ("h200_141gb.toml", include_str!("../devices/h200_141gb.toml")),
    ("v100_32gb.toml", include_str!("../devices/v100_32gb.toml")),
    ("cpu.toml", include_str!("../devices/cpu.toml")),
];

/// The dtypes a profile may give peak rates for.
pub const DTYPES: &[&str] = &["fp8", "bf16", "fp16", "tf32", "fp32"];

/// Parse one profile; errors name the file, line and column.
pub fn parse(text: &str, origin: &str) -> Result<Device, String> {
    let f: DeviceFile = toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let line = text[..s.start].matches('\n').count() + 1;
                let col = s.start - text[..s.start].rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                format!(":{line}:{col}")
            })
            .unwrap_or_default();
        format!("{origin}{at}: {}", e.message())
    })?;
    let bad = |what: &str| Err(format!("{origin}: `{what}` must be a positive number"));
    for (k, v) in [
        ("memory_gib", f.memory_gib),
        ("hbm_tb_s", f.hbm_tb_s),
        ("nvlink_gb_s", f.nvlink_gb_s),
        ("interconnect_gb_s", f.interconnect_gb_s),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return bad(k);
        }
    }
    if f.gpus_per_node == 0 {
        return bad("gpus_per_node");
    }
    let a = &f.achievable;
    for (k, v, max) in [
        ("matmul", a.matmul, 1.0),
        ("attention", a.attention, 1.0),
        ("hbm", a.hbm, 1.0),
        ("link", a.link, 1.0),
        ("kernel_us", a.kernel_us, f64::INFINITY),
        ("nvlink_latency_us", a.nvlink_latency_us, f64::INFINITY),
        ("interconnect_latency_us", a.interconnect_latency_us, f64::INFINITY),
    ] {
        let ok = v.is_finite() && v >= 0.0 && v <= max && (max == f64::INFINITY || v > 0.0);
        if !ok {
            let range = if max == 1.0 { "a fraction in (0, 1]" } else { "a number ≥ 0" };
            return Err(format!("{origin}: `achievable.{k}` must be {range}"));
        }
    }
    for (k, v) in &f.peak_tflops {
        if !DTYPES.contains(&k.as_str()) {
            return Err(format!("{origin}: unknown dtype `{k}` in [peak_tflops]; known: {}", DTYPES.join(", ")));
        }
        if !(v.is_finite() && *v > 0.0) {
            return bad(&format!("peak_tflops.{k}"));
        }
    }
    if f.name.is_empty() || !f.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("{origin}: `name` must be letters, digits and `_` (it is written `device = {}`)", f.name));
    }
    Ok(Device {
        description: f.description.unwrap_or_else(|| f.name.clone()),
        name: f.name,
        memory: (f.memory_gib * (1u64 << 30) as f64) as u64,
        peak: f.peak_tflops.into_iter().map(|(k, v)| (k, v * 1e12)).collect(),
        hbm_bandwidth: f.hbm_tb_s * 1e12,
        gpus_per_node: f.gpus_per_node,
        nvlink_bandwidth: f.nvlink_gb_s * 1e9,
        interconnect_bandwidth: f.interconnect_gb_s * 1e9,
        achievable: f.achievable,
        source: None,
    })
}

/// Profile files named by a `TESSERA_DEVICES` value: files, or folders of `.toml` files.
fn user_files(list: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in list.split(':').filter(|s| !s.is_empty()).map(Path::new) {
        if p.is_dir() {
            let mut files: Vec<PathBuf> =
                std::fs::read_dir(p).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
            files.retain(|f| f.extension().is_some_and(|e| e == "toml"));
            files.sort();
            out.extend(files);
        } else {
            out.push(p.to_path_buf());
        }
    }
    out
}

struct Registry {
    devices: Vec<Device>,
    errors: Vec<String>,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut devices: Vec<Device> = BUILT_IN
            .iter()
            .map(|(file, text)| parse(text, &format!("compiler/devices/{file}")).expect("built-in profiles parse"))
            .collect();
        let mut errors = Vec::new();
        for path in user_files(&std::env::var("TESSERA_DEVICES").unwrap_or_default()) {
            let origin = path.display().to_string();
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| format!("{origin}: {e}"))
                .and_then(|text| parse(&text, &origin));
            match parsed {
                Ok(mut d) => {
                    d.source = Some(path);
                    devices.retain(|x| x.name != d.name);
                    devices.push(d);
                }
                Err(e) => errors.push(e),
            }
        }
        Registry { devices, errors }
    })
}

/// Every known profile: the built-ins, then the user's.
pub fn devices() -> &'static [Device] {
    &registry().devices
}

/// Problems with the user's profile files (`TESSERA_DEVICES`), one per file.
pub fn errors() -> &'static [String] {
    &registry().errors
}

pub fn device(name: &str) -> Option<&'static Device> {
    devices().iter().find(|d| d.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_profiles_carry_the_datasheet_figures() {
        let a100 = device("a100_80gb").expect("a100");
        assert_eq!(a100.bf16_flops(), 312e12);
        assert_eq!(a100.memory, 80 << 30);
        assert_eq!(a100.gpus_per_node, 8);
        let h100 = device("h100_80gb").expect("h100");
        assert_eq!(h100.bf16_flops(), 989e12);
        assert_eq!(h100.peak_flops("fp8"), Some(1979e12));
        assert_eq!(h100.hbm_bandwidth, 3.35e12);
        assert_eq!(h100.nvlink_bandwidth, 450e9);
        assert_eq!(h100.interconnect_bandwidth, 50e9);
        assert_eq!(device("h200_141gb").expect("h200").memory, 141 << 30);
    }

    #[test]
    fn bad_profiles_say_where() {
        let e = parse("name = \"x\"\nmemory_gib = \"lots\"\n", "my.toml").unwrap_err();
        assert!(e.starts_with("my.toml:2:"), "{e}");
        let e = parse(&BUILT_IN[0].1.replace("bf16", "bf17"), "f.toml").unwrap_err();
        assert!(e.contains("unknown dtype `bf17`"), "{e}");
        let e = parse(&BUILT_IN[0].1.replace("gpus_per_node = 8", "gpus_per_node = 0"), "f.toml").unwrap_err();
        assert!(e.contains("gpus_per_node"), "{e}");
    }
}
