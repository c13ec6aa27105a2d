//! GPU figures for metrics and health: NVIDIA through NVML (libnvidia-ml, loaded at run time
//! by `nvml-wrapper`; absent library = no NVIDIA GPUs), AMD through amdgpu's sysfs files
//! (`gpu_busy_percent`, `mem_info_vram_used`, `mem_info_vram_total`). A figure the driver does
//! not give is `None` — shown as absent, never as zero.
//! Boundary: reads only; placement on GPUs is the registry's and the runtime's business.

use std::path::Path;
use std::sync::OnceLock;

use rxd_protocol::metrics::GpuMetrics;

/// NVML, initialised once (it takes tens of ms); `None` when the library is not there.
fn nvml() -> Option<&'static nvml_wrapper::Nvml> {
    static NVML: OnceLock<Option<nvml_wrapper::Nvml>> = OnceLock::new();
    NVML.get_or_init(|| nvml_wrapper::Nvml::init().ok())
        .as_ref()
}

fn nvidia() -> Vec<GpuMetrics> {
    let Some(nvml) = nvml() else {
        return Vec::new();
    };
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            let mem = d.memory_info().ok();
            Some(GpuMetrics {
                id: format!("nvidia:{i}"),
                name: d.name().ok(),
                utilization: d.utilization_rates().ok().map(|u| f64::from(u.gpu) / 100.0),
                memory_used_bytes: mem.as_ref().map(|m| m.used),
                memory_total_bytes: mem.as_ref().map(|m| m.total),
            })
        })
        .collect()
}

/// One NVIDIA GPU by index, if NVML sees it.
pub fn nvidia_device(index: u32) -> Option<GpuMetrics> {
    nvidia().into_iter().nth(index as usize)
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// AMD GPUs under `drm` (normally /sys/class/drm).
pub fn amdgpu(drm: &Path) -> Vec<GpuMetrics> {
    let Ok(entries) = std::fs::read_dir(drm) else {
        return Vec::new();
    };
    let mut cards: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("card") && n[4..].chars().all(|c| c.is_ascii_digit()))
        .collect();
    cards.sort();
    cards
        .into_iter()
        .filter_map(|card| {
            let dev = drm.join(&card).join("device");
            let vendor = std::fs::read_to_string(dev.join("vendor")).ok()?;
            if vendor.trim() != "0x1002" {
                return None;
            }
            Some(GpuMetrics {
                id: format!("amdgpu:{card}"),
                name: std::fs::read_to_string(dev.join("product_name"))
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty()),
                utilization: read_u64(&dev.join("gpu_busy_percent")).map(|p| p as f64 / 100.0),
                memory_used_bytes: read_u64(&dev.join("mem_info_vram_used")),
                memory_total_bytes: read_u64(&dev.join("mem_info_vram_total")),
            })
        })
        .collect()
}

/// Every GPU the daemon can see (sampled: NVML calls take milliseconds on some drivers).
pub fn metrics() -> Vec<GpuMetrics> {
    static SAMPLE: crate::metrics::Sampled<Vec<GpuMetrics>> =
        crate::metrics::Sampled::new(crate::metrics::SAMPLE_PERIOD);
    SAMPLE.get(metrics_now)
}

fn metrics_now() -> Vec<GpuMetrics> {
    let mut all = nvidia();
    all.extend(amdgpu(Path::new("/sys/class/drm")));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amdgpu_sysfs_is_read_and_missing_files_are_absent() {
        let dir = tempfile::tempdir().unwrap();
        let card = dir.path().join("card0/device");
        std::fs::create_dir_all(&card).unwrap();
        std::fs::write(card.join("vendor"), "0x1002\n").unwrap();
        std::fs::write(card.join("gpu_busy_percent"), "37\n").unwrap();
        std::fs::write(card.join("mem_info_vram_total"), "8589934592\n").unwrap();
        // No mem_info_vram_used: absent, not zero.
        let other = dir.path().join("card1/device");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("vendor"), "0x10de\n").unwrap();
        std::fs::create_dir_all(dir.path().join("card0-HDMI-A-1")).unwrap();
        let g = amdgpu(dir.path());
        assert_eq!(g.len(), 1, "{g:?}");
        assert_eq!(g[0].id, "amdgpu:card0");
        assert_eq!(g[0].utilization, Some(0.37));
        assert_eq!(g[0].memory_total_bytes, Some(8 << 30));
        assert_eq!(g[0].memory_used_bytes, None);
    }
}
