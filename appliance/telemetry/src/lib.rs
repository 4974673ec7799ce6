//! The mail gateway's Prometheus metrics (work in progress).
