//! Leader election with a coordination.k8s.io Lease, so that two replicas of the
//! operator never reconcile at once.
//!
//! The replica that holds an unexpired Lease is the leader; it renews the Lease every
//! `renew_every`. Others poll and take the Lease over once it has not been renewed for
//! `lease_duration`. Every write carries the Lease's resourceVersion, so two replicas
//! racing for it cannot both win. A leader that fails to renew before its Lease expires
//! stops: the process exits and its pod restarts as a follower.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tracing::info;

/// What a replica does with the Lease it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it, holding it.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Another holder let it expire: take it over.
    TakeOver,
    /// Another holder has it: wait.
    Follow,
}

/// Decides from the Lease's spec, our identity and the time.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Create;
    };
    if spec.holder_identity.as_deref() == Some(identity) {
        return Decision::Renew;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let expired = match (&spec.renew_time, spec.holder_identity.as_deref()) {
        (_, None | Some("")) => true,
        (None, _) => true,
        (Some(renewed), _) => renewed
            .0
            .checked_add(SignedDuration::from_secs(duration))
            .map_or(true, |expiry| expiry <= now),
    };
    if expired {
        Decision::TakeOver
    } else {
        Decision::Follow
    }
}

/// A failed election step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Lease could not be read or written.
    #[error("failed to {verb} Lease {name}: {source}")]
    Lease {
        /// read, create or update.
        verb: &'static str,
        /// The Lease's name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The leader could not renew its Lease in time.
    #[error("lost the leadership Lease {0}: it was not renewed in time or another replica took it")]
    Lost(String),
}

/// One replica's side of the election.
#[derive(Clone, Debug)]
pub struct Elector {
    /// The Leases of the operator's namespace.
    pub api: Api<Lease>,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews, and followers poll.
    pub renew_every: Duration,
}

impl Elector {
    /// Tries once to become or stay leader; true when this replica holds the Lease.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, Error> {
        let lease = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| Error::Lease {
                verb: "read",
                name: self.name.clone(),
                source,
            })?;
        let now = Timestamp::now();
        let decision = decide(
            lease.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        let previous = lease
            .as_ref()
            .and_then(|l| l.spec.clone())
            .unwrap_or_default();
        let spec = match decision {
            Decision::Follow => return Ok(false),
            Decision::Renew => LeaseSpec {
                renew_time: Some(MicroTime(now)),
                ..previous
            },
            Decision::Create | Decision::TakeOver => LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX),
                ),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(
                    previous.lease_transitions.unwrap_or(0)
                        + i32::from(decision == Decision::TakeOver),
                ),
                ..LeaseSpec::default()
            },
        };
        let written = match lease {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            // The resourceVersion read above makes this a compare-and-swap.
            Some(mut lease) => {
                lease.spec = Some(spec);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(_) => {
                if decision != Decision::Renew {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                }
                Ok(true)
            }
            // Another replica wrote first.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(source) => Err(Error::Lease {
                verb: if decision == Decision::Create {
                    "create"
                } else {
                    "update"
                },
                name: self.name.clone(),
                source,
            }),
        }
    }

    /// Waits until this replica leads, then runs `work` while renewing the Lease. Returns
    /// when `work` ends (`Ok`) or when leadership is lost (`Err`), whichever is first.
    pub async fn run<F: std::future::Future<Output = ()>>(&self, work: F) -> Result<(), Error> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "leader election failed; retrying"),
            }
            tokio::time::sleep(self.renew_every).await;
        }
        let renew = async {
            let mut last_renewal = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(self.renew_every).await;
                match self.try_acquire_or_renew().await {
                    Ok(true) => last_renewal = tokio::time::Instant::now(),
                    Ok(false) => return Error::Lost(self.name.clone()),
                    Err(error) => tracing::warn!(%error, "failed to renew the Lease"),
                }
                if last_renewal.elapsed() >= self.lease_duration {
                    return Error::Lost(self.name.clone());
                }
            }
        };
        tokio::select! {
            () = work => Ok(()),
            lost = renew => Err(lost),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("valid timestamp")
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn without_a_lease_a_replica_creates_it() {
        assert_eq!(decide(None, "a", at(0)), Decision::Create);
    }

    #[test]
    fn the_holder_renews_and_others_follow_while_it_is_fresh() {
        let lease = held_by("a", 0);
        assert_eq!(decide(Some(&lease), "a", at(10)), Decision::Renew);
        assert_eq!(decide(Some(&lease), "b", at(10)), Decision::Follow);
    }

    #[test]
    fn an_expired_or_released_lease_is_taken_over() {
        assert_eq!(
            decide(Some(&held_by("a", 0)), "b", at(15)),
            Decision::TakeOver
        );
        let released = LeaseSpec {
            holder_identity: None,
            ..held_by("a", 0)
        };
        assert_eq!(decide(Some(&released), "b", at(1)), Decision::TakeOver);
    }
}
