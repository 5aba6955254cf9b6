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
    // Version 2: interval collection. The newest stored row per meter and source (where
    // the next read starts, and what makes a row stored twice impossible), and the
    // outbox of readings batches not yet acknowledged by the broker.
    r#"
    CREATE TABLE readings_progress (
        meter           TEXT NOT NULL,
        source          TEXT NOT NULL,   -- profile OBIS, or "snapshot"
        last_s          INTEGER NOT NULL,-- capture time of the newest row stored, Unix s
        last_values     TEXT,            -- its values (JSON), for the cumulative check
        updated_ms      INTEGER NOT NULL,
        PRIMARY KEY (meter, source)
    );

    CREATE TABLE readings_outbox (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- publish order; the batch id
        meter           TEXT NOT NULL,
        source          TEXT NOT NULL,
        first_s         INTEGER NOT NULL,
        last_s          INTEGER NOT NULL,
        rows            INTEGER NOT NULL,
        payload         TEXT NOT NULL,   -- the readings message, frozen: republished as is
        created_ms      INTEGER NOT NULL
    );
    "#,
    // Version 3: a cleared payment is `processed` once the reconnects it derives are
    // committed (in the same transaction as they are); recovery feeds the engine again
    // every cleared payment still unprocessed, so a crash between the two loses nothing.
    // Rows from before are taken as processed. The publish outbox: result, state and
    // payment messages committed with the records they announce, deleted after the
    // broker's PUBACK, published again after a restart.
    r#"
    ALTER TABLE payments ADD COLUMN processed INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE publish_outbox (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- publish order
        topic           TEXT NOT NULL,
        payload         TEXT NOT NULL,
        retain          INTEGER NOT NULL
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
    migrate_to(conn, LATEST)
}

/// Bring a database to `target` (at most [`LATEST`]); tests build old versions with it.
fn migrate_to(conn: &mut Connection, target: u32) -> Result<u32, JournalError> {
    let found = version(conn)?;
    if found > LATEST {
        return Err(JournalError::NewerSchema { found, supported: LATEST });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().take(target as usize).skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [i as i64 + 1])?;
        tx.commit()?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_database_migrates_to_2_keeping_its_commands() {
        let mut conn = Connection::open_in_memory().expect("sqlite");
        assert_eq!(migrate_to(&mut conn, 1).ok(), Some(0));
        conn.execute_batch(
            "INSERT INTO commands (id, meter, action, request, received_ms, expires_ms, status, updated_ms)
             VALUES ('c1', 'M1', 'read', '{}', 1, 2, 'accepted', 1);",
        )
        .expect("a version-1 row");
        assert!(conn.prepare("SELECT * FROM readings_outbox").is_err(), "no outbox in version 1");
        assert_eq!(migrate(&mut conn).ok(), Some(1), "found at version 1");
        assert_eq!(version(&conn).ok(), Some(LATEST));
        let kept: String = conn.query_row("SELECT id FROM commands", [], |r| r.get(0)).expect("kept");
        assert_eq!(kept, "c1");
        conn.execute_batch(
            "INSERT INTO readings_outbox (meter, source, first_s, last_s, rows, payload, created_ms)
             VALUES ('M1', 'snapshot', 1, 1, 1, '{}', 1);
             INSERT INTO readings_progress (meter, source, last_s, updated_ms) VALUES ('M1', 'snapshot', 1, 1);",
        )
        .expect("version-2 tables");
        assert_eq!(migrate(&mut conn).ok(), Some(LATEST), "nothing more to do");
    }
}
