//! What the CPU backend's device is: its name and memory, read from the OS.

/// The device models run on, as the Status call reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: String,
    pub memory_total: u64,
    pub memory_free: u64,
}

/// The host CPU and its memory.
pub fn cpu_device() -> DeviceInfo {
    let (memory_total, memory_free) = memory();
    DeviceInfo {
        name: cpu_name(),
        kind: "cpu".into(),
        memory_total,
        memory_free,
    }
}

#[cfg(target_os = "linux")]
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

#[cfg(target_os = "macos")]
fn cpu_name() -> String {
    sysctl("machdep.cpu.brand_string").unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn cpu_name() -> String {
    std::env::consts::ARCH.to_owned()
}

/// (total, available) physical memory in bytes; (0, 0) when the OS does not say.
#[cfg(target_os = "linux")]
fn memory() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return (0, 0);
    };
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

#[cfg(target_os = "macos")]
fn memory() -> (u64, u64) {
    let total = sysctl("hw.memsize")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // macOS has no single "available" figure; free + inactive pages from vm_stat is the
    // closest to Linux's MemAvailable.
    let available = std::process::Command::new("vm_stat")
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let page: u64 = text
                .split("page size of ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let pages = |key: &str| -> u64 {
                text.lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split(':').nth(1))
                    .and_then(|v| v.trim().trim_end_matches('.').parse().ok())
                    .unwrap_or(0)
            };
            Some((pages("Pages free") + pages("Pages inactive")) * page)
        })
        .unwrap_or(0);
    (total, available)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn memory() -> (u64, u64) {
    (0, 0)
}

#[cfg(target_os = "macos")]
fn sysctl(name: &str) -> Option<String> {
    let out = std::process::Command::new("sysctl")
        .args(["-n", name])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn linux_reports_memory() {
        let d = super::cpu_device();
        assert!(
            d.memory_total > 0 && d.memory_free <= d.memory_total,
            "{d:?}"
        );
        assert!(!d.name.is_empty());
    }
}
