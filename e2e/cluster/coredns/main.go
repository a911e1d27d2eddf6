// Command coredns is CoreDNS (github.com/coredns/coredns) with only the plugins the
// local cluster's DNS needs, so that build.sh compiles a small part of its module
// graph instead of every cloud provider's SDK. The directive order is CoreDNS's own
// (plugin.cfg): a plugin earlier in the list sees a query first.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives is plugin.cfg's order, restricted to the plugins imported above.
var directives = []string{
	"bind",
	"ready",
	"errors",
	"cache",
	"kubernetes",
	"loop",
	"forward",
}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
