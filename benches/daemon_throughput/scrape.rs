//! Reading the daemon's /metrics: totals, and a stage's latency histogram and mean
//! between two readings.

pub fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET /metrics HTTP/1.0\r\n\r\n");
    let mut t = String::new();
    let _ = s.read_to_string(&mut t);
    t
}

pub fn sum_of(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn stage_buckets(text: &str, stage: &str) -> Vec<(f64, f64)> {
    let prefix = format!("cras_stage_latency_ms_bucket{{stage=\"{stage}\"");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The mean of a stage's latency over the window between two /metrics readings, ms.
pub fn stage_mean(m0: &str, m1: &str, stage: &str) -> f64 {
    let delta = |what: &str| {
        let name = format!("cras_stage_latency_ms_{what}{{stage=\"{stage}\"}}");
        sum_of(m1, &name) - sum_of(m0, &name)
    };
    delta("sum") / delta("count").max(1.0)
}

pub fn window(m0: &str, m1: &str, stage: &str) -> Vec<(f64, f64)> {
    stage_buckets(m1, stage)
        .iter()
        .zip(stage_buckets(m0, stage).iter())
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect()
}
