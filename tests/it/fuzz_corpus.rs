//! Every input of the committed fuzz corpus (`fuzz/corpus/TARGET/`) and every crash reproducer
//! (`fuzz/regressions/TARGET/`) runs through its fuzz target's entry point: a regression test of
//! what fuzzing found, on every `cargo test`.

use std::path::Path;

#[test]
fn the_fuzz_corpus_and_regressions_run_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut ran = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(targets) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for target in targets {
            let target = target.unwrap().path();
            let name = target.file_name().unwrap().to_string_lossy().into_owned();
            for input in std::fs::read_dir(&target).unwrap() {
                let input = input.unwrap().path();
                let data = std::fs::read(&input).unwrap();
                assert!(
                    gatehouse::fuzz::run(&name, &data),
                    "{}: no fuzz target `{name}`",
                    input.display()
                );
                ran += 1;
            }
        }
    }
    assert!(
        ran >= 9,
        "the committed corpus has at least the seed inputs, ran {ran}"
    );
}
