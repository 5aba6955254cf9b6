//! Read every meter of a site once (identity, relay, energy) with the head-end's drivers,
//! and report the rate. Used to load `meter-sim` for its memory figure in BENCHMARKS.md:
//!
//! ```sh
//! meter-sim --meters 100000 --headless --write-config /tmp/big/site.toml &
//! cargo run --release --example read_fleet -- /tmp/big/site.toml 512
//! ```
//!
//! Meters on their own TCP endpoint (wrapper, Modbus) are read in parallel, each over its
//! own connection; meters behind one HDLC gateway take turns on the gateway's link, as
//! on a real bus.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use headend::config::{LinkProtocol, SiteConfig};
use headend::dlms::counter::CounterStore;
use headend::driver::{Driver, Link};
use tokio::sync::Semaphore;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or_else(|| anyhow::anyhow!("usage: read_fleet SITE.toml [CONCURRENCY]"))?;
    let concurrency: usize = args.next().map(|c| c.parse()).transpose()?.unwrap_or(256);
    let site = Arc::new(SiteConfig::load(std::path::Path::new(&path))?);
    let counters = CounterStore::new(site.state_dir().join("invocation-counters"));

    // Work units: a whole HDLC gateway (its meters in turn), or one meter on its own link.
    let mut units: Vec<Vec<usize>> = Vec::new();
    let mut by_gateway: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, m) in site.meters.iter().enumerate() {
        match site.link(&m.link).map(|l| l.protocol) {
            Some(LinkProtocol::DlmsHdlc) => by_gateway.entry(m.link.as_str()).or_default().push(i),
            _ => units.push(vec![i]),
        }
    }
    units.extend(by_gateway.into_values());

    let gate = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for unit in units {
        let (site, counters, gate) = (Arc::clone(&site), counters.clone(), Arc::clone(&gate));
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let mut ok = 0usize;
            let mut failed = Vec::new();
            let Some(first) = unit.first().and_then(|i| site.meters.get(*i)) else { return (0, failed) };
            let Some(link_cfg) = site.link(&first.link) else { return (0, failed) };
            let mut link = match Link::open(link_cfg).await {
                Ok(l) => l,
                Err(e) => {
                    failed.push(format!("{}: {e}", first.link));
                    return (0, failed);
                }
            };
            for i in unit {
                let Some(meter) = site.meters.get(i) else { continue };
                let Ok(mut d) = Driver::from_config(&site, meter, counters.clone()) else { continue };
                let r = async {
                    d.read_identity(&mut link).await?;
                    d.read_relay(&mut link).await?;
                    d.read_registers(&mut link).await
                }
                .await;
                d.close(&mut link).await;
                match r {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{}: {e}", meter.id)),
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0usize, Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (o, f) = r?;
        ok += o;
        failed.extend(f);
    }
    let secs = started.elapsed().as_secs_f64();
    println!("read {ok} meters in {secs:.1} s ({:.0} meters/s), {} failed", ok as f64 / secs, failed.len());
    for f in failed.iter().take(5) {
        println!("  {f}");
    }
    Ok(())
}
