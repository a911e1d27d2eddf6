//! Collective operations across the trainer's ranks, on Gloo (Facebook's collective
//! communications library, Debian's `libgloo-dev`) over TCP.
//!
//! Data-parallel training needs every rank to see the sum of every rank's gradients;
//! this crate gives it [`Collective::allreduce_sum_f32`] (Gloo's ring allreduce);
//! sharded training, [`Collective::allgather_f32`] and
//! [`Collective::reduce_scatter_sum_f32`]; and [`Collective::broadcast_f32`] and
//! [`Collective::barrier`]. It sits
//! below `kubetune-trainer` (which averages gradients with it) and above a C++ shim
//! (`shim/gloo_shim.cc`, compiled by `build.rs`) that holds the Gloo calls.
//!
//! # Rendezvous
//! Rank 0 serves a small key-value store ([`store`]) on the rendezvous address; every
//! rank (rank 0 included) connects to it, and Gloo's `connectFullMesh` swaps the
//! ranks' TCP addresses through it. Then every rank holds a direct TCP connection to
//! every other, and the store is closed.
//!
//! # Failures
//! Nothing waits forever: joining the rendezvous (rank 0 not answering, a rank never
//! appearing) fails after [`Config::rendezvous_timeout`], and each collective after
//! [`Config::timeout`]. A rank whose process dies closes its connections, so the others
//! fail at their next collective with Gloo's "connection closed by peer" at once. After
//! an error the context is broken: the caller should stop.
//!
//! # Unsafe code
//! Confined to [`ffi`] (the crate denies it elsewhere), each block with its argument.

mod ffi;
pub mod store;

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use ffi::Comm;
use store::{StoreClient, StoreServer};

/// Failures of the rendezvous and of collectives.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Settings that cannot describe a gang.
    #[error("invalid collective settings: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// The ranks could not find and connect to each other.
    #[error("{message}")]
    Rendezvous {
        /// What happened, with the address and timeout involved.
        message: String,
    },
    /// A collective failed: a rank died, or did not take part within the timeout.
    #[error("failed to {op} across {world_size} ranks (this is rank {rank}): {message}")]
    Collective {
        /// The operation.
        op: &'static str,
        /// This rank.
        rank: usize,
        /// The gang's size.
        world_size: usize,
        /// Gloo's message.
        message: String,
    },
}

impl Error {
    /// A bounded name for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Config { .. } => "CollectiveConfig",
            Self::Rendezvous { .. } => "Rendezvous",
            Self::Collective { .. } => "Collective",
        }
    }
}

/// Where a rank sits in the gang and how long it waits for the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This rank, `0..world_size`.
    pub rank: usize,
    /// The number of ranks.
    pub world_size: usize,
    /// `host:port` of rank 0's rendezvous; rank 0 listens on its port.
    pub rendezvous: String,
    /// The host name or address this rank's Gloo connections use; by default
    /// `127.0.0.1` when the rendezvous host is a loopback address, otherwise this
    /// machine's hostname (a pod's hostname resolves to its IP).
    pub host: Option<String>,
    /// How long to wait for rank 0's rendezvous and for every rank to join.
    pub rendezvous_timeout: Duration,
    /// How long one collective may wait for the other ranks.
    pub timeout: Duration,
}

/// One rank's connections to all the others.
#[derive(Debug)]
pub struct Collective {
    rank: usize,
    world_size: usize,
    comm: Comm,
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Collective {
    /// Joins the gang: rank 0 serves the rendezvous, every rank connects to every other.
    /// Returns once all `world_size` ranks are connected.
    pub fn connect(config: &Config) -> Result<Self, Error> {
        let mut all = Self::connect_many(config, 1)?;
        Ok(all.pop().expect("one context was asked for"))
    }

    /// [`Self::connect`] with `contexts` independent sets of connections (each its own
    /// Gloo context, rendezvousing under its own keys), so that collectives may run on
    /// them at the same time from different threads: the all-gather of the next
    /// weights beside the reduce-scatter of the last gradients. Every rank must ask
    /// for the same number.
    pub fn connect_many(config: &Config, contexts: usize) -> Result<Vec<Self>, Error> {
        let (rank, world_size) = (config.rank, config.world_size);
        if world_size == 0 || rank >= world_size {
            return Err(Error::Config {
                message: format!("rank {rank} is not within a world of {world_size}"),
            });
        }
        let (host, port) = config
            .rendezvous
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| Error::Config {
                message: format!(
                    "the rendezvous address {:?} is not host:port",
                    config.rendezvous
                ),
            })?;
        let loopback = is_loopback(host);
        let server = if rank == 0 {
            // On a loopback rendezvous (tests, one machine) listen there only;
            // otherwise on every interface, as the Service routes to the pod's IP.
            let listen = if loopback {
                (host.trim_start_matches('[').trim_end_matches(']'), port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            } else {
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
            };
            Some(StoreServer::bind(listen)?)
        } else {
            None
        };
        let mut client = StoreClient::connect(&config.rendezvous, config.rendezvous_timeout)?;
        let device_host = config
            .host
            .clone()
            .or_else(|| loopback.then(|| "127.0.0.1".to_owned()))
            .map(|h| {
                CString::new(h).map_err(|_| Error::Config {
                    message: "the collective host contains a NUL byte".into(),
                })
            })
            .transpose()?;
        let mut all = Vec::with_capacity(contexts);
        for context in 0..contexts.max(1) {
            client.set_prefix(&if context == 0 {
                String::new()
            } else {
                format!("context-{context}/")
            });
            let mut comm = Comm::connect(
                rank,
                world_size,
                device_host.as_deref(),
                config.rendezvous_timeout,
                config.timeout,
                &mut client,
            )
            .map_err(|message| Error::Rendezvous {
                message: format!(
                    "failed to connect rank {rank} to the other {} ranks through {}: {message}",
                    world_size - 1,
                    config.rendezvous
                ),
            })?;
            // Past this barrier every rank has read every address: rank 0 may stop serving.
            comm.barrier().map_err(|message| Error::Rendezvous {
                message: format!(
                    "failed to confirm the rendezvous of {world_size} ranks: {message}"
                ),
            })?;
            all.push(Self {
                rank,
                world_size,
                comm,
            });
        }
        drop(client);
        drop(server);
        tracing::info!(rank, world_size, contexts, rendezvous = %config.rendezvous, "joined the gang");
        Ok(all)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    fn failed(&self, op: &'static str) -> impl FnOnce(String) -> Error + use<> {
        let (rank, world_size) = (self.rank, self.world_size);
        move |message| Error::Collective {
            op,
            rank,
            world_size,
            message,
        }
    }

    /// Replaces `data` on every rank with the element-wise sum over all ranks.
    pub fn allreduce_sum_f32(&mut self, data: &mut [f32]) -> Result<(), Error> {
        let failed = self.failed("sum gradients");
        self.comm.allreduce_sum_f32(data).map_err(failed)
    }

    /// Replaces `data` on every rank with the element-wise sum over all ranks.
    pub fn allreduce_sum_f64(&mut self, data: &mut [f64]) -> Result<(), Error> {
        let failed = self.failed("sum figures");
        self.comm.allreduce_sum_f64(data).map_err(failed)
    }

    /// Every rank's `shard` (the same length on every rank), in rank order, into `out`,
    /// which must hold `world_size × shard.len()` elements: the all-gather of sharded
    /// parameters before they are used.
    pub fn allgather_f32(&mut self, shard: &[f32], out: &mut [f32]) -> Result<(), Error> {
        if out.len() != shard.len() * self.world_size {
            return Err(Error::Config {
                message: format!(
                    "an all-gather of {} elements per rank across {} ranks needs {} elements of output, not {}",
                    shard.len(),
                    self.world_size,
                    shard.len() * self.world_size,
                    out.len()
                ),
            });
        }
        let failed = self.failed("gather parameters");
        self.comm.allgather_f32(shard, out).map_err(failed)
    }

    /// Sums `data` element-wise across ranks and leaves on this rank only its segment
    /// of the sum, which it returns: `data` is cut into `world_size` equal segments
    /// (its length must be a multiple of the world size) and rank r keeps segment r.
    /// The reduce-scatter of sharded gradients: each rank sends (n−1)/n of `data`,
    /// half what an all-reduce sends. The rest of `data` is scratch afterwards.
    pub fn reduce_scatter_sum_f32<'a>(&mut self, data: &'a mut [f32]) -> Result<&'a [f32], Error> {
        if !data.len().is_multiple_of(self.world_size) {
            return Err(Error::Config {
                message: format!(
                    "a reduce-scatter across {} ranks needs a multiple of {} elements, not {}",
                    self.world_size,
                    self.world_size,
                    data.len()
                ),
            });
        }
        let n = data.len() / self.world_size;
        let failed = self.failed("sum gradient shards");
        self.comm.reduce_scatter_sum_f32(data, n).map_err(failed)?;
        Ok(&data[self.rank * n..(self.rank + 1) * n])
    }

    /// Replaces `data` on every rank with rank `root`'s.
    pub fn broadcast_f32(&mut self, data: &mut [f32], root: usize) -> Result<(), Error> {
        let failed = self.failed("broadcast weights");
        self.comm.broadcast_f32(data, root).map_err(failed)
    }

    /// Replaces `data` on every rank with rank `root`'s.
    pub fn broadcast_f64(&mut self, data: &mut [f64], root: usize) -> Result<(), Error> {
        let failed = self.failed("broadcast figures");
        self.comm.broadcast_f64(data, root).map_err(failed)
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<(), Error> {
        let failed = self.failed("wait for the other ranks");
        self.comm.barrier().map_err(failed)
    }
}
