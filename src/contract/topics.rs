//! The topics of one daemon instance under its prefix.

use crate::meter::MeterId;

/// A topic prefix that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid topic prefix {0:?}: use non-empty levels without + # or NUL, e.g. ami or ami/north")]
pub struct BadPrefix(pub String);

/// What an inbound topic addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// `{p}/cmd/{meter}` with a valid meter id.
    Command(MeterId),
    /// `{p}/cmd/{x}` where `x` breaks the id rule (rejected with invalid_payload).
    CommandBadMeter(&'a str),
    /// `{p}/payments`.
    Payments,
}

/// The topics of one daemon instance, under its prefix `{p}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Check a prefix (`ami`, `ami/north`).
    pub fn new(prefix: &str) -> Result<Self, BadPrefix> {
        let ok = !prefix.is_empty()
            && prefix.split('/').all(|l| !l.is_empty())
            && !prefix.contains(['+', '#', '\0'])
            && prefix.len() <= 1024;
        if ok {
            Ok(Self { prefix: prefix.to_owned() })
        } else {
            Err(BadPrefix(prefix.chars().take(80).collect()))
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// Subscription filter for commands: `{p}/cmd/+`.
    pub fn cmd_filter(&self) -> String {
        format!("{}/cmd/+", self.prefix)
    }
    /// `{p}/cmd/{meter}` (for clients and tests).
    pub fn cmd(&self, meter: &MeterId) -> String {
        format!("{}/cmd/{meter}", self.prefix)
    }
    /// `{p}/payments`.
    pub fn payments(&self) -> String {
        format!("{}/payments", self.prefix)
    }
    /// `{p}/result/{meter}`.
    pub fn result(&self, meter: &MeterId) -> String {
        format!("{}/result/{meter}", self.prefix)
    }
    /// `{p}/result/{raw}` for a command whose topic named an invalid meter id; None when
    /// `raw` cannot be part of a topic name that the daemon may publish on.
    pub fn result_raw(&self, raw: &str) -> Option<String> {
        let ok = !raw.is_empty() && !raw.contains(['+', '#', '/', '\0']) && raw.len() <= 1024;
        ok.then(|| format!("{}/result/{raw}", self.prefix))
    }
    /// `{p}/state/{meter}` (retained).
    pub fn state(&self, meter: &MeterId) -> String {
        format!("{}/state/{meter}", self.prefix)
    }
    /// `{p}/readings/{meter}`.
    pub fn readings(&self, meter: &MeterId) -> String {
        format!("{}/readings/{meter}", self.prefix)
    }
    /// `{p}/status` (retained; also the last will's topic).
    pub fn status(&self) -> String {
        format!("{}/status", self.prefix)
    }

    /// What an inbound topic is, or None when it is not one of ours.
    pub fn parse_inbound<'a>(&self, topic: &'a str) -> Option<Inbound<'a>> {
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?;
        if rest == "payments" {
            return Some(Inbound::Payments);
        }
        let meter = rest.strip_prefix("cmd/")?;
        Some(match MeterId::new(meter) {
            Ok(id) => Inbound::Command(id),
            Err(_) => Inbound::CommandBadMeter(meter),
        })
    }
}
