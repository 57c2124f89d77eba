//! Both committed copies of the CRD (`crds/reaper.yaml`, and the chart's
//! `files/reaper-crd.yaml`) must be exactly what the code generates.
//! `REAPER_WRITE_CRDS=1 cargo test --test crd_drift` writes both.

use std::path::Path;

const COPIES: [&str; 2] = [
    "crds/reaper.yaml",
    "charts/reaper-operator/files/reaper-crd.yaml",
];

#[test]
fn committed_crds_match_the_code() {
    let generated = reaper_operator::reaper::crd::crd_yaml();
    let write = std::env::var_os("REAPER_WRITE_CRDS").is_some_and(|v| v == "1");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    for copy in COPIES {
        let path = root.join(copy);
        if write {
            std::fs::write(&path, &generated).unwrap_or_else(|e| panic!("{copy}: {e}"));
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{copy}: {e}"));
        if committed != generated {
            stale.push(copy);
        }
    }
    assert!(
        stale.is_empty(),
        "{} out of date: run `REAPER_WRITE_CRDS=1 cargo test --test crd_drift`",
        stale.join(" and ")
    );
}
