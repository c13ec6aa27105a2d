//! What validating a configuration asks of the machine: whether paths exist, how many cores
//! and how much memory it has, which groups exist, systemd's cache directory. [`System`]
//! answers from the real machine; tests answer with a fake, without temporary files.

use std::path::{Path, PathBuf};

pub trait Host {
    fn is_dir(&self, path: &Path) -> bool;
    fn is_file(&self, path: &Path) -> bool;
    /// CPU cores this process may use.
    fn cores(&self) -> u32;
    /// The CPU cores (numbers) this process may run on.
    fn allowed_cores(&self) -> Vec<usize>;
    /// A group's gid; `Ok(None)` when there is no such group.
    fn group(&self, name: &str) -> Result<Option<u32>, String>;
    /// The machine's physical memory, if the system says.
    fn physical_memory(&self) -> Option<u64>;
    /// The first path of systemd's `CACHE_DIRECTORY`, if set.
    fn cache_directory(&self) -> Option<PathBuf>;
}

/// The machine this process runs on.
pub struct System;

impl Host for System {
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn is_file(&self, path: &Path) -> bool {
        path.is_file()
    }

    fn cores(&self) -> u32 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    }

    fn allowed_cores(&self) -> Vec<usize> {
        crate::affinity::allowed()
    }

    fn group(&self, name: &str) -> Result<Option<u32>, String> {
        nix::unistd::Group::from_name(name)
            .map(|g| g.map(|g| g.gid.as_raw()))
            .map_err(|e| e.to_string())
    }

    fn physical_memory(&self) -> Option<u64> {
        use nix::unistd::{SysconfVar, sysconf};
        let pages = sysconf(SysconfVar::_PHYS_PAGES).ok().flatten()?;
        let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten()?;
        u64::try_from(pages)
            .ok()?
            .checked_mul(u64::try_from(page).ok()?)
    }

    fn cache_directory(&self) -> Option<PathBuf> {
        std::env::var_os("CACHE_DIRECTORY")
            .map(PathBuf::from)
            .and_then(|p| std::env::split_paths(&p).next())
    }
}
