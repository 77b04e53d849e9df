//! Prometheus metrics of one controller: HTTP requests by route template, method and status,
//! with a latency histogram; bunkers by status and workers by status are read from the store
//! at scrape time (so every controller reports the same fleet-wide figures).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Default)]
struct Series {
    count: u64,
    sum_s: f64,
    /// Cumulative-ready counts per bucket (not cumulative yet).
    buckets: [u64; BUCKETS.len()],
}

#[derive(Default)]
pub struct Metrics {
    /// (route template, method, status) → series.
    requests: Mutex<BTreeMap<(String, String, u16), Series>>,
}

impl Metrics {
    pub fn observe(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let series = map
            .entry((route.to_owned(), method.to_owned(), status))
            .or_default();
        series.count += 1;
        series.sum_s += secs;
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            series.buckets[i] += 1;
        }
    }

    /// The Prometheus text exposition, with the fleet gauges given by the caller.
    pub fn render(&self, bunkers: &[(String, i64)], workers: &[(String, i64)]) -> String {
        let mut out = String::new();
        let map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str("# HELP scaibunker_http_requests_total HTTP requests served.\n");
        out.push_str("# TYPE scaibunker_http_requests_total counter\n");
        for ((route, method, status), s) in map.iter() {
            let _ = writeln!(
                out,
                "scaibunker_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {}",
                escape(route),
                s.count
            );
        }
        out.push_str("# HELP scaibunker_http_request_duration_seconds HTTP request latency.\n");
        out.push_str("# TYPE scaibunker_http_request_duration_seconds histogram\n");
        for ((route, method, status), s) in map.iter() {
            let labels = format!(
                "route=\"{}\",method=\"{method}\",status=\"{status}\"",
                escape(route)
            );
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += s.buckets[i];
                let _ = writeln!(
                    out,
                    "scaibunker_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "scaibunker_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(
                out,
                "scaibunker_http_request_duration_seconds_sum{{{labels}}} {}",
                s.sum_s
            );
            let _ = writeln!(
                out,
                "scaibunker_http_request_duration_seconds_count{{{labels}}} {}",
                s.count
            );
        }
        drop(map);
        out.push_str("# HELP scaibunker_bunkers Bunkers by status (all tenants).\n");
        out.push_str("# TYPE scaibunker_bunkers gauge\n");
        for (status, n) in bunkers {
            let _ = writeln!(
                out,
                "scaibunker_bunkers{{status=\"{}\"}} {n}",
                escape(status)
            );
        }
        out.push_str("# HELP scaibunker_workers Workers by status.\n");
        out.push_str("# TYPE scaibunker_workers gauge\n");
        for (status, n) in workers {
            let _ = writeln!(
                out,
                "scaibunker_workers{{status=\"{}\"}} {n}",
                escape(status)
            );
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.observe("/bunkers/{id}", "GET", 200, Duration::from_millis(3));
        m.observe("/bunkers/{id}", "GET", 200, Duration::from_millis(40));
        m.observe("/bunkers/{id}", "GET", 404, Duration::from_micros(500));
        let text = m.render(&[("running".into(), 2)], &[("online".into(), 1)]);
        assert!(text.contains(
            "scaibunker_http_requests_total{route=\"/bunkers/{id}\",method=\"GET\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "scaibunker_http_request_duration_seconds_bucket{route=\"/bunkers/{id}\",method=\"GET\",status=\"200\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "scaibunker_http_request_duration_seconds_bucket{route=\"/bunkers/{id}\",method=\"GET\",status=\"200\",le=\"0.05\"} 2"
        ));
        assert!(text.contains("scaibunker_bunkers{status=\"running\"} 2"));
        assert!(text.contains("scaibunker_workers{status=\"online\"} 1"));
    }
}
