//! The repository on disk: `<repository>/<model>/<version>/model.onnx` (versions are positive
//! integers) with an optional `<repository>/<model>/model.toml`. A scan reads it and merges
//! what it found into the registry's map: new models and versions are added as available,
//! settings re-read, vanished versions that are not resident forgotten, and failed versions
//! whose files changed made available again.
//! Boundary: reads directories and file metadata only; never loads a model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rxd_protocol::ModelState;

use super::settings::ModelSettings;
use super::{Model, Registry, Version};

/// A model found on disk: its settings (or why they are bad) and its version files.
type Found = (Result<ModelSettings, String>, BTreeMap<u64, PathBuf>);

/// What identifies a version's files: model.onnx (symlinks followed) and model.toml, each by
/// device, inode, size and modification time; `None` parts are missing files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    model: Option<(u64, u64, u64, i64, i64)>,
    settings: Option<(u64, u64, u64, i64, i64)>,
}

impl FileStamp {
    pub fn of(model: &Path) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
        };
        let toml = model
            .parent()
            .and_then(Path::parent)
            .map(|dir| dir.join("model.toml"));
        FileStamp {
            model: stamp(model),
            settings: toml.as_deref().and_then(stamp),
        }
    }

    /// A stamp of a model file of `size` bytes (tests).
    #[cfg(test)]
    pub fn fake(size: u64) -> FileStamp {
        FileStamp {
            model: Some((1, 1, size, 0, 0)),
            settings: None,
        }
    }
}

/// Bytes of a version on disk: `model.onnx` plus external data files beside it.
pub fn model_bytes(model: &Path) -> u64 {
    let Some(dir) = model.parent() else {
        return 0;
    };
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name() != "model.toml")
                // Following symlinks: repositories often link model files.
                .filter_map(|e| std::fs::metadata(e.path()).ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Every model under `root` with at least one `<version>/model.onnx`.
fn read_repository(root: &Path) -> std::io::Result<BTreeMap<String, Found>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        let dir = entry.path();
        let mut versions = BTreeMap::new();
        for v in std::fs::read_dir(&dir)? {
            let v = v?;
            let Some(num) = v
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|&n| n >= 1)
            else {
                continue;
            };
            let file = v.path().join("model.onnx");
            if file.is_file() {
                versions.insert(num, file);
            }
        }
        if versions.is_empty() {
            tracing::warn!(model = %name, "no <version>/model.onnx in {}", dir.display());
            continue;
        }
        found.insert(name, (ModelSettings::read(&dir), versions));
    }
    Ok(found)
}

impl Registry {
    /// Reads the repository: new models and versions are added as `available`, settings are
    /// re-read. Versions that vanished from disk and are not loaded are forgotten.
    pub fn scan(&self) -> std::io::Result<()> {
        let found = read_repository(&self.root)?;
        let mut models = self.write();
        for (name, m) in models.iter_mut() {
            if !found.contains_key(name) {
                for v in m.versions.values_mut() {
                    v.on_disk = false;
                }
            }
        }
        models.retain(|name, m| {
            m.versions.retain(|v, ver| {
                ver.state.resident_or_loading()
                    || found.get(name).is_some_and(|f| f.1.contains_key(v))
            });
            !m.versions.is_empty() || found.contains_key(name)
        });
        for (name, (settings, versions)) in found {
            let model = models.entry(name.clone()).or_insert_with(|| Model {
                settings: Ok(ModelSettings::default()),
                versions: BTreeMap::new(),
            });
            model.settings = settings;
            for v in model.versions.values_mut() {
                v.on_disk = false;
            }
            for (num, path) in versions {
                let ver = model
                    .versions
                    .entry(num)
                    .or_insert_with(|| Version::new(path));
                ver.on_disk = true;
                // A version that failed is not retried on every request, but its files coming
                // back or changing (a model removed and put back, fixed, or its model.toml
                // edited) makes it available again.
                if ver.state.kind() == ModelState::Failed
                    && ver.state.files_changed(&FileStamp::of(&ver.path))
                {
                    tracing::info!(model = %name, version = num, "its files changed: available again");
                }
            }
        }
        Ok(())
    }
}
