//! Devices and their execution providers: the device kinds the runtime knows, a session's
//! [`Target`], setting up a session builder for it (CPU; the WebGPU plugin, registered once per
//! library, its adapters from the environment; CUDA and TensorRT through ort's builders with
//! `error_on_failure`), paying a device's one-time set-up (`prime_device`) and probing what a
//! device looks like (`probe`).
//! ort's `cuda` and `tensorrt` features only expose those builders and link nothing: ONNX
//! Runtime itself is loaded at run time. A WebGPU device's options reach the plugin prefixed
//! `WebGpuExecutionProvider.`.
//! Invariant: an execution provider that cannot be created is an error, never a silent CPU
//! session.

use std::path::{Path, PathBuf};

use ort::session::builder::SessionBuilder;

use super::{PRIME, Runtime, RuntimeError, SessionOptions, warmup};

/// How a device runs models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    /// ONNX Runtime's WebGPU plugin EP (Vulkan through Dawn: RADV on AMD, lavapipe in tests).
    WebGpu {
        library: PathBuf,
        adapter: u32,
    },
    Cuda {
        id: u32,
    },
    TensorRt {
        id: u32,
    },
}

impl DeviceKind {
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::WebGpu { .. } => "webgpu",
            DeviceKind::Cuda { .. } => "cuda",
            DeviceKind::TensorRt { .. } => "tensorrt",
        }
    }

    /// The execution provider's name as ONNX Runtime reports it.
    pub fn ep(&self) -> &'static str {
        match self {
            DeviceKind::Cpu => "CPUExecutionProvider",
            DeviceKind::WebGpu { .. } => "WebGpuExecutionProvider",
            DeviceKind::Cuda { .. } => "CUDAExecutionProvider",
            DeviceKind::TensorRt { .. } => "TensorrtExecutionProvider",
        }
    }

    /// An NVIDIA device (CUDA or TensorRT).
    pub fn nvidia_id(&self) -> Option<u32> {
        match self {
            DeviceKind::Cuda { id } | DeviceKind::TensorRt { id } => Some(*id),
            _ => None,
        }
    }
}

/// Where a session runs: a device's kind and execution-provider options.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub kind: &'a DeviceKind,
    pub options: &'a [(String, String)],
    /// Engine caches (TensorRT) go under here.
    pub cache_dir: Option<&'a Path>,
}

impl Target<'static> {
    /// The CPU execution provider.
    pub fn cpu() -> Target<'static> {
        Target {
            kind: &DeviceKind::Cpu,
            options: &[],
            cache_dir: None,
        }
    }
}

impl Runtime {
    /// Sets up `target`'s execution provider on a session builder; errors in words.
    pub(super) fn with_device(
        &self,
        builder: SessionBuilder,
        target: Target<'_>,
    ) -> Result<SessionBuilder, String> {
        use ort::ep::ArbitrarilyConfigurableExecutionProvider;
        Ok(match target.kind {
            DeviceKind::Cpu => builder,
            DeviceKind::WebGpu { library, adapter } => {
                let devices = self.webgpu_devices(library)?;
                let count = devices.len();
                let device = devices.into_iter().nth(*adapter as usize).ok_or_else(|| {
                    format!(
                        "the WebGPU plugin offers {count} adapter(s); device-id {adapter} is not one"
                    )
                })?;
                let options: Vec<(String, String)> = target
                    .options
                    .iter()
                    .map(|(k, v)| (format!("WebGpuExecutionProvider.{k}"), v.clone()))
                    .collect();
                builder
                    .with_devices([device], Some(&options))
                    .map_err(|e| e.to_string())?
            }
            DeviceKind::Cuda { id } => {
                let mut ep = ort::ep::CUDA::default().with_device_id(*id as i32);
                // ORT's default, EXHAUSTIVE, times every cuDNN convolution algorithm whenever
                // a session's input shape changes: 0.5–0.7 s per change for YOLOv8n or the
                // PP-OCR classifier on an H200, against ~0.1 s with the heuristic choice. Batch
                // sizes get a session each (`WorkerSessions`), but a new image size (dynamic
                // height/width) still meets the search in the request path. The heuristic
                // choice bounds that; `cudnn_conv_algo_search = "EXHAUSTIVE"` in the device's
                // options brings the search back (with `warmup-dims` so the warmup meets the
                // shapes that will be served).
                if !target
                    .options
                    .iter()
                    .any(|(k, _)| k == "cudnn_conv_algo_search")
                {
                    ep = ep.with_arbitrary_config("cudnn_conv_algo_search", "HEURISTIC");
                }
                for (k, v) in target.options {
                    ep = ep.with_arbitrary_config(k, v);
                }
                builder
                    .with_execution_providers([ep.build().error_on_failure()])
                    .map_err(|e| format!("CUDA execution provider: {e}"))?
            }
            DeviceKind::TensorRt { id } => {
                let mut ep = ort::ep::TensorRT::default().with_device_id(*id as i32);
                if let Some(dir) = target.cache_dir {
                    let dir = dir.join("tensorrt");
                    let _ = std::fs::create_dir_all(&dir);
                    ep = ep
                        .with_engine_cache(true)
                        .with_engine_cache_path(dir.display());
                }
                for (k, v) in target.options {
                    ep = ep.with_arbitrary_config(k, v);
                }
                builder
                    .with_execution_providers([ep.build().error_on_failure()])
                    .map_err(|e| format!("TensorRT execution provider: {e}"))?
            }
        })
    }

    /// Pays an accelerator device's one-time set-up with the built-in one-node graph (once per
    /// device; the session is kept). Errors are the device's: the EP cannot be created.
    pub fn prime_device(&self, target: Target<'_>) -> Result<(), RuntimeError> {
        if matches!(target.kind, DeviceKind::Cpu) {
            return Ok(());
        }
        let key = format!("{:?}", target.kind);
        let mut primed = self.primed.lock().unwrap_or_else(|e| e.into_inner());
        if primed.contains_key(&key) {
            return Ok(());
        }
        let path = self.scratch.path().join("prime.onnx");
        std::fs::write(&path, PRIME).map_err(|e| RuntimeError::Session {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let opts = SessionOptions {
            intra_op_threads: 1,
            allow_spinning: false,
            log_id: "rxd-probe".into(),
            warmup_values: Default::default(),
        };
        let made = self.session_on(&path, None, &opts, target, None);
        let _ = std::fs::remove_file(&path);
        let (mut session, sig) = made?;
        warmup(&mut session, &sig, 1, &Default::default())?;
        primed.insert(key, session);
        Ok(())
    }

    /// The WebGPU plugin's devices (adapters), registering the library with the environment
    /// on first use. Errors name the library and what is missing.
    fn webgpu_devices(&self, library: &Path) -> Result<Vec<ort::device::Device<'_>>, String> {
        {
            let mut plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
            let n = plugins.len();
            let entry = plugins.entry(library.to_path_buf()).or_insert_with(|| {
                if !library.is_file() {
                    return Err(format!(
                        "the WebGPU plugin library {} does not exist (set ep-library on the device, \
                         or install it)",
                        library.display()
                    ));
                }
                let name = format!("rxd-webgpu-{n}");
                self.env
                    .register_ep_library(&name, library)
                    .map(|()| name)
                    .map_err(|e| {
                        format!("cannot load the WebGPU plugin {}: {e}", library.display())
                    })
            });
            entry.clone()?;
        }
        let devices: Vec<_> = self
            .env
            .devices()
            .filter(|d| d.ep().ok() == Some("WebGpuExecutionProvider"))
            .collect();
        if devices.is_empty() {
            return Err(
                "the WebGPU plugin found no adapter (no Vulkan device; a software \
                        adapter such as lavapipe is offered only with \
                        ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER=1)"
                    .into(),
            );
        }
        Ok(devices)
    }
}

/// What a device's execution provider looks like from here.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub adapter: Option<String>,
    pub memory_total: Option<u64>,
    pub memory_used: Option<u64>,
}

impl Runtime {
    /// Whether a device's execution provider can come up, and what the driver reports about
    /// it (adapter name, memory) where it does.
    pub fn probe(&self, kind: &DeviceKind) -> Result<Probe, String> {
        match kind {
            DeviceKind::Cpu => Ok(Probe::default()),
            DeviceKind::WebGpu { library, adapter } => {
                let devices = self.webgpu_devices(library)?;
                let d = devices.get(*adapter as usize).ok_or_else(|| {
                    format!(
                        "the WebGPU plugin offers {} adapter(s); device-id {adapter} is not one",
                        devices.len()
                    )
                })?;
                let hw = d.hardware_device();
                Ok(Probe {
                    adapter: Some(format!(
                        "{} {:?} (id {:#06x})",
                        hw.vendor().unwrap_or("unknown vendor"),
                        hw.ty(),
                        hw.id()
                    )),
                    ..Probe::default()
                })
            }
            DeviceKind::Cuda { id } | DeviceKind::TensorRt { id } => {
                let gpu = crate::gpu::nvidia_device(*id).ok_or_else(|| {
                    format!("no NVIDIA GPU {id} (NVML unavailable or no such index)")
                })?;
                Ok(Probe {
                    adapter: gpu.name,
                    memory_total: gpu.memory_total_bytes,
                    memory_used: gpu.memory_used_bytes,
                })
            }
        }
    }
}
