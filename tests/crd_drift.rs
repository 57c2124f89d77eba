//! The committed CRD must be exactly what the code generates.

#[test]
fn committed_crd_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/reaper.yaml");
    let committed = std::fs::read_to_string(path).expect("crds/reaper.yaml");
    let generated = reaper_operator::reaper::crd::crd_yaml();
    assert!(
        committed == generated,
        "crds/reaper.yaml is out of date: run `cargo run -- crdgen > crds/reaper.yaml && \
         cp crds/reaper.yaml charts/reaper-operator/files/reaper-crd.yaml`"
    );
}
