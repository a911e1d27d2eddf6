//! kubetune's tests that need a Kubernetes cluster.
//!
//! The tests live in `e2e/tests/`; they run against the local cluster that
//! `cargo xtask cluster up` starts (found through the kubeconfig it writes, or
//! `KUBECONFIG`), each in a throwaway namespace, and skip with a message when no
//! cluster is up. `cargo xtask test` brings the cluster up around them and sets
//! `KUBETUNE_REQUIRE_CLUSTER=1`, which turns a missing cluster into a failure.
//! `test_support` is what they share: finding the cluster, namespaces, pod
//! builders and waits; `serving` the tiny model, adapters and real adapter servers
//! of the AdapterDeployment tests and the rollout benchmark; `flow` kubetune's whole
//! job on the real node, for the end-to-end test and `cargo xtask demo`; `demo` the
//! demos' fact and status lines; `jobs` FineTuneJobs on the simulated nodes with
//! an in-process operator.

pub mod demo;
pub mod flow;
pub mod jobs;
pub mod serving;
pub mod test_support;
