//! Durable client invocation counters for ciphered DLMS associations.
//!
//! A GCM nonce is the system title and the invocation counter: sending two APDUs under
//! the same key with the same counter leaks the authentication subkey. So the counter
//! must survive restarts and crashes. We write a *reservation* ahead of use: before the
//! session may spend counters up to `R`, `R` is on disk (fsync'd). After a crash the
//! session resumes from the last reservation, skipping at most one block of values but
//! never repeating one.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::meter::{MeterError, MeterId};

/// How many counter values one reservation covers. Larger means fewer fsyncs, smaller
/// means fewer values skipped after a crash; 2^32 values last a long time either way.
pub const RESERVATION_BLOCK: u32 = 1000;

/// Counters, one file per meter under a directory.
#[derive(Debug, Clone)]
pub struct CounterStore {
    dir: PathBuf,
}

impl CounterStore {
    /// A store in `dir` (created when first written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, meter: &MeterId) -> PathBuf {
        // Meter ids are restricted to file-name-safe characters (MeterId::new).
        self.dir.join(format!("{}.ic", meter.as_str()))
    }

    /// The highest value that may already have been used (0 when never used).
    pub fn load(&self, meter: &MeterId) -> Result<u32, MeterError> {
        let path = self.path(meter);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                text.trim().parse().map_err(|_| MeterError::Storage(format!("{}: not a counter value", path.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(MeterError::Storage(format!("{}: {e}", path.display()))),
        }
    }

    /// Durably record that values up to `upto` may be used. Never lowers what is on
    /// disk: a reservation only moves forward, whoever writes it.
    pub fn reserve(&self, meter: &MeterId, upto: u32) -> Result<(), MeterError> {
        if self.load(meter)? >= upto {
            return Ok(());
        }
        let path = self.path(meter);
        write_atomically(&self.dir, &path, format!("{upto}\n").as_bytes())
            .map_err(|e| MeterError::Storage(format!("{}: {e}", path.display())))
    }
}

/// An exclusive hold on one meter's counter: while a ciphered session lives, no other
/// process may spend values from the same reservation. Released when dropped.
#[derive(Debug)]
pub struct CounterLock(#[allow(dead_code)] std::fs::File);

impl CounterStore {
    /// Take the meter's counter for this process, or fail at once if another holds it.
    pub fn lock(&self, meter: &MeterId) -> Result<CounterLock, MeterError> {
        let path = self.dir.join(format!("{}.lock", meter.as_str()));
        let err = |e: String| MeterError::Storage(format!("{}: {e}", path.display()));
        std::fs::create_dir_all(&self.dir).map_err(|e| err(e.to_string()))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| err(e.to_string()))?;
        match file.try_lock() {
            Ok(()) => Ok(CounterLock(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(MeterError::Storage(format!(
                "the invocation counter of {meter} is in use by another process (a running daemon?): \
                 two users of one key would repeat nonces"
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(err(e.to_string())),
        }
    }
}

/// Write a file so that a crash leaves either the old or the new content.
fn write_atomically(dir: &Path, path: &Path, content: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename is durable only once the directory entry is.
    std::fs::File::open(dir)?.sync_all()
}

/// Tracks the reservation of one session.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reservation {
    /// Values up to here are on disk as reserved.
    pub reserved: u32,
}

impl Reservation {
    /// Make sure at least `needed` more values beyond `current` are reserved.
    pub fn ensure(
        &mut self,
        store: &CounterStore,
        meter: &MeterId,
        current: u32,
        needed: u32,
    ) -> Result<(), MeterError> {
        let want = current.saturating_add(needed);
        if want <= self.reserved {
            return Ok(());
        }
        if current == u32::MAX || want == u32::MAX {
            return Err(MeterError::Storage("invocation counter exhausted: the meter's keys must be changed".into()));
        }
        let upto = want.saturating_add(RESERVATION_BLOCK);
        store.reserve(meter, upto)?;
        self.reserved = upto;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_survives_a_new_store() {
        let dir = std::env::temp_dir().join(format!("headend-ic-{}", std::process::id()));
        let meter = MeterId::new("M1").expect("valid");
        let store = CounterStore::new(&dir);
        assert_eq!(store.load(&meter).expect("empty"), 0);
        let mut r = Reservation::default();
        r.ensure(&store, &meter, 0, 3).expect("reserves");
        assert_eq!(r.reserved, 3 + RESERVATION_BLOCK);
        // Within the reservation nothing is written.
        r.ensure(&store, &meter, 500, 3).expect("no-op");
        assert_eq!(r.reserved, 3 + RESERVATION_BLOCK);
        // A restart resumes at the reservation, beyond anything used.
        assert_eq!(CounterStore::new(&dir).load(&meter).expect("reads"), 3 + RESERVATION_BLOCK);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_reservation_never_moves_backwards() {
        let dir = std::env::temp_dir().join(format!("headend-ic-back-{}", std::process::id()));
        let meter = MeterId::new("M3").expect("valid");
        let store = CounterStore::new(&dir);
        store.reserve(&meter, 5000).expect("reserves");
        store.reserve(&meter, 1002).expect("a lower reservation is a no-op");
        assert_eq!(store.load(&meter).expect("reads"), 5000);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_process_at_a_time_holds_a_counter() {
        let dir = std::env::temp_dir().join(format!("headend-ic-lock-{}", std::process::id()));
        let meter = MeterId::new("M4").expect("valid");
        let store = CounterStore::new(&dir);
        let held = store.lock(&meter).expect("first holder");
        assert!(matches!(store.lock(&meter), Err(MeterError::Storage(_))), "a second holder is refused");
        drop(held);
        assert!(store.lock(&meter).is_ok(), "free again once released");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_zero() {
        let dir = std::env::temp_dir().join(format!("headend-ic-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("M2.ic"), "garbage").expect("write");
        let meter = MeterId::new("M2").expect("valid");
        assert!(CounterStore::new(&dir).load(&meter).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
