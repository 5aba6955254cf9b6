//! `[observability]` in the site configuration.

use std::net::SocketAddr;

use serde::{Deserialize, Deserializer};

/// `[observability]`: where the HTTP endpoints listen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservabilityConfig {
    /// `IP:port` for `/metrics`, `/healthz` and `/readyz` (port 0: any free port, which
    /// the log then names). Absent: no endpoints, and no metrics are kept.
    #[serde(default, deserialize_with = "listen_addr")]
    pub listen: Option<SocketAddr>,
}

fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an IP address and port: write e.g. \"127.0.0.1:9464\" (loopback), \
             \"0.0.0.0:9464\" (every interface) or \"[::1]:9464\""
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_is_an_address_and_port() {
        let ok: ObservabilityConfig = toml::from_str("listen = \"127.0.0.1:0\"").expect("parses");
        assert_eq!(ok.listen, Some(SocketAddr::from(([127, 0, 0, 1], 0))));
        assert_eq!(toml::from_str::<ObservabilityConfig>("").expect("parses").listen, None);
        let bad = toml::from_str::<ObservabilityConfig>("listen = \"localhost\"").expect_err("refused");
        assert!(bad.to_string().contains("127.0.0.1:9464"), "{bad}");
    }
}
