// imagecopy copies an image between registries with containers/image
// (go.podman.io/image/v5), the library `skopeo copy` is built on, in the way
// `skopeo copy --preserve-digests --src-tls-verify=false --dest-tls-verify=false` calls
// it, but with its current release and the current Go: the br2k-oci bench runs it next
// to Debian's skopeo (BR2K_BENCH_IMAGECOPY). Usage: imagecopy SRC DST (docker://...).
package main

import (
	"context"
	"fmt"
	"os"

	"go.podman.io/image/v5/copy"
	"go.podman.io/image/v5/signature"
	"go.podman.io/image/v5/transports/alltransports"
	"go.podman.io/image/v5/types"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: imagecopy SRC DST")
		os.Exit(2)
	}
	src, err := alltransports.ParseImageName(os.Args[1])
	check(err)
	dst, err := alltransports.ParseImageName(os.Args[2])
	check(err)
	policy, err := signature.NewPolicyContext(&signature.Policy{Default: []signature.PolicyRequirement{signature.NewPRInsecureAcceptAnything()}})
	check(err)
	defer policy.Destroy()
	sys := &types.SystemContext{DockerInsecureSkipTLSVerify: types.OptionalBoolTrue}
	_, err = copy.Image(context.Background(), policy, dst, src, &copy.Options{
		SourceCtx: sys, DestinationCtx: sys, PreserveDigests: true,
	})
	check(err)
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
