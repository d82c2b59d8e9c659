//! Frame encode/decode of a pod-update message: kedge (rkyv, validated in-place read, content
//! as a zero-copy slice) against KubeEdge's JSON message (serde_json, content as a generic
//! value, as KubeEdge's Go code decodes it).

use std::hint::black_box;

use benches::fixtures::{pod_json, pod_update_message};
use benches::kubeedge::KubeEdgeMessage;
use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use transport::frame::{encode_body, put_frame, Envelope, FrameDecoder};

fn codec(c: &mut Criterion) {
    for pod_size in [3_000usize, 6_000] {
        let message = pod_update_message(pod_json("sensor-gateway-7d9f8-abcde", pod_size));
        let kubeedge = KubeEdgeMessage::from_message(&message);
        let json = serde_json::to_vec(&kubeedge).unwrap();
        let mut wire = BytesMut::new();
        put_frame(&mut wire, &encode_body(&Envelope::Message(&message)));
        let wire = wire.freeze();

        let mut group = c.benchmark_group(format!("codec/pod-{}B", message.content.len()));
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("encode", "kedge"), |b| {
            b.iter(|| {
                let mut out = BytesMut::new();
                put_frame(
                    &mut out,
                    &encode_body(&Envelope::Message(black_box(&message))),
                );
                out
            })
        });
        group.bench_function(BenchmarkId::new("encode", "kubeedge-json"), |b| {
            b.iter(|| serde_json::to_vec(black_box(&kubeedge)).unwrap())
        });
        group.bench_function(BenchmarkId::new("decode", "kedge"), |b| {
            b.iter(|| {
                let mut decoder = FrameDecoder::new(1 << 24);
                let mut input = &wire[..];
                let frame = decoder.decode(&mut input).unwrap().unwrap();
                let m = frame.into_message().unwrap();
                // Touch what a receiver reads: route, version, content.
                black_box((
                    m.route().resource.len(),
                    m.header().resource_version.len(),
                    m.content(),
                ))
            })
        });
        group.bench_function(BenchmarkId::new("decode", "kubeedge-json"), |b| {
            b.iter(|| {
                let m: KubeEdgeMessage = serde_json::from_slice(black_box(&json)).unwrap();
                black_box(m)
            })
        });
        group.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
