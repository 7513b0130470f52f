// Command etcd is upstream etcd's server, built from the go.etcd.io modules at the
// version that the pinned k8s.io/kubernetes go.mod names (upstream's own main does the same).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
