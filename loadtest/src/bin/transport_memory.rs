//! transport-memory: what one idle link costs in memory, on each side.
//!
//! Starts the cloud endpoint in a child process (so its memory is its own), connects N nodes
//! from this process over one shared client endpoint, lets them idle, and reports the growth of
//! each process's resident set divided by N.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use transport::{CertificateAuthority, ClientConfig, LinkEvent, Server, ServerConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Measures the memory of idle kedge links on the cloud and on the node side")]
struct Args {
    /// Idle links to open.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Seconds to let the links idle before measuring.
    #[arg(long, default_value_t = 3)]
    idle_seconds: u64,
    /// Internal: run as the cloud endpoint with the CA in this directory.
    #[arg(long, hide = true)]
    serve: Option<std::path::PathBuf>,
}

const DAY: Duration = Duration::from_secs(86400);

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match &args.serve {
        Some(dir) => serve(dir).await,
        None => measure(&args).await,
    }
}

/// The child: a cloud endpoint that keeps every link and drains its events.
async fn serve(dir: &std::path::Path) -> Result<()> {
    let ca = CertificateAuthority::from_pem(
        &std::fs::read_to_string(dir.join("ca.pem"))?,
        &std::fs::read_to_string(dir.join("ca-key.pem"))?,
    )?;
    let identity = ca.issue_server(&["localhost".into()], DAY)?;
    let mut server = Server::bind(
        ServerConfig::new("127.0.0.1:0".parse()?),
        ca.cert(),
        &identity,
    )?;
    println!("LISTEN {}", server.local_addr()?);
    while let Some(mut link) = server.accept().await {
        tokio::spawn(async move { while link.next_event().await.is_some() {} });
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("bad VmRSS")?
        .parse()?)
}

async fn measure(args: &Args) -> Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("kedge-transport-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ca = CertificateAuthority::generate("kedge-memory-ca")?;
    let (cert, key) = ca.to_pem();
    std::fs::write(dir.join("ca.pem"), cert)?;
    std::fs::write(dir.join("ca-key.pem"), key)?;

    let mut child = Command::new(std::env::current_exe()?)
        .arg("--serve")
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the cloud endpoint")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let addr: std::net::SocketAddr = line
        .strip_prefix("LISTEN ")
        .context("the cloud endpoint did not start")?
        .trim()
        .parse()?;

    // Certificates first, so their memory is not counted as the links'.
    let identities: Vec<_> = (0..args.nodes)
        .map(|i| ca.issue_node(&format!("idle-{i}"), DAY))
        .collect::<Result<_, _>>()?;
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse()?, 32 << 20)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cloud_before = rss_kib(child.id())?;
    let node_before = rss_kib(std::process::id())?;

    let mut links = Vec::with_capacity(args.nodes);
    for identity in &identities {
        let config = ClientConfig::new(addr, "localhost");
        links.push(transport::connect_on(
            &endpoint,
            config,
            ca.cert(),
            identity,
        )?);
    }
    for link in &mut links {
        match tokio::time::timeout(Duration::from_secs(60), link.next_event()).await {
            Ok(Some(LinkEvent::Connected { .. })) => {}
            other => bail!("a node did not connect: {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let cloud_after = rss_kib(child.id())?;
    let node_after = rss_kib(std::process::id())?;
    let _ = child.kill();
    let _ = std::fs::remove_dir_all(&dir);

    let per = |before: u64, after: u64| after.saturating_sub(before) as f64 / args.nodes as f64;
    println!(
        "{} idle links, after {} s idle:",
        args.nodes, args.idle_seconds
    );
    println!(
        "  cloud side: RSS {cloud_before} KiB -> {cloud_after} KiB: {:.1} KiB per connection",
        per(cloud_before, cloud_after)
    );
    println!(
        "  node side (one shared endpoint): RSS {node_before} KiB -> {node_after} KiB: {:.1} KiB per connection",
        per(node_before, node_after)
    );
    Ok(())
}
