//! Benchmark: load (parse and check) a site configuration of N meters, as the daemon and
//! `check-config` do at start. Writes the site file and its key files once, then loads it
//! a few times and prints each time and the median.
//!
//! ```sh
//! cargo run --release --example config_registry -- /tmp/reg 100000 5
//! target/release/headend check-config /tmp/reg/site.toml     # the same, as a command
//! ```
//!
//! The fleet: two in five meters DLMS over the wrapper (200 endpoints by wPort), two in
//! five DLMS behind HDLC concentrators of 1,000 meters each, one in five Modbus behind
//! gateways of 247 unit ids; one DLMS meter in three with HLS keys and one in three with
//! an LLS password, each in its own key file, as `meter-sim --write-config` writes them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use headend::config::SiteConfig;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "/tmp/headend-registry".into()));
    let meters: usize = args.next().as_deref().unwrap_or("100000").parse()?;
    let runs: usize = args.next().as_deref().unwrap_or("5").parse()?;
    let site = dir.join("site.toml");
    let t = Instant::now();
    let (bytes, keys) = write_site(&dir, meters)?;
    println!(
        "wrote {} ({:.1} MB, {meters} meters, {keys} key files) in {:.2?}",
        site.display(),
        bytes as f64 / 1e6,
        t.elapsed()
    );

    let mut times = Vec::with_capacity(runs);
    for run in 1..=runs {
        let t = Instant::now();
        let cfg = SiteConfig::load(&site).map_err(|e| anyhow::anyhow!("{e}"))?;
        let took = t.elapsed();
        println!("run {run}: loaded and checked {} meters, {} links in {took:.3?}", cfg.meters.len(), cfg.links.len());
        times.push(took);
    }
    // Where the time goes, once: parsing (TOML and serde) and the checks (key files).
    let t = Instant::now();
    let text = std::fs::read_to_string(&site)?;
    let read = t.elapsed();
    let t = Instant::now();
    let mut cfg = SiteConfig::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let parse = t.elapsed();
    cfg.base_dir = dir.clone();
    let t = Instant::now();
    let problems = cfg.problems();
    let checks = t.elapsed();
    println!("breakdown: read {read:.3?}, parse {parse:.3?}, checks {checks:.3?} ({} problems)", problems.len());
    times.sort();
    if let Some(median) = times.get(times.len() / 2) {
        println!("median of {runs}: {median:.3?}");
    }
    Ok(())
}

fn write_site(dir: &Path, meters: usize) -> anyhow::Result<(usize, usize)> {
    std::fs::create_dir_all(dir.join("keys"))?;
    let mut out = String::with_capacity(meters * 160);
    out.push_str("state_dir = \"state\"\n\n");
    let endpoints = 200;
    for k in 0..endpoints {
        writeln!(
            out,
            "[[link]]\nname = \"wrapper-{k}\"\nprotocol = \"dlms-wrapper\"\naddress = \"10.1.{}.{}:4059\"\n",
            k / 250,
            k % 250 + 1
        )?;
    }
    for k in 0..meters.div_ceil(5 * 1000) * 2 {
        writeln!(
            out,
            "[[link]]\nname = \"dcu-{k}\"\nprotocol = \"dlms-hdlc\"\naddress = \"10.2.{}.{}:4001\"\n",
            k / 250,
            k % 250 + 1
        )?;
    }
    for k in 0..meters.div_ceil(5 * 247) {
        writeln!(
            out,
            "[[link]]\nname = \"mbgw-{k}\"\nprotocol = \"modbus-tcp\"\naddress = \"10.3.{}.{}:502\"\n",
            k / 250,
            k % 250 + 1
        )?;
    }
    let (mut w, mut h, mut m, mut keys) = (0usize, 0usize, 0usize, 0usize);
    for i in 0..meters {
        let id = format!("MTR-{:06}", i + 1);
        writeln!(out, "[[meter]]\nid = \"{id}\"\naccount = \"ACC-{:06}\"", i / 2 + 1)?;
        if i % 5 == 4 {
            writeln!(
                out,
                "link = \"mbgw-{}\"\nidentity = \"SIMMB{:07}\"\nunit_id = {}\nmodbus_profile = \"sim\"\n",
                m / 247,
                i + 1,
                m % 247 + 1
            )?;
            m += 1;
            continue;
        }
        if i % 5 < 2 {
            writeln!(out, "link = \"wrapper-{}\"\nlogical_device = {}", w % endpoints, w / endpoints + 1)?;
            w += 1;
        } else {
            writeln!(out, "link = \"dcu-{}\"\nphysical_address = {}", h / 1000, 16 + h % 1000)?;
            h += 1;
        }
        writeln!(out, "identity = \"SIM{:010}\"", i + 1)?;
        let key = match i % 3 {
            0 => Some(("hls-gmac", "guek = \"000102030405060708090A0B0C0D0E0F\"\ngak = \"D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\"\nclient_system_title = \"4844454E44000001\"\n".to_owned())),
            2 => Some(("lls", format!("password = \"{:08X}\"\n", i))),
            _ => None,
        };
        match key {
            Some((auth, body)) => {
                let file = format!("keys/{id}.toml");
                std::fs::write(dir.join(&file), format!("# Benchmark keys, worthless.\n{body}"))?;
                keys += 1;
                writeln!(out, "client_sap = 1\nauth = \"{auth}\"\nkeys = \"{file}\"\ntimezone_offset_minutes = 480\n")?;
            }
            None => writeln!(out, "client_sap = 16\nauth = \"none\"\n")?,
        }
    }
    out.push_str(
        "[modbus_profile.sim]\nserial = { register = 0, words = 6 }\n\
         energy_import = { register = 256, type = \"u32\", word_order = \"big\", scale = 10, unit = \"Wh\" }\n\
         relay_coil = 0\nrelay_status = { discrete_input = 0 }\nclock = { register = 768 }\n",
    );
    std::fs::write(dir.join("site.toml"), &out)?;
    Ok((out.len(), keys))
}
