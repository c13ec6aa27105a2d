//! Load-time tuning: what layout (sessions × intra-op threads) and batch policy a model gets
//! when model.toml does not say. The runtime measures the model on its device
//! (`Runtime::measure`: every layout at growing batch sizes, within a time budget); [`choose`]
//! picks from that table; the result is kept per model file, device and machine in the cache
//! directory, so a restart or a reload does not measure again. What model.toml sets always
//! wins: only the keys it leaves unset are tuned.
//!
//! The choice: the best throughput measured anywhere sets the bar; among the cells within
//! [`NEAR`] of it, the layout with the most sessions (fewest threads each) wins, then the one
//! whose single run is quickest. Single-thread sessions share the cores with other busy
//! models without loss (the kernel time-slices whole runs), where a session of several
//! threads stalls at every operator while one of its threads waits for a core: with the PP-OCR
//! classifier busy beside it, YOLOv8n in one two-thread session got ~25 requests/s and the
//! classifier ~900; as two single-thread sessions ~32 and ~690, each its fair share (2 cores,
//! BENCHMARKS.md, "tune").
//! Its layout serves; the batch cap is the largest size of that layout still within `NEAR` of
//! the layout's best throughput: up to it, batching costs ORT nothing per item and saves the
//! daemon's own work per run (a run's scheduling, output delivery and wake-ups, which this
//! table does not see), and the adaptive batch policy picks the size while serving from what
//! runs really cost; beyond it, where larger batches cost more per item (a recogniser on
//! this CPU), a batch only adds latency. The latency target, which turns on the adaptive
//! policy, lets a batch of that cap run in 40 % of it and is never under four times a single
//! item's run.
//! Boundary: pure, except for reading and writing its cache file.

use std::path::{Path, PathBuf};

use rxd_protocol::{Tuning, TuningCell};

use crate::runtime::Cell;

/// Throughput this close to the best counts as the best.
pub const NEAR: f64 = 0.05;

/// Picks a layout and batch policy from measured cells; `None` when nothing was measured.
pub fn choose(table: &[Cell]) -> Option<Tuning> {
    let best = table.iter().map(|c| c.items_per_s).fold(0.0f64, f64::max);
    if best <= 0.0 {
        return None;
    }
    let near = |x: f64, of: f64| x >= of * (1.0 - NEAR);
    let pick = table
        .iter()
        .filter(|c| near(c.items_per_s, best))
        .min_by(|a, b| {
            (b.layout.instances.cmp(&a.layout.instances)).then(a.run_ms.total_cmp(&b.run_ms))
        })?;
    let layout = pick.layout;
    let of_layout: Vec<&Cell> = table.iter().filter(|c| c.layout == layout).collect();
    let layout_best = of_layout
        .iter()
        .map(|c| c.items_per_s)
        .fold(0.0f64, f64::max);
    let cap = of_layout
        .iter()
        .filter(|c| near(c.items_per_s, layout_best))
        .max_by_key(|c| c.rows)?;
    let single = of_layout
        .iter()
        .find(|c| c.rows == 1)
        .map_or(cap.run_ms, |c| c.run_ms);
    // In hundredths of a millisecond: what is shown is what is set.
    let latency_target_ms = ((2.5 * cap.run_ms).max(4.0 * single).max(0.5) * 100.0).round() / 100.0;
    let reason = format!(
        "{layout} at up to {} rows gave {:.0} items/s ({:.0} % of the best measured, {:.0}); \
         a batch of {} takes {:.2} ms",
        cap.rows,
        cap.items_per_s,
        100.0 * cap.items_per_s / best,
        best,
        cap.rows,
        cap.run_ms
    );
    Some(Tuning {
        instances: layout.instances,
        threads: layout.threads,
        max_batch_rows: cap.rows,
        latency_target_ms,
        reason,
        measured_ms: 0,
        cached: false,
        table: table
            .iter()
            .map(|c| TuningCell {
                instances: c.layout.instances,
                threads: c.layout.threads,
                rows: c.rows,
                items_per_s: c.items_per_s,
                run_ms: c.run_ms,
            })
            .collect(),
    })
}

/// The layouts whose sessions fit `limit` bytes, at `session_bytes` each: every session of
/// every layout measured is alive at once while tuning, and the chosen layout's serve, so
/// layouts are kept, fewest sessions first, while their sessions together fit. The single
/// session on every core is always kept (one session is what any load costs).
pub fn affordable(
    mut layouts: Vec<crate::runtime::Layout>,
    session_bytes: u64,
    limit: u64,
) -> Vec<crate::runtime::Layout> {
    layouts.sort_by_key(|l| l.instances);
    let mut total = 0u64;
    layouts.retain(|l| {
        total = total.saturating_add(session_bytes.saturating_mul(u64::from(l.instances)));
        l.instances == 1 || total <= limit
    });
    layouts
}

/// What a tuning's cache entry is for besides the model's bytes: any of it changing measures
/// again.
#[derive(Debug)]
pub struct CacheKey<'a> {
    pub device: &'a str,
    /// The cores given to the daemon.
    pub cores: u32,
    /// The layouts measured (fewer where memory is short).
    pub layouts: &'a [crate::runtime::Layout],
    pub sizes: &'a [u32],
    /// The ONNX Runtime version.
    pub ort: &'a str,
    /// model.toml `warmup-dims`: the shapes measured.
    pub dims: Option<&'a std::collections::HashMap<String, Vec<i64>>>,
    /// model.toml `warmup-values`: the values measured.
    pub values: Option<&'a std::collections::HashMap<String, i64>>,
    /// model.toml `batch-axes` and `shared-inputs`: whether and how it batches.
    pub axes: &'a crate::runtime::AxesConfig,
    /// The file was measured dequantized at load (a weights-only file served as a float
    /// model, which runs at another speed than the file as it is).
    pub dequantized: bool,
}

/// The cache file for a model file on a device of this machine: named by a hash of the
/// model's bytes and `key`.
pub fn cache_path(cache_dir: &Path, model: &Path, key: &CacheKey<'_>) -> std::io::Result<PathBuf> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(model)?)?;
    let dims: std::collections::BTreeMap<_, _> = key.dims.into_iter().flatten().collect();
    let axes: std::collections::BTreeMap<_, _> = key.axes.axes.iter().collect();
    h.update(
        format!(
            "\0{}\0{}\0{:?}\0{:?}\0{}\0{dims:?}{}",
            key.device,
            key.cores,
            key.layouts,
            key.sizes,
            key.ort,
            // Only when set, so the keys of every other model stay what they were.
            if key.dequantized { "\0dequantized" } else { "" }
        )
        .as_bytes(),
    );
    // Only when set, so that the choices kept before these keys existed still apply.
    if !axes.is_empty() || !key.axes.shared.is_empty() {
        h.update(format!("\0{axes:?}\0{:?}", key.axes.shared).as_bytes());
    }
    if let Some(values) = key.values.filter(|v| !v.is_empty()) {
        let values: std::collections::BTreeMap<_, _> = values.iter().collect();
        h.update(format!("\0values {values:?}").as_bytes());
    }
    // Since rxd fills an integer input with the constant its graph compares it with (not
    // zero), every choice measured before is measured again once (a model's values come from
    // its bytes, already in the key).
    h.update(b"\0warmup values from the graph");
    let name = h.finalize().to_hex();
    Ok(cache_dir.join("tune").join(format!("{}.json", &name[..32])))
}

/// Choices already made, by cache file (shared by the registry and its load jobs).
pub type Remembered = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, Tuning>>>;

/// A cached choice, if there is a readable one.
pub fn read_cache(path: &Path) -> Option<Tuning> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Keeps a choice (a failure only costs a measurement next time).
pub fn write_cache(path: &Path, tuned: &Tuning) {
    let write = || -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer_pretty(&tmp, tuned)?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    };
    if let Err(e) = write() {
        tracing::debug!("cannot keep the tuning in {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Layout;

    const ONE: Layout = Layout {
        instances: 1,
        threads: 2,
    };
    const TWO: Layout = Layout {
        instances: 2,
        threads: 1,
    };

    fn layout(t: &Tuning) -> Layout {
        Layout {
            instances: t.instances,
            threads: t.threads,
        }
    }

    /// A table from (layout, rows, ms per run): throughput = instances × rows / run time.
    fn table(rows: &[(Layout, u32, f64)]) -> Vec<Cell> {
        rows.iter()
            .map(|&(layout, rows, run_ms)| Cell {
                layout,
                rows,
                items_per_s: f64::from(layout.instances * rows) * 1e3 / run_ms,
                run_ms,
            })
            .collect()
    }

    #[test]
    fn where_larger_batches_cost_more_per_item_small_batches_are_kept() {
        // Per-item cost rises with the batch (a recogniser on this CPU): 1 ms, then worse.
        let t = table(&[
            (ONE, 1, 1.0),
            (ONE, 2, 2.2),
            (ONE, 4, 4.8),
            (ONE, 8, 11.0),
            (TWO, 1, 2.2),
            (TWO, 2, 4.6),
            (TWO, 4, 10.0),
        ]);
        let c = choose(&t).unwrap();
        assert_eq!((layout(&c), c.max_batch_rows), (ONE, 1), "{c:?}");
        assert!(
            c.latency_target_ms >= 4.0 && c.latency_target_ms < 10.0,
            "{c:?}"
        );
    }

    #[test]
    fn where_larger_batches_are_cheaper_per_item_they_are_allowed() {
        // A GPU-like curve: per-item cost falls until 16 rows.
        let t = table(&[
            (ONE, 1, 1.0),
            (ONE, 2, 1.1),
            (ONE, 4, 1.3),
            (ONE, 8, 1.8),
            (ONE, 16, 2.9),
            (ONE, 32, 5.9),
        ]);
        let c = choose(&t).unwrap();
        // 32 rows are as cheap per item as 16 (within 5 %): allowed, the policy decides.
        assert_eq!((layout(&c), c.max_batch_rows), (ONE, 32), "{c:?}");
        // A batch at the cap must fit half the target, or the adaptive policy never runs it.
        assert!(c.latency_target_ms >= 2.0 * 5.9, "{c:?}");
        // Where 32 rows cost clearly more per item than 16, the cap stays at 16.
        let t = table(&[(ONE, 1, 1.0), (ONE, 8, 1.8), (ONE, 16, 2.9), (ONE, 32, 7.0)]);
        assert_eq!(choose(&t).unwrap().max_batch_rows, 16);
    }

    #[test]
    fn where_two_single_thread_sessions_beat_one_with_two_threads_they_are_chosen() {
        // One session scales poorly over two threads (1.3 ms instead of 2 ms per item at
        // best); two single-thread sessions each take 2 ms per item, 2.3 at 4 rows.
        let t = table(&[
            (ONE, 1, 1.3),
            (ONE, 2, 2.6),
            (ONE, 4, 5.2),
            (TWO, 1, 2.0),
            (TWO, 2, 4.0),
            (TWO, 4, 9.2),
        ]);
        let c = choose(&t).unwrap();
        assert_eq!((layout(&c), c.max_batch_rows), (TWO, 2), "{c:?}");
        assert!(c.reason.contains("2 sessions × 1 thread"), "{}", c.reason);
    }

    #[test]
    fn equal_throughput_goes_to_single_thread_sessions_then_to_the_lower_latency() {
        // The same items/s from one two-thread session at 1 row (0.5 ms) as from two
        // one-thread sessions at 1 row (1 ms each): the single-thread sessions, which share
        // the cores with other busy models without stalling.
        let t = table(&[(ONE, 1, 0.5), (TWO, 1, 1.0)]);
        assert_eq!(layout(&choose(&t).unwrap()), TWO);
        // Within one layout, batches as cheap per item as single rows are allowed (they save
        // the daemon's own work per run; the adaptive policy picks the size).
        let t = table(&[(TWO, 1, 1.0), (TWO, 2, 2.0)]);
        assert_eq!(choose(&t).unwrap().max_batch_rows, 2);
        // Clearly more throughput from the two-thread session: it wins.
        let t = table(&[(ONE, 1, 0.4), (TWO, 1, 1.0)]);
        assert_eq!(layout(&choose(&t).unwrap()), ONE);
        assert!(choose(&[]).is_none());
    }

    #[test]
    fn layouts_are_measured_only_while_their_sessions_fit_the_memory_given() {
        let all = crate::runtime::layouts(16);
        let n = |v: &[Layout]| v.iter().map(|l| l.instances).collect::<Vec<_>>();
        // A small model: every layout (1 + 8 + 16 sessions).
        assert_eq!(n(&affordable(all.clone(), 10 << 20, 4 << 30)), [1, 8, 16]);
        // 2 GiB a session in 24 GiB: one session, then 8 (18 GiB); 16 more would not fit.
        assert_eq!(n(&affordable(all.clone(), 2 << 30, 24 << 30)), [1, 8]);
        // Larger than the limit alone: still the one session on every core.
        assert_eq!(n(&affordable(all, 64 << 30, 24 << 30)), [1]);
    }

    #[test]
    fn the_cache_is_per_model_device_and_machine_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
        std::fs::write(&a, b"model a").unwrap();
        std::fs::write(&b, b"model b").unwrap();
        let no_axes = crate::runtime::AxesConfig::default();
        let p = |m: &Path, device: &str, cores: u32| {
            let key = CacheKey {
                device,
                cores,
                layouts: &[],
                sizes: &[1, 2],
                ort: "1.31.1",
                dims: None,
                values: None,
                axes: &no_axes,
                dequantized: false,
            };
            cache_path(dir.path(), m, &key).unwrap()
        };
        assert_eq!(p(&a, "cpu", 2), p(&a, "cpu", 2));
        assert_ne!(p(&a, "cpu", 2), p(&b, "cpu", 2));
        assert_ne!(p(&a, "cpu", 2), p(&a, "cpu2", 2));
        assert_ne!(p(&a, "cpu", 2), p(&a, "cpu", 4));
        let dims: std::collections::HashMap<String, Vec<i64>> =
            [("x".to_string(), vec![1, 3, 48, 320])].into();
        let with_dims = CacheKey {
            device: "cpu",
            cores: 2,
            layouts: &[],
            sizes: &[1, 2],
            ort: "1.31.1",
            dims: Some(&dims),
            values: None,
            axes: &no_axes,
            dequantized: false,
        };
        assert_ne!(
            cache_path(dir.path(), &a, &with_dims).unwrap(),
            p(&a, "cpu", 2)
        );
        let axes = crate::runtime::AxesConfig {
            axes: [("state".to_string(), 1)].into(),
            shared: Vec::new(),
        };
        let with_axes = CacheKey {
            device: "cpu",
            cores: 2,
            layouts: &[],
            sizes: &[1, 2],
            ort: "1.31.1",
            dims: None,
            values: None,
            axes: &axes,
            dequantized: false,
        };
        assert_ne!(
            cache_path(dir.path(), &a, &with_axes).unwrap(),
            p(&a, "cpu", 2),
            "batch-axes change what is measured"
        );
        let values: std::collections::HashMap<String, i64> = [("sr".to_string(), 8000)].into();
        let with_values = CacheKey {
            dims: None,
            values: Some(&values),
            ..with_axes
        };
        assert_ne!(
            cache_path(dir.path(), &a, &with_values).unwrap(),
            cache_path(dir.path(), &a, &with_axes).unwrap(),
            "warmup-values change what is measured"
        );
        // The same file measured dequantized at load is another entry.
        let dequantized = CacheKey {
            dims: None,
            dequantized: true,
            ..with_dims
        };
        assert_ne!(
            cache_path(dir.path(), &a, &dequantized).unwrap(),
            p(&a, "cpu", 2)
        );
        let t = choose(&table(&[(ONE, 1, 1.0), (TWO, 1, 1.5)])).unwrap();
        assert!(read_cache(&p(&a, "cpu", 2)).is_none());
        write_cache(&p(&a, "cpu", 2), &t);
        assert_eq!(read_cache(&p(&a, "cpu", 2)), Some(t));
    }
}
