//! The durable command journal and audit trail: one SQLite file, written by one thread.
//!
//! # Durability
//!
//! The file is in WAL mode with `synchronous = FULL`: every COMMIT fsyncs the WAL before
//! it returns, and a caller's future resolves only after the COMMIT that holds its write
//! returned. So whatever a caller was told is written survives a crash of the process
//! and a loss of power; this is what lets the MQTT bridge ack a command, and publish
//! `accepted`, only after [`Journal::accept_command`] resolved. (`NORMAL` would skip the
//! fsync per commit and could lose the last commits on power loss: not acceptable for a
//! promise of "it will not be lost from here on".) A crash in the middle of a batch
//! loses only that uncommitted batch, whose callers were told nothing: the broker
//! redelivers the unacknowledged messages and the ids make the replay idempotent.
//!
//! # Group commit
//!
//! Callers never touch the connection. Each call queues a job for the writer thread and
//! gets a future. The thread takes everything queued, runs all writes in ONE transaction
//! (each in its own savepoint, so one failing write does not take the others down),
//! commits once, then answers each caller; reads run after the commit. A burst of a
//! thousand commands costs a handful of fsyncs instead of a thousand. Back-pressure comes
//! from the MQTT side (the bridge's in-flight window), so the queue is unbounded.
//!
//! Jobs are queued when the method is called, not when the future is first polled, so
//! the order of calls is the order of writes.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use crate::command::{Command, MeterRecord, Record, Recovered, StoredCommand};
use crate::contract::{AccountId, Payment, ResultMessage};
use crate::policy::QuarantineState;

mod publish;
mod readings;
mod schema;
mod store;

pub use publish::{Arrival, OutMessage, Taken, Unpublished};
pub use readings::{NewBatch, OutboxEntry, Progress, Stored};

pub use schema::LATEST as SCHEMA_VERSION;

/// Most jobs in one transaction: bounds the latency of the first caller of a huge burst.
const MAX_BATCH: usize = 4096;

/// What went wrong with the journal.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// SQLite failed (I/O, disk full, locked, constraint).
    #[error("journal: {0}")]
    Sqlite(String),
    /// The file was written by a newer head-end.
    #[error("journal schema version {found} is newer than this build's {supported}: upgrade the head-end")]
    NewerSchema {
        /// Found in the file.
        found: u32,
        /// What this build knows.
        supported: u32,
    },
    /// A stored row cannot be read back.
    #[error("journal data damaged: {0}")]
    Corrupt(String),
    /// A status for a command that was never journaled (a wiring bug).
    #[error("journal: no command {0} to record a status for")]
    UnknownCommand(String),
    /// A command the engine made has the id of a different stored command.
    #[error("journal: id {0} is already taken by a different command")]
    IdTaken(String),
    /// The writer thread is gone.
    #[error("journal closed")]
    Closed,
}

impl From<rusqlite::Error> for JournalError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e.to_string())
    }
}

/// What [`Journal::accept_command`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// New: now durable. Feed it to the engine.
    New,
    /// The id was taken before. `same_content` false means `duplicate_id`; `latest` is
    /// the last status message recorded (see [`crate::command::answer_repeat`]).
    Seen {
        /// Same meter and request.
        same_content: bool,
        /// The latest recorded status message.
        latest: Option<Box<ResultMessage>>,
    },
}

/// What [`Journal::accept_payment`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentAccepted {
    /// New: now durable. Feed it to the engine (it acts only if cleared).
    New,
    /// Seen before as not cleared, now cleared: feed it to the engine.
    NowCleared,
    /// Seen before, same content: nothing to do.
    Duplicate,
    /// Seen before with different content: refused, nothing changes.
    Conflict,
}

/// One audit trail entry (`headend audit --meter`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Order of writing.
    pub seq: i64,
    /// When, Unix ms.
    pub at_ms: i64,
    /// command | status | note | payment | meter | quarantine.
    pub kind: String,
    /// The meter.
    pub meter: Option<String>,
    /// The command.
    pub command: Option<String>,
    /// The status reached.
    pub status: Option<String>,
    /// Who asked (operator, or who lifted a quarantine).
    pub operator: Option<String>,
    /// The command's reason.
    pub reason: Option<String>,
    /// The payment behind it.
    pub trigger_payment: Option<String>,
    /// The message or request as JSON.
    pub detail: String,
}

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalStats {
    /// Write transactions committed (or attempted).
    pub transactions: u64,
    /// Write jobs run.
    pub writes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    writes: AtomicU64,
}

/// A job for the writer thread, with its typed answer hidden behind the trait.
trait Task: Send {
    /// Run; false when it failed (its savepoint is then rolled back).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answer the caller, given how the batch's commit went.
    fn complete(self: Box<Self>, commit: &Result<(), JournalError>);
}

struct Typed<T, F> {
    f: Option<F>,
    value: Option<Result<T, JournalError>>,
    reply: oneshot::Sender<Result<T, JournalError>>,
}

impl<T: Send, F: FnOnce(&Connection) -> Result<T, JournalError> + Send> Task for Typed<T, F> {
    fn run(&mut self, conn: &Connection) -> bool {
        let v = self.f.take().map_or(Err(JournalError::Closed), |f| f(conn));
        let ok = v.is_ok();
        self.value = Some(v);
        ok
    }
    fn complete(self: Box<Self>, commit: &Result<(), JournalError>) {
        let answer = match (self.value, commit) {
            (Some(Ok(_)), Err(e)) => Err(e.clone()),
            (Some(v), _) => v,
            (None, _) => Err(JournalError::Closed),
        };
        // The caller may have stopped waiting; that is its business.
        let _ = self.reply.send(answer);
    }
}

struct Job {
    write: bool,
    task: Box<dyn Task>,
}

/// A journal answer on its way: await it (or [`Pending::wait`] outside async code).
#[derive(Debug)]
pub struct Pending<T>(oneshot::Receiver<Result<T, JournalError>>);

impl<T> Future for Pending<T> {
    type Output = Result<T, JournalError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(JournalError::Closed)))
    }
}

impl<T> Pending<T> {
    /// Block until answered. Only outside an async runtime (tokio refuses it inside).
    pub fn wait(self) -> Result<T, JournalError> {
        self.0.blocking_recv().unwrap_or(Err(JournalError::Closed))
    }
}

struct Inner {
    tx: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue lets the thread finish what is queued, then stop.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The journal. Cheap to clone; the last clone dropped closes the file after the queued
/// writes are done.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("stats", &self.stats()).finish()
    }
}

fn open_connection(path: &Path) -> Result<Connection, JournalError> {
    let mut conn = Connection::open(path)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(JournalError::Sqlite(format!("could not switch {} to WAL (got {mode})", path.display())));
    }
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;")?;
    conn.set_prepared_statement_cache_capacity(64);
    schema::migrate(&mut conn)?;
    Ok(conn)
}

impl Journal {
    /// Open (or create) the journal file, migrate it to the current schema and start the
    /// writer thread. Blocking: call it at start-up (or in `spawn_blocking`).
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let conn = open_connection(path)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer(conn, rx, &c))
            .map_err(|e| JournalError::Sqlite(format!("cannot start the journal thread: {e}")))?;
        Ok(Self { inner: Arc::new(Inner { tx: Some(tx), thread: Some(thread), counters }) })
    }

    fn submit<T, F>(&self, write: bool, f: F) -> Pending<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job = Job { write, task: Box::new(Typed { f: Some(f), value: None, reply }) };
        if let Some(tx) = &self.inner.tx {
            // On a closed queue the job (and its reply sender) is dropped: the caller
            // gets `Closed`.
            let _ = tx.send(job);
        }
        Pending(rx)
    }

    /// Take a command received over MQTT: durable when this resolves with `New`. A
    /// command whose id is already taken is not stored again.
    pub fn accept_command(&self, cmd: &Command) -> Pending<Accepted> {
        let cmd = cmd.clone();
        self.submit(true, move |c| store::accept_command(c, &cmd))
    }

    /// Take a payment: durable when this resolves.
    pub fn accept_payment(&self, payment: &Payment, received_ms: i64) -> Pending<PaymentAccepted> {
        let p = payment.clone();
        self.submit(true, move |c| store::accept_payment(c, &p, received_ms))
    }

    /// Write the engine's records of one `handle` call, all or none.
    pub fn record(&self, records: Vec<Record>) -> Pending<()> {
        self.submit(true, move |c| records.iter().try_for_each(|r| store::apply(c, r)))
    }

    /// Commands that have not ended, in acceptance order.
    pub fn pending_commands(&self) -> Pending<Vec<StoredCommand>> {
        self.submit(false, store::pending_commands)
    }

    /// What is known of every meter's relay.
    pub fn meter_states(&self) -> Pending<Vec<MeterRecord>> {
        self.submit(false, store::meter_states)
    }

    /// `confirmed_at` of the account's latest cleared payment, Unix ms.
    pub fn latest_cleared_payment(&self, account: &AccountId) -> Pending<Option<i64>> {
        let a = account.clone();
        self.submit(false, move |c| Ok(store::latest_cleared(c, Some(&a))?.into_iter().next().map(|(_, t)| t)))
    }

    /// The quarantine, if on.
    pub fn quarantine(&self) -> Pending<Option<QuarantineState>> {
        self.submit(false, store::quarantine)
    }

    /// Everything the engine needs after a restart, read in one go.
    pub fn recover(&self) -> Pending<Recovered> {
        self.submit(false, |c| {
            Ok(Recovered {
                commands: store::pending_commands(c)?,
                meters: store::meter_states(c)?,
                cleared: store::latest_cleared(c, None)?,
                quarantine: store::quarantine(c)?,
                payments: store::unprocessed_payments(c)?,
            })
        })
    }

    /// The newest `limit` audit entries of a meter, oldest first.
    pub fn history(&self, meter: &str, limit: u32) -> Pending<Vec<AuditEntry>> {
        let m = meter.to_owned();
        self.submit(false, move |c| store::history(c, &m, limit))
    }

    /// Counters.
    pub fn stats(&self) -> JournalStats {
        JournalStats {
            transactions: self.inner.counters.transactions.load(Ordering::Relaxed),
            writes: self.inner.counters.writes.load(Ordering::Relaxed),
        }
    }
}

/// Read a meter's audit trail from a journal file without starting a writer, for
/// `headend audit --meter` while the daemon runs (WAL lets readers in beside it).
pub fn read_history(path: &Path, meter: &str, limit: u32) -> Result<Vec<AuditEntry>, JournalError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.execute_batch("PRAGMA busy_timeout = 5000;")?;
    let v = schema::version(&conn).or_else(|_| {
        // A read-only connection cannot create the version table; read it directly.
        conn.query_row("SELECT max(version) FROM schema_version", [], |r| r.get::<_, i64>(0))
            .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
            .map_err(JournalError::from)
    })?;
    if v > schema::LATEST {
        return Err(JournalError::NewerSchema { found: v, supported: schema::LATEST });
    }
    if v < schema::LATEST {
        // Read-only access must not migrate; the daemon does that when it opens the file.
        return Err(JournalError::Corrupt(format!("schema version {v}: open it with the daemon once to migrate it")));
    }
    store::history(&conn, meter, limit)
}

fn writer(conn: Connection, mut rx: mpsc::UnboundedReceiver<Job>, counters: &Counters) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (mut writes, mut reads): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(|j| j.write);
        if !writes.is_empty() {
            let commit = run_batch(&conn, &mut writes);
            if commit.is_err() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            counters.transactions.fetch_add(1, Ordering::Relaxed);
            counters.writes.fetch_add(writes.len() as u64, Ordering::Relaxed);
            for job in writes {
                job.task.complete(&commit);
            }
        }
        for mut job in reads.drain(..) {
            job.task.run(&conn);
            job.task.complete(&Ok(()));
        }
    }
}

fn run_batch(conn: &Connection, writes: &mut [Job]) -> Result<(), JournalError> {
    // Cached statements: a batch of thousands of jobs would otherwise parse these SQL
    // texts once per job.
    let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut st| st.execute([])).map(|_| ());
    run("BEGIN IMMEDIATE")?;
    for job in writes.iter_mut() {
        run("SAVEPOINT job")?;
        if job.task.run(conn) {
            run("RELEASE job")?;
        } else {
            run("ROLLBACK TO job")?;
            run("RELEASE job")?;
        }
    }
    run("COMMIT")?;
    Ok(())
}
