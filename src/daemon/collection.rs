//! The daemon's side of interval collection: `{p}/admin/collect`, the collector's notes
//! about each meter (newest reading, clock drift, contact) for `state/{meter}`, and the
//! allocator settings that keep a large fleet's footprint small.

use super::Daemon;
use crate::collect::{CollectCommand, CollectNote};
use crate::meter::MeterId;
use crate::mqtt::Message;

impl Daemon {
    /// `{p}/admin/collect` (an extension): `{}` collects every meter now, up to the
    /// latest boundary; `{"meters": ["MTR-0001", ...]}` only those.
    pub(super) fn collect_topic(&self) -> String {
        format!("{}/admin/collect", self.topics.prefix())
    }

    pub(super) fn on_collect_now(&self, p: &Message) {
        #[derive(serde::Deserialize)]
        struct Now {
            #[serde(default)]
            meters: Option<Vec<MeterId>>,
        }
        let Some(tx) = &self.collect else { return };
        match serde_json::from_slice::<Now>(&p.payload) {
            Ok(now) => {
                tracing::info!(meters = ?now.meters.as_ref().map(Vec::len), "collect now, asked over MQTT");
                let _ = tx.send(CollectCommand::Now(now.meters));
            }
            Err(e) => tracing::warn!(error = %e, "collect now refused: expected {{}} or {{\"meters\": [ids]}}"),
        }
    }

    /// The collector learnt something of a meter: remember it, and republish the meter's
    /// state when its newest reading or its clock drift changed.
    pub(super) async fn on_collect_note(&mut self, note: CollectNote) {
        let entry = self.seen.entry(note.meter.clone()).or_default();
        let before = (entry.reading_s, entry.drift_s);
        entry.last_ms = note.seen_ms.or(entry.last_ms);
        entry.reading_s = note.last_reading_s.or(entry.reading_s);
        entry.drift_s = note.drift_s.or(entry.drift_s);
        if (entry.reading_s, entry.drift_s) != before {
            self.publish_state(&note.meter).await;
        }
    }
}

/// See [`crate::collect::limit_allocator_arenas`]; called again as the daemon starts, for
/// embedders that did not call it first thing.
pub(super) fn limit_allocator_arenas() {
    crate::collect::limit_allocator_arenas();
}

/// Give memory freed since start-up back to the system. Parsing a large site file
/// allocates several KiB per meter for a moment; glibc keeps freed memory in its heap, so
/// without this a daemon for 100,000 meters would sit on hundreds of MB it no longer uses.
/// Returns the bytes the allocator has handed out and not got back, where it can say.
pub(crate) fn release_freed_memory() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim and mallinfo2 only walk the allocator's own lists; they have no
    // preconditions and are safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
        Some(libc::mallinfo2().uordblks as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}
