//! The fleets and site configurations of the collection scenarios (`collection`,
//! `serial-bus`): DLMS meters behind HDLC gateways or one emulated bus (through a proxy
//! that counts the bytes), the generated mixed fleet regrouped onto links, and the
//! daemon's memory from /proc.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::anyhow;
use meter_sim::{EndpointSpec, FleetConfig, MeterSpec, Simulator};
use tokio::net::{TcpListener, TcpStream};

use crate::collection::{RigSetup, Wire};

/// `n` DLMS meters without authentication behind `k` HDLC gateways (at `baud` when set).
pub fn hdlc_fleet(n: usize, k: usize, baud: Option<u32>) -> FleetConfig {
    let k = k.clamp(1, n.max(1));
    let per = n.div_ceil(k);
    let meters = (0..n)
        .map(|i| {
            let mut m = MeterSpec::dlms(format!("SIM{:010}", i + 1), i);
            m.physical_address = 16 + (i % per) as u16;
            m.control_mode = 2;
            m
        })
        .collect();
    let endpoints = (0..k)
        .map(|g| EndpointSpec::DlmsHdlcTcp {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            meters: (g * per..((g + 1) * per).min(n)).collect(),
            baud,
        })
        .collect();
    FleetConfig { meters, endpoints, ..FleetConfig::default() }
}

/// The site configuration of an HDLC fleet; on a bus, the link goes through a proxy
/// that counts the bytes.
pub async fn hdlc_site(sim: &Simulator, s: &RigSetup, wire: Option<&Arc<Wire>>) -> anyhow::Result<String> {
    let hdlc = s.hdlc.as_deref().map(|h| format!("hdlc = {{ {h} }}\n")).unwrap_or_default();
    let mut text = String::from("state_dir = \"state\"\n\n");
    for (g, e) in sim.endpoints().iter().enumerate() {
        let mut addr = e.addr.ok_or_else(|| anyhow!("an endpoint is not bound"))?;
        if let Some(w) = wire {
            addr = counting_proxy(addr, Arc::clone(w)).await?;
        }
        let timeout = if wire.is_some() { 20_000 } else { 5000 };
        text.push_str(&format!(
            "[[link]]\nname = \"dc-{g}\"\nprotocol = \"dlms-hdlc\"\naddress = \"{addr}\"\ntimeout_ms = {timeout}\n{hdlc}\n"
        ));
        for &i in &e.meters {
            let m = sim.config().meters.get(i).ok_or_else(|| anyhow!("meter {i}"))?;
            text.push_str(&format!(
                "[[meter]]\nid = \"MTR-{:06}\"\nlink = \"dc-{g}\"\nidentity = \"{}\"\nphysical_address = {}\n\n",
                i + 1,
                m.id,
                m.physical_address
            ));
        }
    }
    Ok(text)
}

/// The generated site configuration, with its wrapper meters spread over links of
/// `group` meters (a link is one TCP connection; in the field each meter is its own).
pub fn regroup_wrapper(text: &str, group: usize) -> anyhow::Result<String> {
    let mut t: toml::Table = toml::from_str(text)?;
    let mut addr = None;
    if let Some(toml::Value::Array(links)) = t.get("link") {
        addr = links
            .iter()
            .find(|l| l.get("name").and_then(|n| n.as_str()) == Some("wrapper-1"))
            .and_then(|l| l.get("address").cloned());
    }
    let Some(addr) = addr else { return Ok(text.to_owned()) };
    let mut k = 0usize;
    if let Some(toml::Value::Array(meters)) = t.get_mut("meter") {
        for m in meters.iter_mut().filter_map(|m| m.as_table_mut()) {
            if m.get("link").and_then(|n| n.as_str()) == Some("wrapper-1") {
                m.insert("link".into(), toml::Value::String(format!("wrapper-1-{}", k / group)));
                k += 1;
            }
        }
    }
    if let Some(toml::Value::Array(links)) = t.get_mut("link") {
        links.retain(|l| l.get("name").and_then(|n| n.as_str()) != Some("wrapper-1"));
        for g in 0..k.div_ceil(group) {
            let mut l = toml::Table::new();
            l.insert("name".into(), toml::Value::String(format!("wrapper-1-{g}")));
            l.insert("protocol".into(), toml::Value::String("dlms-wrapper".into()));
            l.insert("address".into(), addr.clone());
            links.push(toml::Value::Table(l));
        }
    }
    // Links first: the reader looks for `[[link]]` and `id = ` lines.
    Ok(toml::to_string(&t)?)
}

/// Forward a loopback port to `target`, counting bytes both ways.
async fn counting_proxy(target: SocketAddr, wire: Arc<Wire>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let wire = Arc::clone(&wire);
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(target).await else { return };
                let _ = upstream.set_nodelay(true);
                let _ = client.set_nodelay(true);
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let w1 = Arc::clone(&wire);
                let up = async move { copy_counting(&mut cr, &mut uw, &w1.to_meter).await };
                let down = async move { copy_counting(&mut ur, &mut cw, &wire.from_meter).await };
                tokio::join!(up, down);
            });
        }
    });
    Ok(addr)
}

async fn copy_counting(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    n: &AtomicU64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 4096];
    while let Ok(k) = r.read(&mut buf).await {
        if k == 0 || w.write_all(buf.get(..k).unwrap_or(&[])).await.is_err() {
            return;
        }
        n.fetch_add(k as u64, Ordering::Relaxed);
    }
}

/// VmRSS and VmHWM of a process, KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}
