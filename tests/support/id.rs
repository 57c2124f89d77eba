//! The typed names of the lease store, from the literals tests spell them with
//! (`id::lease("l")`); a name the store would refuse is a mistake in the test.

use reaper_operator::lease::{ClusterName, Holder, LeaseName};

pub fn lease(name: impl AsRef<str>) -> LeaseName {
    LeaseName::new(name.as_ref()).expect("a valid lease name")
}

pub fn holder(holder: impl AsRef<str>) -> Holder {
    Holder::new(holder.as_ref()).expect("a valid holder")
}

pub fn cluster(name: impl AsRef<str>) -> ClusterName {
    ClusterName::new(name.as_ref()).expect("a valid cluster name")
}
