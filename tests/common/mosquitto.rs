//! A real broker for tests: `mosquitto` on a free loopback port, and a small MQTT test
//! client that waits on messages instead of sleeping.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode};
use tokio::sync::{mpsc, oneshot};

/// How long a broker may take to say it is running.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// Log lines kept, for `wait_log` and panic messages.
const LOG_KEPT: usize = 20_000;

/// The broker's recent log lines, and a signal for each new one.
type Log = Arc<(Mutex<VecDeque<String>>, Condvar)>;

/// A running `mosquitto -c <tempfile>`; killed on drop.
pub struct Mosquitto {
    port: u16,
    conf: PathBuf,
    child: Option<Child>,
    log: Log,
}

impl Mosquitto {
    /// Start on a free loopback port, anonymous access, no persistence.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Start with extra configuration lines (e.g. `password_file ...` with
    /// `allow_anonymous false` later in the file, which wins).
    pub fn start_with(extra: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let conf = std::env::temp_dir().join(format!(
            "headend-mosquitto-{}-{}.conf",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        // mosquitto 2.0 reads `listener 0` as a unix socket, so a port is picked here and
        // released; another process may take it in between, hence the few attempts.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let text = format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nlog_type all\n{extra}\n"
            );
            std::fs::write(&conf, text).expect("mosquitto config written");
            let mut m = Self { port, conf: conf.clone(), child: None, log: Arc::default() };
            match m.spawn() {
                Ok(()) => return m,
                Err(log) => last = log,
            }
        }
        panic!("mosquitto did not start:\n{last}");
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kill the broker (as a crash would: no goodbye to clients) and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop, then start again on the same port; returns once it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(log) = self.spawn() {
            panic!("mosquitto did not restart on port {}:\n{log}", self.port);
        }
    }

    /// The broker's recent log, for assertions and panic messages.
    pub fn log(&self) -> String {
        self.log.0.lock().map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
    }

    /// The first kept log line that satisfies `what`, waiting for it as lines come in;
    /// panics after `within`. Blocking: in async tests call it in `block_in_place`.
    pub fn wait_log(&self, within: Duration, what: impl Fn(&str) -> bool) -> String {
        let (lines, signal) = &*self.log;
        let deadline = std::time::Instant::now() + within;
        let mut l = lines.lock().expect("log lock");
        loop {
            if let Some(line) = l.iter().find(|line| what(line)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "no such line in the broker's log within {within:?}");
            l = signal.wait_timeout(l, left).expect("log lock").0;
        }
    }

    /// Start the process and wait for its "running" line (written after the listener is
    /// bound). Err carries the log when it exits first (e.g. the port was taken).
    fn spawn(&mut self) -> Result<(), String> {
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto is installed (.ci/run installs it)");
        let stderr = child.stderr.take().expect("piped");
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let log = self.log.clone();
        // Drains the log for the life of the process, so mosquitto never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let running = line.contains(" running");
                if let Ok(mut l) = log.0.lock() {
                    if l.len() == LOG_KEPT {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
                log.1.notify_all();
                if running {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(true);
                    }
                }
            }
            if let Some(tx) = ready.take() {
                let _ = tx.send(false);
            }
        });
        match ready_rx.recv_timeout(READY_WITHIN) {
            Ok(true) => {
                self.child = Some(child);
                Ok(())
            }
            other => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("({other:?}) {}", self.log()))
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.conf);
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    l.local_addr().expect("local addr").port()
}

/// A message received by a [`TestClient`].
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// The retain flag.
    pub retain: bool,
}

impl Message {
    /// The payload as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", self.topic, String::from_utf8_lossy(&self.payload)))
    }
}

type PubAcks = Arc<Mutex<(VecDeque<oneshot::Sender<()>>, HashMap<u16, oneshot::Sender<()>>)>>;

/// An MQTT client for tests (clean session, QoS 1). Its event loop runs in a task; it
/// ends at the first connection error (then `recv` returns None): a test that restarts
/// the broker makes a new client.
pub struct TestClient {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Message>,
    acks: PubAcks,
    publish_lock: tokio::sync::Mutex<()>,
    task: tokio::task::JoinHandle<()>,
}

impl TestClient {
    /// Connect to the broker on `port` and subscribe to `filters` (QoS 1); returns once
    /// every SUBACK is in, so nothing published afterwards is missed.
    pub async fn connect(port: u16, filters: &[&str]) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        Self::connect_as(port, &format!("test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)), filters)
            .await
    }

    /// [`TestClient::connect`] with a chosen client id (taking an id over makes the broker
    /// drop the client that had it: a way to cut one client's connection).
    pub async fn connect_as(port: u16, id: &str, filters: &[&str]) -> Self {
        Self::connect_with(Self::options(port, id), filters).await
    }

    /// [`TestClient::connect_as`] with a user name and password (for brokers with an ACL).
    pub async fn connect_user(port: u16, id: &str, user: &str, password: &str, filters: &[&str]) -> Self {
        let mut opts = Self::options(port, id);
        opts.set_credentials(user, password);
        Self::connect_with(opts, filters).await
    }

    /// The options [`TestClient::connect_as`] uses.
    fn options(port: u16, id: &str) -> MqttOptions {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(8 << 20, 8 << 20);
        opts
    }

    /// Connect with these options and subscribe to `filters`, as [`TestClient::connect`].
    pub async fn connect_with(opts: MqttOptions, filters: &[&str]) -> Self {
        let (client, mut events) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
        let acks: PubAcks = Arc::default();
        let task_acks = acks.clone();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let m = Message { topic: p.topic.clone(), payload: p.payload.to_vec(), retain: p.retain };
                        let _ = tx.send(m);
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let ok = ack.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                        let _ = sub_tx.send(ok);
                    }
                    // Publishes leave in request order: pair each packet id with its waiter.
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        let mut a = task_acks.lock().expect("acks lock");
                        if let Some(w) = a.0.pop_front() {
                            a.1.insert(pkid, w);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(w) = task_acks.lock().expect("acks lock").1.remove(&ack.pkid) {
                            let _ = w.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        for f in filters {
            client.subscribe(*f, QoS::AtLeastOnce).await.expect("subscribe queued");
        }
        for f in filters {
            let ok = tokio::time::timeout(READY_WITHIN, sub_rx.recv()).await;
            assert!(matches!(ok, Ok(Some(true))), "subscription to {f} not granted: {ok:?}");
        }
        Self { client, rx, acks, publish_lock: tokio::sync::Mutex::new(()), task }
    }

    /// Publish with QoS 1 and return once the broker acknowledged it.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.publish_with(topic, payload, false).await;
    }

    /// Publish with QoS 1, retained or not, and wait for the PUBACK.
    pub async fn publish_with(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        let (tx, rx) = oneshot::channel();
        {
            // The waiter is queued and the publish requested under one lock, so waiters
            // stay in the order the event loop sends the packets.
            let _order = self.publish_lock.lock().await;
            self.acks.lock().expect("acks lock").0.push_back(tx);
            self.client.publish(topic, QoS::AtLeastOnce, retain, payload.into()).await.expect("publish queued");
        }
        tokio::time::timeout(READY_WITHIN, rx).await.expect("PUBACK in time").expect("client alive");
    }

    /// The next message, or None if none comes within `within` (or the connection ended).
    pub async fn recv(&mut self, within: Duration) -> Option<Message> {
        tokio::time::timeout(within, self.rx.recv()).await.ok().flatten()
    }

    /// The first message that satisfies `what`, skipping others; panics after `within`.
    pub async fn expect(&mut self, within: Duration, what: impl Fn(&Message) -> bool) -> Message {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if what(&m) => return m,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the test client's connection ended"),
                Err(_) => panic!("no expected message within {within:?}"),
            }
        }
    }

    /// Every message until one satisfies `last` (included); panics after `within`.
    pub async fn collect_until(&mut self, within: Duration, last: impl Fn(&Message) -> bool) -> Vec<Message> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) => {
                    let done = last(&m);
                    out.push(m);
                    if done {
                        return out;
                    }
                }
                Ok(None) => panic!("the test client's connection ended after {} messages", out.len()),
                Err(_) => panic!("no final message within {within:?}; got {out:?}"),
            }
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
