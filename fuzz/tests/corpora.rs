//! Replays every kept corpus (`fuzz/corpus/NAME/`, grown by `cargo fuzz run` and minimized with
//! `cargo fuzz cmin`) through its target, so what the fuzzer once found stays fixed, and feeds each
//! target random bytes as a smoke test. The real fuzzing is `cargo fuzz run` (README, "Fuzzing").

use std::path::PathBuf;

use proptest::prelude::*;

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name)
}

#[test]
fn every_kept_input_runs_clean() {
    for name in kedge_fuzz::TARGETS {
        let dir = corpus(name);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target keeps a corpus)", dir.display()));
        let mut replayed = 0usize;
        for entry in entries {
            let path = entry.expect("a corpus entry").path();
            let data = std::fs::read(&path).expect("a corpus file");
            let outcome = std::panic::catch_unwind(|| kedge_fuzz::run(name, &data));
            assert!(outcome.is_ok(), "{name}: {} fails", path.display());
            replayed += 1;
        }
        assert!(replayed > 0, "{name}: its corpus is empty");
        eprintln!("{name}: {replayed} inputs replayed");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_refused_cleanly(target in 0..kedge_fuzz::TARGETS.len(), data in proptest::collection::vec(any::<u8>(), 0..512)) {
        kedge_fuzz::run(kedge_fuzz::TARGETS[target], &data);
    }
}
