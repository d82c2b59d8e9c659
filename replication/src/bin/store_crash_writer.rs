//! Test helper for the crash-safety test (`tests/crash.rs`): writes through the store as fast
//! as it can and prints `ACK <n>` after the n-th write is committed, until it is killed.
//!
//! `store-crash-writer cloud DIR`: an assigning store; write n puts `pods/ns/p{n % 50}` with
//! content `n`, and in the same write set an outbox entry n, an ObjectSync entry for the key,
//! and meta `writer/last = n`.
//!
//! `store-crash-writer edge DIR`: an [`EdgeReplica`] receiving a session of upserts (object
//! message n: `pods/ns/p{n % 50}` at version n), committed in groups of 1–8 messages; `ACK n`
//! is printed when the group ending at n is durable, exactly when edgecore would send its ack.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use replication::sync::{Down, EdgeReplica, SessionId};
use replication::{
    Aux, Change, ChangeKind, ObjectKey, Precondition, ResourceVersion, Revision, Store,
    StoreConfig, WriteSet,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn key(n: u64) -> ObjectKey {
    ObjectKey::new("pods", "ns", &format!("p{}", n % 50)).expect("valid key")
}

fn ack(out: &mut impl Write, n: u64) {
    // If the parent is gone there is nobody to tell; stop.
    if writeln!(out, "ACK {n}").and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

fn cloud(dir: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = StoreConfig::cloud().with_aux(Aux::OUTBOX);
    config.sync_writes = false;
    let store = Store::open(dir, config)?;
    let mut n = match store.get_aux(Aux::META, b"writer/last")? {
        Some(bytes) => replication::store::decode_u64(&bytes)?,
        None => 0,
    };
    let mut out = std::io::stdout().lock();
    loop {
        n += 1;
        let mut set = WriteSet::new();
        set.put(key(n), Bytes::from(n.to_string()), Precondition::None);
        set.put_aux(Aux::OUTBOX, n.to_be_bytes(), key(n).as_str());
        set.put_aux(Aux::OBJECTSYNC, key(n).as_str(), n.to_be_bytes());
        set.put_aux(Aux::META, b"writer/last".to_vec(), n.to_be_bytes());
        store.commit(set)?;
        ack(&mut out, n);
    }
}

fn edge(dir: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = StoreConfig::edge();
    config.sync_writes = false;
    let mut replica = EdgeReplica::open(dir, config)?;
    let epoch = replica.sync().store_id();
    // One session per process run, so counts restart at 1 like a real reconnect.
    let session = SessionId {
        epoch,
        number: std::process::id() as u64,
    };
    replica.receive(Down::Session(session))?;
    let mut out = std::io::stdout().lock();
    // Continue above every version already held, or the upserts would be skipped as old.
    let mut n = 0u64;
    for item in replica.store().scan(&replication::KeyRange::all()) {
        n = n.max(item?.1.rv.get());
    }
    loop {
        let group = 1 + n % 8;
        for _ in 0..group {
            n += 1;
            let change = Change::new(
                Revision(n),
                key(n),
                ResourceVersion(n),
                ChangeKind::Modified,
                Bytes::from(n.to_string()),
            );
            replica.receive(Down::Upsert(Arc::new(change)))?;
        }
        replica.flush()?;
        ack(&mut out, n);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("cloud"), Some(dir)) => cloud(dir),
        (Some("edge"), Some(dir)) => edge(dir),
        _ => {
            eprintln!("usage: store-crash-writer cloud|edge DIR");
            std::process::exit(2);
        }
    };
    if let Err(error) = result {
        eprintln!("store-crash-writer: {error}");
        std::process::exit(1);
    }
}
