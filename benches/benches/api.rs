//! The API's hot path: serving a stored object means putting its resourceVersion back into its
//! JSON. kedge re-reads only the top level and `metadata` and copies the rest through raw;
//! the baseline is the straightforward way (parse the whole object into a `serde_json::Value`,
//! set the field, serialize it again).

use benches::fixtures::pod_json;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use replication::api::object::{to_stored, with_resource_version};
use replication::Revision;
use serde_json::Value;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn baseline(stored: &[u8], rv: u64) -> Vec<u8> {
    let mut value: Value = serde_json::from_slice(stored).expect("json");
    value["metadata"]["resourceVersion"] = Value::String(rv.to_string());
    serde_json::to_vec(&value).expect("json")
}

fn serve_object(c: &mut Criterion) {
    let mut group = c.benchmark_group("api_serve_object");
    for size in [3_000usize, 12_000] {
        let pod: serde_json::Map<String, Value> =
            serde_json::from_slice(&pod_json("p", size)).expect("json");
        let stored = to_stored(pod);
        assert_eq!(
            serde_json::from_slice::<Value>(&with_resource_version(&stored, Revision(42)).unwrap())
                .unwrap(),
            serde_json::from_slice::<Value>(&baseline(&stored, 42)).unwrap()
        );
        group.throughput(Throughput::Bytes(stored.len() as u64));
        group.bench_with_input(BenchmarkId::new("kedge_splice", size), &stored, |b, s| {
            b.iter(|| with_resource_version(s, Revision(184_467)).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("baseline_value", size), &stored, |b, s| {
            b.iter(|| baseline(s, 184_467))
        });
    }
    group.finish();
}

criterion_group!(benches, serve_object);
criterion_main!(benches);
