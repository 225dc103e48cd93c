//! Leader election on a `coordination.k8s.io` Lease, so that of several operator replicas exactly
//! one reconciles at a time. A replica that cannot renew its lease in time exits: a process that
//! might no longer be leader must not keep writing.

use std::time::Duration;

use anyhow::Context as _;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};

const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Held leadership; renewal runs in the background until the process ends.
pub struct Leadership {
    renewal: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Waits until this replica holds the lease, then keeps renewing it.
pub async fn acquire(
    client: kube::Client,
    namespace: &str,
    name: &str,
    identity: &str,
) -> anyhow::Result<Leadership> {
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    loop {
        match try_hold(&leases, name, identity, Timestamp::now()).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "leader election attempt failed"),
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    tracing::info!(identity, lease = name, "became leader");
    let (name, identity) = (name.to_string(), identity.to_string());
    let renewal = tokio::spawn(async move {
        let mut last_renewed = std::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match try_hold(&leases, &name, &identity, Timestamp::now()).await {
                Ok(true) => last_renewed = std::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("lost the leader lease to another replica; exiting");
                    std::process::exit(1);
                }
                Err(error) if last_renewed.elapsed() < LEASE_DURATION => {
                    tracing::warn!(%error, "renewing the leader lease failed; retrying")
                }
                Err(error) => {
                    tracing::error!(%error, "could not renew the leader lease in time; exiting");
                    std::process::exit(1);
                }
            }
        }
    });
    Ok(Leadership { renewal })
}

/// One attempt to create, renew or take over the lease. `Ok(false)` when another live holder has it.
async fn try_hold(
    leases: &Api<Lease>,
    name: &str,
    identity: &str,
    now: Timestamp,
) -> anyhow::Result<bool> {
    let Some(mut lease) = leases.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(held_spec(identity, now, 0, now)),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error).context("creating the leader lease"),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let decision = decide(&spec, identity, now);
    let transitions = spec.lease_transitions.unwrap_or(0);
    let new_spec = match decision {
        Decision::Wait => return Ok(false),
        Decision::Renew => held_spec(
            identity,
            spec.acquire_time.map_or(now, |t| t.0),
            transitions,
            now,
        ),
        Decision::TakeOver => held_spec(identity, now, transitions + 1, now),
    };
    lease.spec = Some(new_spec);
    // The resourceVersion in `lease` makes this a compare-and-swap: two replicas cannot both win.
    match leases.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error).context("updating the leader lease"),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Renew,
    TakeOver,
    Wait,
}

fn decide(spec: &LeaseSpec, identity: &str, now: Timestamp) -> Decision {
    if spec.holder_identity.as_deref() == Some(identity) {
        return Decision::Renew;
    }
    let duration = spec
        .lease_duration_seconds
        .map_or(LEASE_DURATION.as_secs() as i64, i64::from);
    let expired = match &spec.renew_time {
        None => true,
        Some(renewed) => renewed.0 + jiff::SignedDuration::from_secs(duration) < now,
    };
    if spec.holder_identity.is_none() || expired {
        Decision::TakeOver
    } else {
        Decision::Wait
    }
}

fn held_spec(identity: &str, acquired: Timestamp, transitions: i32, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(identity.into()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: Some(MicroTime(acquired)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    #[test]
    fn a_live_holder_keeps_the_lease_and_an_expired_one_loses_it() {
        let spec = held_spec("a", at(0), 0, at(0));
        assert_eq!(decide(&spec, "a", at(10)), Decision::Renew);
        assert_eq!(decide(&spec, "b", at(10)), Decision::Wait);
        assert_eq!(decide(&spec, "b", at(16)), Decision::TakeOver);
        assert_eq!(
            decide(&LeaseSpec::default(), "b", at(0)),
            Decision::TakeOver
        );
    }
}
