//! The cloud side of the sync protocol.
//!
//! - fan-out: one changed object (a 4 KB pod) handed to 1,000 and 10,000 node feeds, each
//!   queueing it, sending it and taking the node's ack: time per node, and bytes allocated per
//!   node (counted by a wrapping global allocator). Baseline: the same loop where each node
//!   gets its own copy of the object bytes, which is what re-encoding per node costs at least.
//! - resync: a node holding 100 objects reconnects after 5 of them changed: the delta it is
//!   sent, against resending all 100.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use benches::fixtures::pod_json;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use replication::sync::{Down, FeedConfig, FeedRecord, Hello, NodeFeed, SetDigest, Up};
use replication::{Change, ChangeKind, ObjectKey, ResourceVersion, Revision, SharedChange};

struct Counting;

static ALLOCATED: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn change(rv: u64, object: &Bytes) -> SharedChange {
    let key = ObjectKey::parse("configmaps/default/shared-config").unwrap();
    Arc::new(Change::new(
        Revision(rv),
        key,
        ResourceVersion(rv),
        ChangeKind::Modified,
        object.clone(),
    ))
}

/// A feed that is connected and streaming, its node holding nothing.
fn streaming_feed() -> (NodeFeed, replication::sync::SessionId) {
    let mut feed = NodeFeed::new(FeedConfig::default(), 1, FeedRecord::default());
    feed.link_up();
    feed.handle(Up::Hello(Hello {
        store_id: 1,
        applied: None,
        objects: 0,
        digest: SetDigest::new().value(),
    }))
    .unwrap();
    match feed.poll_transmit() {
        Some(Down::Session(session)) => (feed, session),
        other => panic!("expected a session start, got {other:?}"),
    }
}

/// One change through every feed: queue, send, ack. Returns what was sent, for black_box.
fn fan_out(
    feeds: &mut [(NodeFeed, replication::sync::SessionId, u64)],
    change: &SharedChange,
) -> usize {
    let mut sent = 0;
    for (feed, session, count) in feeds.iter_mut() {
        feed.set(change);
        if let Some(message) = feed.poll_transmit() {
            sent += message.content_len();
            *count += 1;
        }
        feed.handle(Up::Ack {
            session: *session,
            count: *count,
        })
        .unwrap();
        feed.drain_writes();
    }
    sent
}

fn fanout(c: &mut Criterion) {
    let object = pod_json("shared-config", 4_000);
    for nodes in [1_000usize, 10_000] {
        let mut feeds: Vec<_> = (0..nodes)
            .map(|_| {
                let (feed, session) = streaming_feed();
                (feed, session, 0u64)
            })
            .collect();
        let mut rv = 0;
        // Warm up the feeds' maps, then count one round's allocations.
        for _ in 0..3 {
            rv += 1;
            fan_out(&mut feeds, &change(rv, &object));
        }
        rv += 1;
        let shared = change(rv, &object);
        let before = ALLOCATED.load(Ordering::Relaxed);
        fan_out(&mut feeds, &shared);
        let per_node = (ALLOCATED.load(Ordering::Relaxed) - before) as f64 / nodes as f64;
        println!(
            "sync/fanout/{nodes}: {per_node:.1} bytes allocated per node for a {} byte object",
            object.len()
        );

        let mut group = c.benchmark_group(format!("sync/fanout-{nodes}-nodes"));
        group.throughput(Throughput::Elements(nodes as u64));
        group.sample_size(20);
        group.bench_function(BenchmarkId::new("kedge", "shared-bytes"), |b| {
            b.iter(|| {
                rv += 1;
                black_box(fan_out(&mut feeds, &change(rv, &object)))
            })
        });
        group.bench_function(BenchmarkId::new("baseline", "copy-per-node"), |b| {
            b.iter(|| {
                rv += 1;
                let mut sent = 0;
                for _ in 0..nodes {
                    // What a per-node encoding pays at the least: its own copy of the content.
                    let own = Bytes::copy_from_slice(&object);
                    sent += black_box(change(rv, &own)).object.len();
                }
                sent
            })
        });
        group.finish();
    }
}

fn resync(c: &mut Criterion) {
    let object = pod_json("resync-pod", 2_000);
    let changes: Vec<SharedChange> = (0..100)
        .map(|i| {
            let key = ObjectKey::new("pods", "default", &format!("pod-{i:03}")).unwrap();
            Arc::new(Change::new(
                Revision(i + 1),
                key,
                ResourceVersion(i + 1),
                ChangeKind::Added,
                object.clone(),
            ))
        })
        .collect();
    // The node acked all 100; then 5 changed while it was away.
    let record = FeedRecord {
        acked: changes.iter().map(|c| (c.key.clone(), c.rv)).collect(),
        reports: None,
    };
    let digest = SetDigest::of(changes.iter().map(|c| (&c.key, c.rv)));
    let hello = Hello {
        store_id: 1,
        applied: None,
        objects: 100,
        digest: digest.value(),
    };
    let run = || {
        let mut feed = NodeFeed::new(FeedConfig::default(), 2, record.clone());
        for (i, c) in changes.iter().enumerate() {
            if i % 20 == 0 {
                let newer = Change::new(
                    Revision(1000 + c.rv.get()),
                    c.key.clone(),
                    ResourceVersion(1000 + c.rv.get()),
                    ChangeKind::Modified,
                    object.clone(),
                );
                feed.set(&Arc::new(newer));
            } else {
                feed.set(c);
            }
        }
        feed.link_up();
        feed.handle(Up::Hello(hello.clone())).unwrap();
        let (mut messages, mut content) = (0, 0);
        while let Some(message) = feed.poll_transmit() {
            messages += 1;
            content += message.content_len();
        }
        (messages, content)
    };
    let (messages, content) = run();
    let full = changes.len() * object.len();
    println!(
        "sync/resync: 100 objects held, 5 changed: {messages} messages, {content} content bytes; \
         a full resend is {full} bytes ({:.1}x more)",
        full as f64 / content.max(1) as f64
    );
    let mut group = c.benchmark_group("sync/resync-100-objects-5-changed");
    group.bench_function("kedge-delta", |b| b.iter(|| black_box(run())));
    group.finish();
}

criterion_group!(benches, fanout, resync);
criterion_main!(benches);
