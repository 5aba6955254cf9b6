//! The journal's schema and its migrations.
//!
//! `schema_version` holds one row per applied migration. Migration N (1-based) takes the
//! schema from version N-1 to N inside one transaction together with its version row, so
//! a crash during a migration leaves the old version intact. A file from a newer build
//! (a version above [`LATEST`]) is refused rather than guessed at.

use rusqlite::Connection;

use super::JournalError;

/// The schema this build writes.
pub const LATEST: u32 = MIGRATIONS.len() as u32;

/// Migration `i` takes version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // Version 1: commands with their latest status, the audit trail, payments, the
    // meters' relay knowledge, quarantine events.
    r#"
    CREATE TABLE commands (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        id              TEXT NOT NULL UNIQUE,
        meter           TEXT NOT NULL,
        action          TEXT NOT NULL,
        reason          TEXT,
        operator        TEXT,
        trigger_payment TEXT,
        request         TEXT NOT NULL,   -- canonical JSON, read back by CommandRequest::parse
        received_ms     INTEGER NOT NULL,
        expires_ms      INTEGER NOT NULL,
        status          TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        wake_ms         INTEGER,
        final           INTEGER NOT NULL DEFAULT 0,
        latest          TEXT,            -- the latest result message, republished on a repeat
        updated_ms      INTEGER NOT NULL
    );
    CREATE INDEX commands_meter ON commands(meter, seq);
    CREATE INDEX commands_open ON commands(final, seq);

    CREATE TABLE events (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms           INTEGER NOT NULL,
        kind            TEXT NOT NULL,   -- command | status | note | payment | meter | quarantine
        meter           TEXT,
        command         TEXT,
        status          TEXT,
        operator        TEXT,
        reason          TEXT,
        trigger_payment TEXT,
        detail          TEXT NOT NULL
    );
    CREATE INDEX events_meter ON events(meter, seq);

    CREATE TABLE payments (
        id              TEXT PRIMARY KEY,
        account         TEXT NOT NULL,
        cleared         INTEGER NOT NULL,
        confirmed_ms    INTEGER,
        received_ms     INTEGER NOT NULL,
        body            TEXT NOT NULL
    );
    CREATE INDEX payments_account ON payments(account, cleared, confirmed_ms);

    CREATE TABLE meters (
        meter           TEXT PRIMARY KEY,
        relay           TEXT NOT NULL,
        cut_reason      TEXT,
        since_ms        INTEGER,
        updated_ms      INTEGER NOT NULL
    );

    CREATE TABLE quarantine (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms           INTEGER NOT NULL,
        event           TEXT NOT NULL,   -- tripped | lifted
        detail          TEXT NOT NULL
    );
    "#,
];

/// The version a database is at (0 for an empty file).
pub fn version(conn: &Connection) -> Result<u32, JournalError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let v: Option<i64> = conn.query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))?;
    Ok(u32::try_from(v.unwrap_or(0)).unwrap_or(u32::MAX))
}

/// Bring a database to [`LATEST`]; returns the version it was found at.
pub fn migrate(conn: &mut Connection) -> Result<u32, JournalError> {
    let found = version(conn)?;
    if found > LATEST {
        return Err(JournalError::NewerSchema { found, supported: LATEST });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [i as i64 + 1])?;
        tx.commit()?;
    }
    Ok(found)
}
