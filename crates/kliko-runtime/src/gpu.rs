//! GPUs for a run (`kliko run --gpus`, a pipeline step's `gpus:`): what was asked, whether
//! this machine has it, and how each runtime is told. Never part of a key (the same
//! computation); recorded in provenance.

use std::path::Path;

use crate::error::RuntimeError;

/// A GPU request, as `docker run --gpus` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gpus {
    /// `all`: every GPU of the machine.
    All,
    /// `N`: any N of them.
    Count(u32),
    /// `device=0,2` (indices or UUIDs): those.
    Devices(Vec<String>),
}

impl Gpus {
    /// `all`, `N` (at least 1), or `device=ID[,ID...]`.
    pub fn parse(s: &str) -> Result<Gpus, String> {
        let t = s.trim();
        let bad = || format!("`{s}` is not a GPU request: say `all`, a number such as `2`, or `device=0,1`");
        if t.eq_ignore_ascii_case("all") {
            return Ok(Gpus::All);
        }
        if let Some(ids) = t.strip_prefix("device=").or_else(|| t.strip_prefix("\"device=")) {
            let ids: Vec<String> =
                ids.trim_end_matches('"').split(',').map(|i| i.trim().to_string()).filter(|i| !i.is_empty()).collect();
            return if ids.is_empty() { Err(bad()) } else { Ok(Gpus::Devices(ids)) };
        }
        match t.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(Gpus::Count(n)),
            _ => Err(bad()),
        }
    }

    /// Docker's device request: the NVIDIA toolkit's hook gives the container these GPUs.
    pub fn docker_request(&self) -> bollard::models::DeviceRequest {
        let (count, ids) = match self {
            Gpus::All => (Some(-1), None),
            Gpus::Count(n) => (Some(i64::from(*n)), None),
            Gpus::Devices(ids) => (None, Some(ids.clone())),
        };
        bollard::models::DeviceRequest {
            driver: Some(String::new()),
            count,
            device_ids: ids,
            capabilities: Some(vec![vec!["gpu".to_string()]]),
            options: None,
        }
    }

    /// Podman's device request: CDI names (Podman's compatible API passes a request whose
    /// driver is `cdi` on as `--device nvidia.com/gpu=…`).
    pub fn cdi_request(&self) -> bollard::models::DeviceRequest {
        bollard::models::DeviceRequest {
            driver: Some("cdi".to_string()),
            count: None,
            device_ids: Some(self.cdi_devices()),
            capabilities: None,
            options: None,
        }
    }

    /// Podman's CDI device names (`nvidia.com/gpu=all`, `nvidia.com/gpu=0`, ...). A count
    /// takes the first N indices.
    pub fn cdi_devices(&self) -> Vec<String> {
        match self {
            Gpus::All => vec!["nvidia.com/gpu=all".to_string()],
            Gpus::Count(n) => (0..*n).map(|i| format!("nvidia.com/gpu={i}")).collect(),
            Gpus::Devices(ids) => ids.iter().map(|i| format!("nvidia.com/gpu={i}")).collect(),
        }
    }

    /// Whether `present` (this machine's GPUs, by index) can serve the request.
    pub fn check(&self, present: &[String]) -> Result<(), RuntimeError> {
        let found = match present.len() {
            0 => "this machine has no NVIDIA GPU (no /proc/driver/nvidia/gpus, no /dev/nvidia0)".to_string(),
            1 => "this machine has 1 GPU (index 0)".to_string(),
            n => format!("this machine has {n} GPUs (indices 0 to {})", n - 1),
        };
        let refuse = || Err(RuntimeError::NoGpu { asked: self.describe(), found: found.clone() });
        match self {
            Gpus::All if present.is_empty() => refuse(),
            Gpus::Count(n) if present.len() < *n as usize => refuse(),
            Gpus::Devices(ids) if present.is_empty() => refuse(),
            Gpus::Devices(ids) => {
                // An index must exist; a UUID (`GPU-…`) is left to the driver.
                let missing = ids.iter().any(|i| i.parse::<usize>().is_ok_and(|i| i >= present.len()));
                if missing {
                    refuse()
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// In words: `all GPUs`, `2 GPUs`, `GPU device 0,1`.
    pub fn describe(&self) -> String {
        match self {
            Gpus::All => "all GPUs".to_string(),
            Gpus::Count(1) => "1 GPU".to_string(),
            Gpus::Count(n) => format!("{n} GPUs"),
            Gpus::Devices(ids) => format!("GPU device {}", ids.join(",")),
        }
    }
}

impl std::fmt::Display for Gpus {
    /// As `--gpus` takes it back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gpus::All => write!(f, "all"),
            Gpus::Count(n) => write!(f, "{n}"),
            Gpus::Devices(ids) => write!(f, "device={}", ids.join(",")),
        }
    }
}

/// This machine's NVIDIA GPUs, one entry per GPU (its PCI address, or its device node).
pub fn present() -> Vec<String> {
    present_under(Path::new("/"))
}

/// [`present`], with the filesystem rooted at `root` (for tests).
pub fn present_under(root: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(root.join("proc/driver/nvidia/gpus"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    if found.is_empty() {
        found = std::fs::read_dir(root.join("dev"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| {
                        n.strip_prefix("nvidia").is_some_and(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_digit()))
                    })
                    .collect()
            })
            .unwrap_or_default();
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_as_docker_run_reads_them() {
        assert_eq!(Gpus::parse("all"), Ok(Gpus::All));
        assert_eq!(Gpus::parse("2"), Ok(Gpus::Count(2)));
        assert_eq!(Gpus::parse("device=0,2"), Ok(Gpus::Devices(vec!["0".into(), "2".into()])));
        assert_eq!(Gpus::parse("\"device=GPU-3a\""), Ok(Gpus::Devices(vec!["GPU-3a".into()])));
        for bad in ["0", "lots", "device=", "-1", ""] {
            assert!(Gpus::parse(bad).is_err(), "{bad}");
        }
        for g in [Gpus::All, Gpus::Count(3), Gpus::Devices(vec!["1".into(), "3".into()])] {
            assert_eq!(Gpus::parse(&g.to_string()), Ok(g));
        }
    }

    #[test]
    fn each_runtime_is_told_in_its_own_terms() {
        let all = Gpus::All.docker_request();
        assert_eq!((all.count, all.capabilities.clone()), (Some(-1), Some(vec![vec!["gpu".to_string()]])));
        let two = Gpus::Count(2).docker_request();
        assert_eq!((two.count, two.device_ids), (Some(2), None));
        let ids = Gpus::Devices(vec!["1".into()]).docker_request();
        assert_eq!((ids.count, ids.device_ids), (None, Some(vec!["1".to_string()])));
        assert_eq!(Gpus::All.cdi_devices(), ["nvidia.com/gpu=all"]);
        assert_eq!(Gpus::Count(2).cdi_devices(), ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]);
        assert_eq!(Gpus::Devices(vec!["GPU-3a".into()]).cdi_devices(), ["nvidia.com/gpu=GPU-3a"]);
        let cdi = Gpus::All.cdi_request();
        assert_eq!(
            (cdi.driver.as_deref(), cdi.device_ids),
            (Some("cdi"), Some(vec!["nvidia.com/gpu=all".to_string()]))
        );
    }

    #[test]
    fn a_request_this_machine_cannot_serve_is_refused_in_words() {
        let none: Vec<String> = Vec::new();
        let err = Gpus::All.check(&none).unwrap_err().to_string();
        assert_eq!(err, "the run asks for all GPUs, and this machine has no NVIDIA GPU (no /proc/driver/nvidia/gpus, no /dev/nvidia0)");
        let one = vec!["0000:01:00.0".to_string()];
        assert!(Gpus::All.check(&one).is_ok());
        assert!(Gpus::Count(1).check(&one).is_ok());
        assert_eq!(
            Gpus::Count(2).check(&one).unwrap_err().to_string(),
            "the run asks for 2 GPUs, and this machine has 1 GPU (index 0)"
        );
        assert!(Gpus::Devices(vec!["1".into()]).check(&one).is_err());
        assert!(Gpus::Devices(vec!["0".into()]).check(&one).is_ok());
        assert!(Gpus::Devices(vec!["GPU-3a".into()]).check(&one).is_ok());
    }

    #[test]
    fn gpus_are_found_by_the_driver_or_their_device_nodes() {
        let root = tempfile::tempdir().unwrap();
        assert!(present_under(root.path()).is_empty());
        std::fs::create_dir_all(root.path().join("dev")).unwrap();
        for n in ["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "null"] {
            std::fs::write(root.path().join("dev").join(n), "").unwrap();
        }
        assert_eq!(present_under(root.path()), ["nvidia0", "nvidia1"]);
        std::fs::create_dir_all(root.path().join("proc/driver/nvidia/gpus/0000:01:00.0")).unwrap();
        assert_eq!(present_under(root.path()), ["0000:01:00.0"]);
    }
}
