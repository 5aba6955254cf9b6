//! `[observability]` in the site configuration.

use std::net::SocketAddr;

use serde::Deserialize;

/// `[observability]`: where the HTTP endpoints listen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservabilityConfig {
    /// `host:port` for `/metrics`, `/healthz` and `/readyz` (port 0: any free port, which
    /// the log then names). Absent: no endpoints, and no metrics are kept.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}
