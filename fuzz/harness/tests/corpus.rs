//! Every committed corpus input (`fuzz/corpus/<target>/*`) through its
//! target's body, on stable: a crash input once committed stays a
//! regression test. `write_seeds` (ignored) regenerates the seeds.

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target)
}

#[test]
fn every_committed_input_passes_its_target() {
    let mut total = 0;
    for (name, body) in xe_fuzz_harness::TARGETS {
        let dir = corpus_dir(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{name}: no corpus in {}", dir.display());
        for f in files {
            let data = std::fs::read(&f).expect("read corpus file");
            eprintln!("{name}: {}", f.display());
            body(&data);
            total += 1;
        }
    }
    eprintln!("{total} corpus inputs passed");
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand to regenerate the seeds"]
fn write_seeds() {
    for (name, _) in xe_fuzz_harness::TARGETS {
        let dir = corpus_dir(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (file, bytes) in xe_fuzz_harness::seeds::seeds(name) {
            std::fs::write(dir.join(format!("seed-{file}")), bytes).expect("write seed");
        }
    }
}
