//! Ready endpoints of a Service, read from its EndpointSlices. The platform finds inference and
//! outputs pods this way rather than through ClusterIPs or DNS: the dispatcher needs each pod's
//! address anyway, and it works on clusters without kube-proxy.

use std::net::SocketAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

/// One ready pod behind a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// `namespace/name` of the pod, when the slice names it.
    pub pod: Option<String>,
}

/// Ready endpoints of `service` in `namespace` on the port named `port_name`.
pub async fn ready_endpoints(
    client: &kube::Client,
    namespace: &str,
    service: &str,
    port_name: &str,
) -> kube::Result<Vec<Endpoint>> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let list = slices.list(&params).await?;
    Ok(ready_in_slices(&list.items, port_name))
}

/// The pure part of [`ready_endpoints`]: ready, non-terminating addresses, deduplicated.
pub fn ready_in_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port_name: &str,
) -> Vec<Endpoint> {
    let mut found = Vec::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port_name))
            .and_then(|p| p.port)
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(false);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            let pod = endpoint.target_ref.as_ref().and_then(|r| {
                Some(format!(
                    "{}/{}",
                    r.namespace.as_deref()?,
                    r.name.as_deref()?
                ))
            });
            for ip in &endpoint.addresses {
                if let Ok(ip) = ip.parse() {
                    found.push(Endpoint {
                        address: SocketAddr::new(ip, port as u16),
                        pod: pod.clone(),
                    });
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}
