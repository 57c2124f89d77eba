// The programs of the local images a real node runs (see docs/local-cluster.md, "A real
// node"): the pod sandbox's pause process and the test container. Standard library only.
module reaper-operator/tests/cluster/node

go 1.26.0
