//! The GPUs this server gives its runners: found through NVML at start, or given as a
//! list (`--gpus`) on machines without it, for tests, or to keep some GPUs out.
//!
//! NVML is loaded at run time (`nvml-wrapper` opens `libnvidia-ml.so` when asked), so
//! the same binary runs on machines without NVIDIA's driver: it finds no GPUs there.

use std::path::{Path, PathBuf};

use nvml_wrapper::Nvml;

/// One GPU a runner may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// What the runner is told (`CUDA_VISIBLE_DEVICES`): the UUID of a detected GPU, or
    /// the id given for it.
    pub id: String,
    /// Its place on the machine: NVML's index, or its place in the given list.
    pub index: u32,
    /// The device's name (`NVIDIA H100 80GB HBM3`), when known.
    pub name: Option<String>,
    /// Its memory, in bytes, when known.
    pub memory: Option<u64>,
    /// Its device node (`/dev/nvidia<minor>`), the one a sandboxed runner sees.
    pub device: Option<PathBuf>,
}

/// What a GPU is doing now, where NVML can say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuUsage {
    /// Percent of the last sample period a kernel ran on it.
    pub utilization: u32,
    /// Bytes of its memory in use.
    pub memory_used: u64,
}

/// The nodes beside a GPU's own that CUDA opens, given to a runner that holds a GPU
/// where they exist.
const CONTROL_NODES: [&str; 4] = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"];

/// The server's GPUs, and NVML to ask about them when it loaded.
pub struct Gpus {
    gpus: Vec<Gpu>,
    nvml: Option<Nvml>,
    /// How they were found, for the log.
    source: String,
}

impl std::fmt::Debug for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpus").field("gpus", &self.gpus).field("source", &self.source).finish()
    }
}

impl Gpus {
    /// No GPUs.
    pub fn none() -> Gpus {
        Gpus { gpus: Vec::new(), nvml: None, source: "none".to_owned() }
    }

    /// The GPUs NVML finds; none where it cannot load (the reason goes in [`Gpus::source`]).
    pub fn detect() -> Gpus {
        match Nvml::init() {
            Ok(nvml) => match detected(&nvml) {
                Ok(gpus) => Gpus { gpus, nvml: Some(nvml), source: "NVML".to_owned() },
                Err(e) => Gpus { gpus: Vec::new(), nvml: None, source: format!("none: NVML could not list them: {e}") },
            },
            Err(e) => Gpus { gpus: Vec::new(), nvml: None, source: format!("none: NVML is not available: {e}") },
        }
    }

    /// The GPUs `given`, each `ID` or `ID=DEVICE` (the device node its runner sees). An
    /// ID that is a detected GPU's UUID or index is that GPU; a number N otherwise has
    /// `/dev/nvidiaN` for its node, when that exists.
    pub fn given(given: &[String]) -> Result<Gpus, String> {
        let nvml = Nvml::init().ok();
        let found = nvml.as_ref().and_then(|n| detected(n).ok()).unwrap_or_default();
        let mut gpus: Vec<Gpu> = Vec::new();
        for (place, spec) in given.iter().enumerate() {
            let (id, device) = match spec.split_once('=') {
                Some((id, device)) => (id.trim(), Some(PathBuf::from(device.trim()))),
                None => (spec.trim(), None),
            };
            if id.is_empty() || id.contains(|c: char| c.is_whitespace() || c == ',') {
                return Err(format!("GPU id {id:?} must be a word without spaces or commas"));
            }
            if let Some(device) = &device
                && !device.is_absolute()
            {
                return Err(format!("GPU {id}: its device {} must be an absolute path", device.display()));
            }
            let gpu = match found.iter().find(|g| g.id == id || g.index.to_string() == id) {
                Some(detected) => Gpu { device: device.or_else(|| detected.device.clone()), ..detected.clone() },
                None => Gpu {
                    id: id.to_owned(),
                    index: place as u32,
                    name: None,
                    memory: None,
                    device: device.or_else(|| {
                        let node = PathBuf::from(format!("/dev/nvidia{}", id.parse::<u32>().ok()?));
                        node.exists().then_some(node)
                    }),
                },
            };
            if gpus.iter().any(|g| g.id == gpu.id) {
                return Err(format!("GPU {} is given twice", gpu.id));
            }
            gpus.push(gpu);
        }
        let source = if nvml.is_some() { "given (NVML for details)" } else { "given" };
        Ok(Gpus { gpus, nvml, source: source.to_owned() })
    }

    pub fn all(&self) -> &[Gpu] {
        &self.gpus
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// What `gpu` is doing now, where NVML knows it.
    pub fn usage(&self, gpu: &Gpu) -> Option<GpuUsage> {
        let nvml = self.nvml.as_ref()?;
        let device = nvml.device_by_uuid(gpu.id.as_str()).ok()?;
        let utilization = device.utilization_rates().ok()?.gpu;
        let memory_used = device.memory_info().ok()?.used;
        Some(GpuUsage { utilization, memory_used })
    }
}

/// The device nodes a runner holding `gpus` sees: theirs, and the control nodes that
/// exist beside them.
pub fn device_nodes(gpus: &[Gpu]) -> Vec<PathBuf> {
    let mut nodes: Vec<PathBuf> = gpus.iter().filter_map(|g| g.device.clone()).collect();
    let mut dirs: Vec<&Path> = nodes.iter().filter_map(|n| n.parent()).collect();
    dirs.dedup();
    let control: Vec<PathBuf> =
        dirs.iter().flat_map(|dir| CONTROL_NODES.iter().map(|n| dir.join(n))).filter(|n| n.exists()).collect();
    nodes.extend(control);
    nodes.dedup();
    nodes
}

fn detected(nvml: &Nvml) -> Result<Vec<Gpu>, nvml_wrapper::error::NvmlError> {
    let mut gpus = Vec::new();
    for index in 0..nvml.device_count()? {
        let device = nvml.device_by_index(index)?;
        gpus.push(Gpu {
            id: device.uuid()?,
            index,
            name: device.name().ok(),
            memory: device.memory_info().ok().map(|m| m.total),
            device: device.minor_number().ok().map(|minor| PathBuf::from(format!("/dev/nvidia{minor}"))),
        });
    }
    Ok(gpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_gpus_keep_their_ids_and_devices_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for node in ["nvidia7", "nvidiactl", "nvidia-uvm"] {
            std::fs::write(dir.path().join(node), "").unwrap();
        }
        let seven = dir.path().join("nvidia7");
        let gpus = Gpus::given(&["g0".to_owned(), format!("g1={}", seven.display())]).unwrap();
        let ids: Vec<(&str, u32, Option<&Path>)> =
            gpus.all().iter().map(|g| (g.id.as_str(), g.index, g.device.as_deref())).collect();
        assert_eq!(ids, [("g0", 0, None), ("g1", 1, Some(seven.as_path()))]);
        // The runner holding g1 sees its node and the control nodes beside it.
        let nodes = device_nodes(&gpus.all()[1..]);
        assert_eq!(nodes, [seven.clone(), dir.path().join("nvidiactl"), dir.path().join("nvidia-uvm")]);
        assert_eq!(device_nodes(&gpus.all()[..1]), Vec::<PathBuf>::new());
    }

    #[test]
    fn bad_given_gpus_are_refused_with_what_is_wrong() {
        let cases = [
            (vec!["g0", "g0"], "GPU g0 is given twice"),
            (vec![""], "GPU id \"\" must be a word"),
            (vec!["a b"], "GPU id \"a b\" must be a word"),
            (vec!["g0=dev/nvidia0"], "its device dev/nvidia0 must be an absolute path"),
        ];
        for (given, want) in cases {
            let given: Vec<String> = given.into_iter().map(str::to_owned).collect();
            let err = Gpus::given(&given).unwrap_err();
            assert!(err.contains(want), "{given:?}: {err}");
        }
    }
}
