//! Metrics: counters and latency histograms the server keeps, rendered in Prometheus's
//! text format for `GET /metrics` (work in progress: filled in by issue 14).

use crate::commands::Context;

/// The Prometheus text exposition of `ctx`'s numbers.
pub fn render(ctx: &Context) -> String {
    let _ = ctx;
    String::new()
}
