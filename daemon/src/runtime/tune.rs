//! Measuring a model on its device over thread layouts (instances × intra-op threads) and
//! batch sizes, for the load-time tuner (`registry::tune` chooses from what this measures).
//! Each layout gets sessions of its own; all its instances run the same zero-input batch (an
//! integer input the graph compares with a constant filled with it) at once, each on a thread of its own, as the workers would under a backlog, and the cell
//! records items per second over the wall time and the time of one run.
//! Boundary: measures only, and within the time it is given; chooses nothing.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Runtime, RuntimeError, SessionOptions, Target, warmup};

/// Sessions and the intra-op threads of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    pub instances: u32,
    pub threads: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |n: u32| if n == 1 { "" } else { "s" };
        write!(
            f,
            "{} session{} × {} thread{}",
            self.instances,
            s(self.instances),
            self.threads,
            s(self.threads)
        )
    }
}

/// One measured point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub layout: Layout,
    /// Rows per batch.
    pub rows: u32,
    /// Rows finished per second by all the layout's sessions together.
    pub items_per_s: f64,
    /// Mean time of one run (one batch on one session), ms.
    pub run_ms: f64,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct TuneSpec<'a> {
    pub path: &'a Path,
    /// The model made from the file in memory (dequantized at load), else `None`.
    pub bytes: Option<&'a [u8]>,
    pub target: Target<'a>,
    /// Spinning and the log id; the thread count comes from each layout.
    pub options: SessionOptions,
    pub layouts: &'a [Layout],
    /// Batch sizes to try, ascending (only 1 is tried for a model that is not batched).
    pub sizes: &'a [u32],
    pub warmup_dims: &'a HashMap<String, Vec<i64>>,
    /// Where each tensor's rows are (model.toml `batch-axes`, `shared-inputs`).
    pub axes: &'a super::AxesConfig,
    /// The whole measurement's time, session creation included.
    pub budget: Duration,
}

/// A batch size stops being worth measuring once the two sizes before it gained less than
/// this fraction of throughput each.
const GAIN: f64 = 0.03;

/// Rounds after the pilot: each measures every cell again, in the opposite order of the
/// round before, so that a machine busy for a moment (other models, other processes) costs
/// one sample of several cells rather than the whole figure of one; a cell's figure is the
/// median of its samples.
const ROUNDS: u32 = 3;

type Sessions = Vec<(super::DeviceSession, super::Signature)>;

/// What [`Runtime::measure`] found.
#[derive(Debug)]
pub enum Measured {
    /// One cell per layout and batch size measured.
    Cells(Vec<Cell>),
    /// Not measured, and why: the shapes requests will have are not known, and a model timed
    /// at made-up sizes would be tuned for work it never does.
    Skipped(String),
}

impl Runtime {
    /// Measures every layout at the batch sizes worth measuring, within the budget: a pilot
    /// round finds, per layout, the sizes worth measuring (growing until two sizes in a row
    /// gain less than [`GAIN`], or the next size would not fit the layout's share of the
    /// pilot); then [`ROUNDS`] rounds measure those cells again, order alternating, each cell
    /// only while the budget has room for one more run of it; each cell reports its median
    /// sample. The budget is exceeded by at most the pilot's first cell per layout (batches of
    /// one row, which every layout needs). Inputs whose non-batch dimensions are dynamic must
    /// be given in `warmup_dims`, or nothing is measured. A layout whose sessions cannot be
    /// created or run ends the measurement with the error.
    pub fn measure(&self, spec: &TuneSpec<'_>) -> Result<Measured, RuntimeError> {
        let started = Instant::now();
        let deadline = started + spec.budget;
        let mut groups: Vec<(Layout, Sessions)> = Vec::new();
        for &layout in spec.layouts {
            let opts = SessionOptions {
                intra_op_threads: layout.threads,
                ..spec.options.clone()
            };
            let mut sessions = Vec::with_capacity(layout.instances as usize);
            for _ in 0..layout.instances {
                let mut made = self.session_on(spec.path, spec.bytes, &opts, spec.target, None)?;
                made.1
                    .set_axes(spec.axes)
                    .map_err(|message| RuntimeError::Unsupported {
                        path: spec.path.to_path_buf(),
                        message,
                    })?;
                if let Some(why) = unknown_shape(&made.1, spec.warmup_dims) {
                    return Ok(Measured::Skipped(why));
                }
                sessions.push(made);
            }
            groups.push((layout, sessions));
        }
        let batchable = groups
            .first()
            .and_then(|(_, s)| s.first())
            .is_some_and(|(_, sig)| sig.batchable());
        let sizes: Vec<u32> = if batchable {
            spec.sizes.to_vec()
        } else {
            vec![1]
        };
        let left = || deadline.saturating_duration_since(Instant::now());

        // The pilot: one round's share of what is left, split between the layouts; each grows
        // its batch while that pays and the next size fits its share (a cell costs about three
        // runs: one untimed, two timed).
        let mut samples: Vec<((usize, u32), Vec<Cell>)> = Vec::new();
        let pilot = left() / (ROUNDS + 1);
        let per_layout = pilot / groups.len().max(1) as u32;
        let per_cell = per_layout / sizes.len().max(1) as u32;
        for (g, (layout, sessions)) in groups.iter_mut().enumerate() {
            let layout_end = Instant::now() + per_layout;
            let (mut best, mut flat) = (0.0f64, 0);
            let mut last: Option<Cell> = None;
            for &rows in &sizes {
                if flat >= 2 {
                    break;
                }
                if let Some(l) = last {
                    let next = Duration::from_secs_f64(
                        3.0 * l.run_ms / 1e3 * f64::from(rows) / f64::from(l.rows),
                    );
                    if Instant::now() + next > layout_end {
                        break;
                    }
                }
                let cell = measure_cell(sessions, *layout, rows, spec.warmup_dims, per_cell, true)?;
                flat = if cell.items_per_s > best * (1.0 + GAIN) {
                    0
                } else {
                    flat + 1
                };
                best = best.max(cell.items_per_s);
                last = Some(cell);
                samples.push(((g, rows), vec![cell]));
            }
        }
        for round in 0..ROUNDS {
            let per_cell = left() / (ROUNDS - round) / samples.len().max(1) as u32;
            let order: Vec<usize> = if round % 2 == 0 {
                (0..samples.len()).rev().collect()
            } else {
                (0..samples.len()).collect()
            };
            for i in order {
                let (g, rows) = samples[i].0;
                let one_run = samples[i].1.last().map_or(0.0, |c| c.run_ms);
                if left() < Duration::from_secs_f64(one_run / 1e3) {
                    continue;
                }
                let (layout, sessions) = &mut groups[g];
                let cell =
                    measure_cell(sessions, *layout, rows, spec.warmup_dims, per_cell, false)?;
                samples[i].1.push(cell);
            }
        }
        Ok(Measured::Cells(
            samples.into_iter().filter_map(|(_, s)| median(s)).collect(),
        ))
    }
}

/// Why requests' shapes are not known for `sig` (an input dimension past the first that is
/// dynamic and not given in `dims`), if they are not.
fn unknown_shape(sig: &super::Signature, dims: &HashMap<String, Vec<i64>>) -> Option<String> {
    sig.inputs.iter().enumerate().find_map(|(k, t)| {
        let given = dims.get(&t.name);
        let rows = match sig.input_axis(k) {
            super::Axis::Rows(a) => Some(a),
            super::Axis::Shared => None,
        };
        let unknown = t.dims.iter().enumerate().any(|(i, &d)| {
            Some(i) != rows && d < 0 && given.and_then(|g| g.get(i)).is_none_or(|&g| g <= 0)
        });
        unknown.then(|| {
            format!(
                "input '{}' has dynamic dimensions besides the batch: say the size requests \
                 will have with model.toml warmup-dims to have it tuned",
                t.name
            )
        })
    })
}

/// The sample with the median throughput (the lower middle one of an even count).
fn median(mut samples: Vec<Cell>) -> Option<Cell> {
    samples.sort_by(|a, b| a.items_per_s.total_cmp(&b.items_per_s));
    let i = samples.len().checked_sub(1)? / 2;
    samples.get(i).copied()
}

/// A cell is measured for its slice of the budget, or until it has [`ENOUGH_RUNS`] runs per
/// session and [`MIN_CELL`] of time (a light model needs no more for a stable figure, and
/// does not spend the whole budget).
const MIN_CELL: Duration = Duration::from_millis(20);
const ENOUGH_RUNS: u64 = 200;

/// Every session runs `rows`-row zero batches on a thread of its own (first untimed once when
/// `warm`), timed until `slice` has passed (at least once each) or [`ENOUGH_RUNS`] and
/// [`MIN_CELL`] are reached.
fn measure_cell(
    sessions: &mut Sessions,
    layout: Layout,
    rows: u32,
    dims: &HashMap<String, Vec<i64>>,
    slice: Duration,
    warm: bool,
) -> Result<Cell, RuntimeError> {
    if warm {
        for (session, sig) in sessions.iter_mut() {
            warmup(session, sig, u64::from(rows), dims)?;
        }
    }
    let start = Instant::now();
    let runs: Vec<Result<(u64, Duration), RuntimeError>> = std::thread::scope(|s| {
        let handles: Vec<_> = sessions
            .iter_mut()
            .map(|(session, sig)| {
                s.spawn(move || {
                    let (mut n, mut busy) = (0u64, Duration::ZERO);
                    loop {
                        let t = Instant::now();
                        warmup(session, sig, u64::from(rows), dims)?;
                        busy += t.elapsed();
                        n += 1;
                        let t = start.elapsed();
                        if t >= slice || (t >= MIN_CELL && n >= ENOUGH_RUNS) {
                            return Ok((n, busy));
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(RuntimeError::Run("a tuning run panicked".into())))
            })
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let (mut n, mut busy) = (0u64, Duration::ZERO);
    for r in runs {
        let (k, b) = r?;
        n += k;
        busy += b;
    }
    Ok(Cell {
        layout,
        rows,
        items_per_s: (n * u64::from(rows)) as f64 / wall.max(1e-9),
        run_ms: busy.as_secs_f64() * 1e3 / n.max(1) as f64,
    })
}

/// The layouts worth measuring on `cores` cores: one session using them all, one
/// single-thread session per core, and (on four or more) sessions of two threads.
pub fn layouts(cores: u32) -> Vec<Layout> {
    let cores = cores.max(1);
    let mut out = vec![Layout {
        instances: 1,
        threads: cores,
    }];
    if cores > 1 {
        out.push(Layout {
            instances: cores,
            threads: 1,
        });
    }
    if cores >= 4 {
        out.push(Layout {
            instances: cores / 2,
            threads: 2,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_is_its_median_sample() {
        let l = Layout {
            instances: 1,
            threads: 1,
        };
        let c = |items_per_s: f64| Cell {
            layout: l,
            rows: 1,
            items_per_s,
            run_ms: 1e3 / items_per_s,
        };
        assert_eq!(median(vec![c(9.0), c(1.0), c(5.0)]), Some(c(5.0)));
        assert_eq!(median(vec![c(9.0), c(1.0), c(5.0), c(7.0)]), Some(c(5.0)));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn layouts_use_every_core_without_oversubscribing() {
        assert_eq!(
            layouts(1),
            [Layout {
                instances: 1,
                threads: 1
            }]
        );
        for cores in 1..=64 {
            for l in layouts(cores) {
                assert!(l.instances * l.threads <= cores, "{l:?} on {cores}");
                assert!(l.instances * l.threads >= cores - 1, "{l:?} on {cores}");
            }
        }
        assert_eq!(layouts(8).len(), 3);
        assert_eq!(
            Layout {
                instances: 2,
                threads: 1
            }
            .to_string(),
            "2 sessions × 1 thread"
        );
    }
}
