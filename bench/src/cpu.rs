//! CPU time from `/proc`: per process (the service, the benchmark itself, mongod when it runs
//! on this machine) and for the whole machine, so a scenario's figures come with where the
//! machine's cores went while it ran.

use std::time::Duration;

use anyhow::Context;

/// `/proc/<pid>/stat` and `/proc/stat` count CPU time in USER_HZ ticks, which the kernel ABI
/// fixes at 100 per second on the architectures the service runs on (unlike the kernel's
/// internal HZ).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// CPU ticks used between two readings `elapsed` apart, in % of one core.
pub fn percent_of_core(before: u64, after: u64, elapsed: Duration) -> f64 {
    after.saturating_sub(before) as f64 / CLOCK_TICKS_PER_SECOND / elapsed.as_secs_f64() * 100.0
}

/// User plus system CPU time of process `pid` so far, in clock ticks.
pub async fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = tokio::fs::read_to_string(&path)
        .await
        .with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces and parentheses: count from its closing one.
    // After it, field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index)
            .and_then(|field| field.parse().ok())
            .with_context(|| format!("{path}: no CPU time at field {}", index + 3))
    };
    Ok(tick(11)? + tick(12)?)
}

/// The whole machine's CPU ticks so far: (busy, all), summed over its cores; idle and iowait
/// are not busy.
async fn machine_ticks() -> anyhow::Result<(u64, u64)> {
    let stat = tokio::fs::read_to_string("/proc/stat")
        .await
        .context("reading /proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|field| field.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    anyhow::ensure!(ticks.len() >= 8, "/proc/stat: no aggregate cpu line");
    let all: u64 = ticks[..8].iter().sum();
    Ok((all - ticks[3] - ticks[4], all))
}

/// How this machine's idle cores wait, which sets what waking a process costs: on a virtual
/// machine, a core that halts is handed back to the host, and waking a process on it takes a
/// round trip through the hypervisor (tens of µs). Guest halt polling (the `haltpoll` cpuidle
/// driver's `guest_halt_poll_ns`) spins a while before halting. The service adds a process
/// (and two wake-ups) to each call, so figures from machines that differ here differ.
/// `cpuinfo`: the text of `/proc/cpuinfo` (empty when it could not be read).
pub fn idle_policy(cpuinfo: &str) -> String {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let hypervisor = cpuinfo
        .lines()
        .find(|line| line.starts_with("flags"))
        .map(|flags| flags.split_whitespace().any(|flag| flag == "hypervisor"));
    describe_idle(
        hypervisor,
        read("/sys/devices/system/cpu/cpuidle/current_driver").as_deref(),
        read("/sys/module/haltpoll/parameters/guest_halt_poll_ns").as_deref(),
    )
}

fn describe_idle(
    hypervisor: Option<bool>,
    driver: Option<&str>,
    guest_halt_poll_ns: Option<&str>,
) -> String {
    let machine = match hypervisor {
        Some(true) => "virtual machine",
        Some(false) => "no hypervisor",
        None => "hypervisor unknown",
    };
    let driver = driver.map(str::trim).filter(|driver| !driver.is_empty());
    let polling = match guest_halt_poll_ns.map(str::trim) {
        Some("0") => " (guest halt polling off: guest_halt_poll_ns 0)".to_owned(),
        Some(ns) if !ns.is_empty() => format!(" (guest halt polling up to {ns} ns)"),
        _ => String::new(),
    };
    match driver {
        Some(driver) => format!("{machine}, cpuidle driver {driver}{polling}"),
        None => format!("{machine}, no cpuidle driver"),
    }
}

/// `pid` if it is a process of this machine named `name` (a MongoDB elsewhere reports a pid
/// that means nothing here).
pub async fn local_process(pid: Option<u32>, name: &str) -> Option<u32> {
    let pid = pid?;
    let comm = tokio::fs::read_to_string(format!("/proc/{pid}/comm"))
        .await
        .ok()?;
    (comm.trim_end() == name).then_some(pid)
}

/// The processes a write scenario runs on.
#[derive(Debug, Clone, Copy)]
pub struct Processes {
    pub server: u32,
    pub client: u32,
    /// `None` when mongod is not on this machine (its pid is not ours to read).
    pub mongod: Option<u32>,
}

/// CPU ticks of each process and the machine at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    server: u64,
    client: u64,
    mongod: Option<u64>,
    machine_busy: u64,
    machine_all: u64,
}

impl Reading {
    pub async fn take(processes: &Processes) -> anyhow::Result<Self> {
        let mongod = match processes.mongod {
            Some(pid) => cpu_ticks(pid).await.ok(),
            None => None,
        };
        let (machine_busy, machine_all) = machine_ticks().await?;
        Ok(Self {
            server: cpu_ticks(processes.server).await?,
            client: cpu_ticks(processes.client).await?,
            mongod,
            machine_busy,
            machine_all,
        })
    }
}

/// Where the CPU went while a scenario wrote `events` events: µs of CPU per event for each
/// process, and the share of the machine's cores that were busy.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub server_us: f64,
    pub client_us: f64,
    pub mongod_us: Option<f64>,
    /// 0..=1: busy ticks of all cores over all ticks.
    pub machine_busy: f64,
}

impl Usage {
    pub fn between(before: &Reading, after: &Reading, events: u64) -> Self {
        let per_event = |before: u64, after: u64| {
            after.saturating_sub(before) as f64 / CLOCK_TICKS_PER_SECOND * 1e6 / events as f64
        };
        let all = after.machine_all.saturating_sub(before.machine_all);
        Self {
            server_us: per_event(before.server, after.server),
            client_us: per_event(before.client, after.client),
            mongod_us: before
                .mongod
                .zip(after.mongod)
                .map(|(before, after)| per_event(before, after)),
            machine_busy: if all == 0 {
                0.0
            } else {
                after.machine_busy.saturating_sub(before.machine_busy) as f64 / all as f64
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_cpu_per_event_and_the_busy_share() {
        let before = Reading {
            server: 100,
            client: 200,
            mongod: Some(300),
            machine_busy: 1_000,
            machine_all: 2_000,
        };
        let after = Reading {
            server: 110,
            client: 205,
            mongod: Some(320),
            machine_busy: 1_150,
            machine_all: 2_200,
        };
        let usage = Usage::between(&before, &after, 1_000);
        assert_eq!(usage.server_us, 100.0);
        assert_eq!(usage.client_us, 50.0);
        assert_eq!(usage.mongod_us, Some(200.0));
        assert_eq!(usage.machine_busy, 0.75);
    }

    #[test]
    fn the_idle_policy_names_the_driver_and_whether_guests_poll_before_halting() {
        assert_eq!(
            describe_idle(Some(true), Some("haltpoll\n"), Some("0\n")),
            "virtual machine, cpuidle driver haltpoll (guest halt polling off: guest_halt_poll_ns 0)"
        );
        assert_eq!(
            describe_idle(Some(true), Some("haltpoll"), Some("200000")),
            "virtual machine, cpuidle driver haltpoll (guest halt polling up to 200000 ns)"
        );
        assert_eq!(
            describe_idle(Some(false), Some("intel_idle"), None),
            "no hypervisor, cpuidle driver intel_idle"
        );
        assert_eq!(
            describe_idle(None, Some(""), None),
            "hypervisor unknown, no cpuidle driver"
        );
    }

    #[tokio::test]
    async fn this_process_and_the_machine_can_be_read() {
        let processes = Processes {
            server: std::process::id(),
            client: std::process::id(),
            mongod: None,
        };
        let before = Reading::take(&processes).await.expect("reading");
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(100) {
            std::hint::black_box(0);
        }
        let after = Reading::take(&processes).await.expect("reading");
        let usage = Usage::between(&before, &after, 1);
        assert!(usage.client_us > 0.0, "{usage:?}");
        assert!(usage.mongod_us.is_none());
        assert!(usage.machine_busy > 0.0, "{usage:?}");
    }
}
