// Command etcd is the etcd server, built from the published go.etcd.io/etcd/server/v3
// module so that tests/cluster/up.sh can run a real etcd without containers.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
