//! CPU time per thread of the daemon, read from /proc: GStreamer's streaming threads and
//! GLib's workers are the sources, the rest is the daemon's own work.

/// CPU seconds so far of each thread of `pid`: (name, seconds).
pub fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let tick = 100.0; // USER_HZ on Linux
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?.path();
            let name = std::fs::read_to_string(t.join("comm")).ok()?;
            let stat = std::fs::read_to_string(t.join("stat")).ok()?;
            // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some((name.trim().to_string(), ticks / tick))
        })
        .collect()
}

/// GStreamer's streaming threads and GLib's workers: the sources.
pub fn is_source(thread: &str) -> bool {
    thread.contains(':') || thread.starts_with("pool-")
}

/// CPU seconds of the sources and of the daemon's own threads.
pub fn cpu_split(pid: u32) -> (f64, f64) {
    thread_cpu(pid)
        .iter()
        .fold((0.0, 0.0), |(s, d), (name, secs)| {
            if is_source(name) {
                (s + secs, d)
            } else {
                (s, d + secs)
            }
        })
}

/// Cores per thread name over the window (BENCH_THREADS=1), busiest first.
pub fn print_threads(before: &[(String, f64)], after: &[(String, f64)], dt: f64) {
    let mut by_name: std::collections::BTreeMap<&str, f64> = Default::default();
    for (name, secs) in after {
        *by_name.entry(name).or_default() += secs;
    }
    for (name, secs) in before {
        *by_name.entry(name).or_default() -= secs;
    }
    let mut v: Vec<(&str, f64)> = by_name.into_iter().map(|(n, s)| (n, s / dt)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = v
        .iter()
        .take(8)
        .map(|(n, c)| format!("{n} {c:.2}"))
        .collect();
    println!("  threads (cores): {}", top.join(", "));
}
