//! CPU cores a thread may run on: what the daemon may use, and pinning the threads of a device
//! whose `[[device]]` table lists `cores` (its loads, which create ONNX Runtime's intra-op
//! threads — new threads inherit their creator's cores — and its workers, which run the
//! batches). Boundary: `sched_getaffinity`/`sched_setaffinity` of the calling thread only.

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// The cores the calling thread may run on (affinity set by `taskset`, systemd's
/// `CPUAffinity=` or a cpuset cgroup); empty if the system does not say.
pub fn allowed() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Pins the calling thread (and the threads it starts from now on) to `cores`.
pub fn pin(cores: &[usize]) -> Result<(), String> {
    let mut set = CpuSet::new();
    for &c in cores {
        set.set(c).map_err(|e| format!("core {c}: {e}"))?;
    }
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| format!("cores {}: {e}", show(cores)))
}

/// Pins the calling thread to a device's cores, if it has some; a failure (a core taken away
/// since the config was read) is logged and the thread runs where it may.
pub fn pin_for(device: &str, cores: Option<&[usize]>) {
    if let Some(Err(e)) = cores.map(pin) {
        tracing::warn!(device, "cannot run on the device's cores: {e}");
    }
}

/// `cores` as a list of ranges, as `taskset -c` writes them: "0-3,8".
pub fn show(cores: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cores.len() {
        let mut j = i;
        while j + 1 < cores.len() && cores[j + 1] == cores[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cores[i].to_string()
        } else {
            format!("{}-{}", cores[i], cores[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_ranges() {
        assert_eq!(show(&[0, 1, 2, 3, 8]), "0-3,8");
        assert_eq!(show(&[5]), "5");
        assert_eq!(show(&[1, 3, 4]), "1,3-4");
        assert_eq!(show(&[]), "");
    }

    #[test]
    fn a_pinned_thread_and_its_children_run_on_its_cores() {
        let all = allowed();
        assert!(!all.is_empty());
        let last = *all.last().unwrap();
        std::thread::spawn(move || {
            pin(&[last]).unwrap();
            assert_eq!(allowed(), vec![last]);
            let child = std::thread::spawn(allowed).join().unwrap();
            assert_eq!(
                child,
                vec![last],
                "a new thread inherits its creator's cores"
            );
        })
        .join()
        .unwrap();
        // Other threads are not moved.
        assert_eq!(allowed(), all);
    }
}
