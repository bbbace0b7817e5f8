//! Helpers shared by the benchmarks.
#![allow(dead_code)]

/// `name` from the environment as a number, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// CPU time of each thread of process `pid` so far (ns, from `/proc/PID/task/*/schedstat`).
pub fn thread_cpu(pid: u32) -> std::collections::HashMap<u64, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.filter_map(Result::ok) {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(ns) = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        {
            out.insert(tid, ns);
        }
    }
    out
}

/// CPU seconds process `pid` used since `before` (taken with [`thread_cpu`]), to the
/// nanosecond (`/proc/PID/stat` counts in 10 ms ticks, too coarse for an idle process). A
/// thread that ended meanwhile counts only until `before`.
pub fn cpu_since(pid: u32, before: &std::collections::HashMap<u64, u64>) -> f64 {
    thread_cpu(pid)
        .iter()
        .map(|(tid, ns)| ns - before.get(tid).copied().unwrap_or(0).min(*ns))
        .sum::<u64>() as f64
        / 1e9
}
