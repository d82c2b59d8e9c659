//! Crash safety: a child process writes through the store and prints `ACK n` after each commit;
//! it is killed with SIGKILL at random moments, many times, and after each kill the store is
//! reopened and checked: nothing acknowledged is lost, and no change is present without its
//! bookkeeping (write sets are all-or-nothing).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use replication::store::decode_u64;
use replication::sync::persist;
use replication::{Aux, KeyRange, ObjectKey, Store, StoreConfig};

const KILLS: usize = 25;

/// Runs the writer in `mode` on `dir` until SIGKILL, `run_for` after its first ack; returns
/// the last acknowledged n (0 if none).
fn run_and_kill(mode: &str, dir: &Path, run_for: Duration) -> u64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-crash-writer"))
        .arg(mode)
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn writer");
    let last_ack = Arc::new(AtomicU64::new(0));
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = {
        let last_ack = last_ack.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("ACK ").and_then(|n| n.parse().ok()) {
                    last_ack.store(n, Ordering::SeqCst);
                }
            }
        })
    };
    let started = Instant::now();
    while last_ack.load(Ordering::SeqCst) == 0 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        last_ack.load(Ordering::SeqCst) > 0,
        "writer never acknowledged a write"
    );
    std::thread::sleep(run_for);
    // SIGKILL: no destructor, no flush, nothing.
    child.kill().expect("kill writer");
    child.wait().expect("reap writer");
    reader.join().expect("reader");
    last_ack.load(Ordering::SeqCst)
}

fn key(k: u64) -> ObjectKey {
    ObjectKey::new("pods", "ns", &format!("p{k}")).unwrap()
}

/// The largest n ≤ last with n % 50 == k.
fn latest_for(k: u64, last: u64) -> Option<u64> {
    if last < k {
        return None;
    }
    let n = last - (last - k) % 50;
    (n > 0).then_some(n)
}

fn check_cloud(dir: &Path, acked: u64) -> u64 {
    let store = Store::open(dir, StoreConfig::cloud()).expect("reopen after kill");
    let last = decode_u64(&store.get_aux(Aux::META, b"writer/last").unwrap().unwrap()).unwrap();
    assert!(
        last >= acked,
        "acked write {acked} lost: store ends at {last}"
    );
    assert_eq!(
        store.revision().get(),
        last,
        "revision counter matches the writes"
    );
    for k in 0..50 {
        let object = store.get(&key(k)).unwrap();
        let objectsync = store
            .get_aux(Aux::OBJECTSYNC, key(k).as_bytes())
            .unwrap()
            .map(|v| decode_u64(&v).unwrap());
        match latest_for(k, last) {
            None => assert!(object.is_none() && objectsync.is_none()),
            Some(n) => {
                let object = object.expect("object present");
                assert_eq!(object.rv.get(), n, "p{k} at the version of its last write");
                assert_eq!(object.object, n.to_string().as_bytes());
                assert_eq!(objectsync, Some(n), "ObjectSync written with the object");
            }
        }
    }
    let outbox: Vec<u64> = store
        .scan_aux(Aux::OUTBOX, b"")
        .map(|item| decode_u64(&item.unwrap().0).unwrap())
        .collect();
    assert_eq!(outbox.len() as u64, last, "one outbox entry per write");
    assert_eq!(outbox.last().copied().unwrap_or(0), last);
    last
}

fn max_rv(store: &Store) -> u64 {
    store
        .scan(&KeyRange::all())
        .map(|item| item.unwrap().1.rv.get())
        .max()
        .unwrap_or(0)
}

fn check_edge(dir: &Path, acked: u64, start: u64) -> u64 {
    let store = Store::open(dir, StoreConfig::edge()).expect("reopen after kill");
    let last = max_rv(&store);
    assert!(
        last >= acked,
        "acked change {acked} lost: store ends at {last}"
    );
    let recovered = persist::load_edge(&store).unwrap();
    if last > start {
        let mark = recovered
            .applied
            .expect("watermark written with the changes");
        assert_eq!(
            start + mark.count,
            last,
            "the watermark covers exactly the changes present"
        );
    }
    for k in 0..50 {
        let object = store.get(&key(k)).unwrap();
        match latest_for(k, last) {
            None => assert!(object.is_none()),
            Some(n) => {
                let object = object.expect("object present");
                assert_eq!(object.rv.get(), n, "p{k}: a group commit is all or nothing");
                assert_eq!(object.object, n.to_string().as_bytes());
            }
        }
    }
    last
}

#[test]
fn killed_cloud_writers_lose_nothing_acked_and_never_half_a_write_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rng();
    let mut total = 0;
    for _ in 0..KILLS {
        let acked = run_and_kill(
            "cloud",
            dir.path(),
            Duration::from_millis(rng.random_range(2..60)),
        );
        total = check_cloud(dir.path(), acked);
    }
    assert!(
        total > KILLS as u64,
        "the writer made progress between kills"
    );
}

#[test]
fn killed_edge_replicas_lose_nothing_acked_and_watermarks_match() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rng();
    let mut start = 0;
    for _ in 0..KILLS {
        let acked = run_and_kill(
            "edge",
            dir.path(),
            Duration::from_millis(rng.random_range(2..60)),
        );
        start = check_edge(dir.path(), acked, start);
    }
    assert!(
        start > KILLS as u64,
        "the writer made progress between kills"
    );
}
