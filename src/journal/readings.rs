//! The readings outbox, on the journal's writer thread (so readings share its group
//! commit with commands).
//!
//! A batch is stored with the newest capture time of its meter and source in one
//! transaction; rows at or before the stored one are refused there, so no row is ever
//! stored twice, whatever the caller does. The batch's message is built and frozen when it
//! is stored, with its `seq` as the batch id: after a restart it is published again as it
//! was, never re-batched, so a consumer that saw it before sees the same rows under the
//! same id. It is deleted only after the broker acknowledged it.

use rusqlite::{params, Connection, OptionalExtension};

use super::{Journal, JournalError, Pending};
use crate::contract::ReadingsBatch;

/// A batch to store.
#[derive(Debug, Clone)]
pub struct NewBatch {
    /// The message, `batch` unset (the store sets it).
    pub message: ReadingsBatch,
    /// Capture time of each row, Unix s, ascending.
    pub times: Vec<i64>,
    /// The newest row's values, kept for the next batch's checks.
    pub last_values: Vec<Option<f64>>,
    /// When, Unix ms.
    pub created_ms: i64,
}

/// What [`Journal::store_readings`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stored {
    /// The batch id, when any row was new.
    pub seq: Option<i64>,
    /// Rows stored.
    pub rows: usize,
    /// Rows refused because their time was already stored.
    pub refused: usize,
    /// The newest capture time now stored for the meter and source.
    pub last_s: Option<i64>,
}

/// Where a meter's collection stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The meter.
    pub meter: String,
    /// The profile's OBIS code, or `snapshot`.
    pub source: String,
    /// The newest stored capture time, Unix s.
    pub last_s: i64,
    /// Its values.
    pub last_values: Option<Vec<Option<f64>>>,
}

/// A batch waiting for the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Its id and place in the publishing order.
    pub seq: i64,
    /// The meter (the topic's last level).
    pub meter: String,
    /// The message.
    pub payload: String,
}

impl Journal {
    /// Store a batch (see the module documentation). Durable when this resolves.
    pub fn store_readings(&self, batch: NewBatch) -> Pending<Stored> {
        self.submit(true, move |c| store(c, batch))
    }

    /// Store several batches in one job (one transaction), each all or nothing.
    pub fn store_readings_many(&self, batches: Vec<NewBatch>) -> Pending<Vec<Result<Stored, JournalError>>> {
        self.submit(true, move |c| {
            let mut out = Vec::with_capacity(batches.len());
            for b in batches {
                let st = |sql: &str| c.prepare_cached(sql).and_then(|mut s| s.execute([])).map(|_| ());
                st("SAVEPOINT batch")?;
                let r = store(c, b);
                if r.is_ok() {
                    st("RELEASE batch")?;
                } else {
                    st("ROLLBACK TO batch")?;
                    st("RELEASE batch")?;
                }
                out.push(r);
            }
            Ok(out)
        })
    }

    /// The newest stored capture time of every meter and source.
    pub fn readings_progress(&self) -> Pending<Vec<Progress>> {
        self.submit(false, progress)
    }

    /// Up to `limit` batches after `after_seq`, in order.
    pub fn outbox_page(&self, after_seq: i64, limit: u32) -> Pending<Vec<OutboxEntry>> {
        self.submit(false, move |c| page(c, after_seq, limit))
    }

    /// Forget batches the broker acknowledged; returns how many were removed.
    pub fn outbox_remove(&self, seqs: Vec<i64>) -> Pending<usize> {
        self.submit(true, move |c| {
            let mut st = c.prepare_cached("DELETE FROM readings_outbox WHERE seq = ?1")?;
            let mut n = 0;
            for s in seqs {
                n += st.execute([s])?;
            }
            Ok(n)
        })
    }

    /// Batches waiting.
    pub fn outbox_depth(&self) -> Pending<u64> {
        self.submit(false, |c| {
            let n: i64 = c.query_row("SELECT count(*) FROM readings_outbox", [], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }
}

fn store(c: &Connection, mut b: NewBatch) -> Result<Stored, JournalError> {
    let meter = b.message.meter.to_string();
    let source = b.message.source.clone();
    let stored_last: Option<i64> = c
        .prepare_cached("SELECT last_s FROM readings_progress WHERE meter = ?1 AND source = ?2")?
        .query_row(params![meter, source], |r| r.get(0))
        .optional()?;
    let total = b.times.len().min(b.message.rows.len());
    let fresh: Vec<bool> = b.times.iter().take(total).map(|t| stored_last.is_none_or(|l| *t > l)).collect();
    let refused = fresh.iter().filter(|f| !**f).count();
    if refused > 0 {
        let mut keep = fresh.iter();
        b.message.rows.truncate(total);
        b.message.rows.retain(|_| keep.next().copied().unwrap_or(false));
        let kept_at: Vec<&str> = b.message.rows.iter().map(|r| r.at.as_str()).collect();
        let flags = std::mem::take(&mut b.message.flags);
        b.message.flags = flags.into_iter().filter(|f| kept_at.contains(&f.at.as_str())).collect();
        b.times = b.times.iter().zip(&fresh).filter(|(_, f)| **f).map(|(t, _)| *t).collect();
    }
    let (Some(first), Some(last)) = (b.times.first().copied(), b.times.last().copied()) else {
        return Ok(Stored { seq: None, rows: 0, refused, last_s: stored_last });
    };
    let rows = b.times.len();
    c.prepare_cached(
        "INSERT INTO readings_outbox (meter, source, first_s, last_s, rows, payload, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, '', ?6)",
    )?
    .execute(params![meter, source, first, last, rows as i64, b.created_ms])?;
    let seq = c.last_insert_rowid();
    b.message.batch = Some(seq);
    let payload = serde_json::to_string(&b.message).map_err(|e| JournalError::Corrupt(format!("batch: {e}")))?;
    c.prepare_cached("UPDATE readings_outbox SET payload = ?2 WHERE seq = ?1")?.execute(params![seq, payload])?;
    let values = serde_json::to_string(&b.last_values).unwrap_or_default();
    c.prepare_cached(
        "INSERT INTO readings_progress (meter, source, last_s, last_values, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(meter, source) DO UPDATE SET last_s = ?3, last_values = ?4, updated_ms = ?5",
    )?
    .execute(params![meter, source, last, values, b.created_ms])?;
    Ok(Stored { seq: Some(seq), rows, refused, last_s: Some(last) })
}

fn progress(c: &Connection) -> Result<Vec<Progress>, JournalError> {
    let mut st = c.prepare("SELECT meter, source, last_s, last_values FROM readings_progress")?;
    let rows = st.query_map([], |r| {
        let values: Option<String> = r.get(3)?;
        Ok(Progress {
            meter: r.get(0)?,
            source: r.get(1)?,
            last_s: r.get(2)?,
            // Only a check's input: an unreadable value is a skipped check, not an error.
            last_values: values.and_then(|v| serde_json::from_str(&v).ok()),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn page(c: &Connection, after: i64, limit: u32) -> Result<Vec<OutboxEntry>, JournalError> {
    let mut st =
        c.prepare_cached("SELECT seq, meter, payload FROM readings_outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
    let rows = st.query_map(params![after, limit], |r| {
        Ok(OutboxEntry { seq: r.get(0)?, meter: r.get(1)?, payload: r.get(2)? })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{ReadingColumn, ReadingRow};
    use crate::meter::MeterId;

    fn batch(times: &[i64]) -> NewBatch {
        let meter = MeterId::new("M1").unwrap_or_else(|_| unreachable!());
        NewBatch {
            message: ReadingsBatch {
                meter,
                source: "1.0.99.1.0.255".into(),
                interval_s: 900,
                columns: vec![ReadingColumn { name: "1.0.1.8.0.255".into(), unit: "Wh".into() }],
                rows: times.iter().map(|t| ReadingRow { at: t.to_string(), values: vec![Some(*t as f64)] }).collect(),
                batch: None,
                flags: Vec::new(),
                gaps: Vec::new(),
            },
            times: times.to_vec(),
            last_values: vec![times.last().map(|t| *t as f64)],
            created_ms: 1,
        }
    }

    #[test]
    fn rows_are_stored_once_and_batches_frozen_with_their_id() {
        let mut conn = Connection::open_in_memory().unwrap_or_else(|_| unreachable!());
        super::super::schema::migrate(&mut conn).unwrap_or_else(|e| panic!("{e}"));
        let s1 = store(&conn, batch(&[900, 1800])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s1.rows, s1.refused, s1.last_s), (2, 0, Some(1800)));
        // Overlapping: only the new row is stored.
        let s2 = store(&conn, batch(&[1800, 2700])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s2.rows, s2.refused, s2.last_s), (1, 1, Some(2700)));
        // Nothing new: no batch.
        let s3 = store(&conn, batch(&[900])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s3.seq, s3.refused, s3.last_s), (None, 1, Some(2700)));
        let out = page(&conn, 0, 10).unwrap_or_default();
        assert_eq!(out.len(), 2);
        let second: ReadingsBatch = serde_json::from_str(&out[1].payload).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(second.batch, s2.seq);
        assert_eq!(second.rows.iter().map(|r| r.at.as_str()).collect::<Vec<_>>(), vec!["2700"]);
        let p = progress(&conn).unwrap_or_default();
        assert_eq!(p[0].last_s, 2700);
        assert_eq!(p[0].last_values, Some(vec![Some(2700.0)]));
    }
}
