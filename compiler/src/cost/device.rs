//! Accelerator profiles: memory budget and peak rates. `train.device` names one.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Device {
    pub name: &'static str,
    /// HBM capacity in bytes.
    pub memory: u64,
    /// Dense bf16 peak, FLOP/s.
    pub bf16_flops: f64,
    /// HBM bandwidth, bytes/s.
    pub hbm_bandwidth: f64,
}

const GIB: u64 = 1 << 30;

pub const DEVICES: &[Device] = &[
    Device { name: "a100_40gb", memory: 40 * GIB, bf16_flops: 312e12, hbm_bandwidth: 1.555e12 },
    Device { name: "a100_80gb", memory: 80 * GIB, bf16_flops: 312e12, hbm_bandwidth: 2.039e12 },
    Device { name: "h100_80gb", memory: 80 * GIB, bf16_flops: 989e12, hbm_bandwidth: 3.35e12 },
    Device { name: "h200_141gb", memory: 141 * GIB, bf16_flops: 989e12, hbm_bandwidth: 4.8e12 },
    Device { name: "v100_32gb", memory: 32 * GIB, bf16_flops: 125e12, hbm_bandwidth: 0.9e12 },
    Device { name: "cpu", memory: 24 * GIB, bf16_flops: 0.236e12, hbm_bandwidth: 0.05e12 },
];

pub fn device(name: &str) -> Option<&'static Device> {
    DEVICES.iter().find(|d| d.name == name)
}
