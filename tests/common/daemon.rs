//! The daemon as a process (so tests can SIGKILL it), and an MQTT observer that waits
//! on messages instead of sleeping.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::Notify;

/// `headend run` in a child process.
pub struct DaemonProcess {
    child: Child,
    /// Everything it logged.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl DaemonProcess {
    /// Start the daemon on `config`, against `broker`.
    pub fn start(config: &Path, broker: &str) -> Self {
        Self::start_with(config, &["--broker", broker])
    }

    /// Start the daemon on `config` with extra arguments (none: the broker of `[mqtt]`).
    pub fn start_with(config: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_headend"))
            .args(["run", "--config", &config.to_string_lossy()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("headend runs");
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(mut l) = sink.lock() {
                        l.push(line);
                    }
                }
            });
        }
        Self { child, log }
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGHUP: reload the configuration.
    pub fn hup(&self) {
        let _ = Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status();
    }

    /// SIGTERM, and wait for the exit status.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().ok().and_then(|s| s.code())
    }

    /// The log so far, one string.
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message seen.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Topic.
    pub topic: String,
    /// Payload as JSON (Null when not JSON).
    pub json: Value,
    /// Retained flag.
    pub retain: bool,
}

/// A subscriber to `{prefix}/#` that keeps everything it sees.
pub struct Observer {
    /// The client, to publish with.
    pub client: AsyncClient,
    seen: Arc<Mutex<Vec<Seen>>>,
    arrived: Arc<Notify>,
}

impl Observer {
    /// Connect (persistent session under `client_id`), subscribe to `{prefix}/#`, and
    /// return once the subscription is acknowledged.
    pub async fn connect(port: u16, prefix: &str, client_id: &str) -> Self {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(o, 256);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let (suback_tx, suback_rx) = tokio::sync::oneshot::channel();
        let mut suback_tx = Some(suback_tx);
        let (s, a) = (Arc::clone(&seen), Arc::clone(&arrived));
        let sub_client = client.clone();
        let filter = format!("{prefix}/#");
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub_client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = suback_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let json = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if let Ok(mut v) = s.lock() {
                            v.push(Seen { topic: p.topic.clone(), json, retain: p.retain });
                        }
                        a.notify_waiters();
                    }
                    Ok(_) => {}
                    // The broker went away (a restart test): try again shortly.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), suback_rx).await.expect("subscribed in time").expect("suback");
        Self { client, seen, arrived }
    }

    /// Everything seen so far.
    pub fn all(&self) -> Vec<Seen> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Wait (up to `secs`) for a message matching `pred`; panics with what was seen.
    pub async fn wait_for(&self, secs: u64, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let notified = self.arrived.notified();
            if let Some(m) = self.all().into_iter().find(|m| pred(m)) {
                return m;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let seen: Vec<String> = self.all().iter().map(|m| format!("{} {}", m.topic, m.json)).collect();
                panic!("timed out waiting for {what}; seen:\n{}", seen.join("\n"));
            }
        }
    }

    /// Wait for the final status of command `id` on `{prefix}/result/{meter}`.
    pub async fn final_status(&self, id: &str, secs: u64) -> Value {
        let finals = ["succeeded", "armed", "superseded", "rejected", "failed", "expired"];
        self.wait_for(secs, &format!("final status of {id}"), |m| {
            m.topic.contains("/result/")
                && m.json["id"] == id
                && m.json["duplicate"] != true
                && finals.iter().any(|f| m.json["status"] == *f)
        })
        .await
        .json
    }

    /// Every status message of command `id`, in arrival order (repeats excluded).
    pub fn statuses(&self, id: &str) -> Vec<String> {
        self.all()
            .iter()
            .filter(|m| m.topic.contains("/result/") && m.json["id"] == id && m.json["duplicate"] != true)
            .filter_map(|m| m.json["status"].as_str().map(str::to_owned))
            .collect()
    }

    /// Publish QoS 1 and wait until the broker has it.
    pub async fn publish(&self, topic: &str, payload: &str) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec()).await.expect("queued");
    }
}
