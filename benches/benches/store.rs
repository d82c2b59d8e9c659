//! Applying 10,000 object changes: kedge's store (one `WriteSet`, with the reads it needs to
//! classify each change and publish watch events) against a raw RocksDB `WriteBatch` of the
//! same keys and value bytes, same options (block cache, bloom filters, compression), no fsync.

use std::hint::black_box;

use benches::fixtures::pod_json;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use replication::{
    ObjectKey, Precondition, ResourceVersion, Store, StoreConfig, Versioning, WriteSet,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHANGES: usize = 10_000;

fn objects() -> Vec<(ObjectKey, Bytes)> {
    let pod = pod_json("bench-pod", 1_000);
    (0..CHANGES)
        .map(|i| {
            let key = ObjectKey::new("pods", "default", &format!("pod-{i:05}")).unwrap();
            (key, pod.clone())
        })
        .collect()
}

fn config(versioning: Versioning) -> StoreConfig {
    let mut config = StoreConfig::cloud();
    config.versioning = versioning;
    config.sync_writes = false;
    config
}

fn raw_db(path: &std::path::Path) -> rocksdb::DB {
    let cache = rocksdb::Cache::new_lru_cache(64 << 20);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(&cache);
    table.set_bloom_filter(10.0, false);
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.set_block_based_table_factory(&table);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    options.set_write_buffer_size(16 << 20);
    rocksdb::DB::open(&options, path).unwrap()
}

fn apply(c: &mut Criterion) {
    let objects = objects();
    let mut group = c.benchmark_group("store/apply-10k-changes");
    group.throughput(Throughput::Elements(CHANGES as u64));
    group.sample_size(20);

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("mirror"), config(Versioning::Mirror)).unwrap();
    let mut rv = 0u64;
    group.bench_function(BenchmarkId::new("kedge", "mirror"), |b| {
        b.iter(|| {
            let mut set = WriteSet::new();
            for (key, object) in &objects {
                rv += 1;
                set.mirror_put(key.clone(), ResourceVersion(rv), object.clone());
            }
            black_box(store.commit(set).unwrap())
        })
    });

    let store = Store::open(dir.path().join("assign"), config(Versioning::Assign)).unwrap();
    group.bench_function(BenchmarkId::new("kedge", "assign"), |b| {
        b.iter(|| {
            let mut set = WriteSet::new();
            for (key, object) in &objects {
                set.put(key.clone(), object.clone(), Precondition::None);
            }
            black_box(store.commit(set).unwrap())
        })
    });

    let db = raw_db(&dir.path().join("raw"));
    let mut rv = 0u64;
    group.bench_function(BenchmarkId::new("raw-rocksdb", "writebatch"), |b| {
        b.iter(|| {
            let mut batch = rocksdb::WriteBatch::default();
            for (key, object) in &objects {
                rv += 1;
                let mut value = Vec::with_capacity(8 + object.len());
                value.extend_from_slice(&rv.to_be_bytes());
                value.extend_from_slice(object);
                batch.put(key.as_bytes(), value);
            }
            let mut options = rocksdb::WriteOptions::default();
            options.set_sync(false);
            db.write_opt(batch, &options).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
