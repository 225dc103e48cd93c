//! The API's view of all Tenants for `/me`: a watch-fed cache, so that a call does not list every
//! tenant from the API server (that capped `/me` at a few dozen requests per second with 100
//! tenants). Requests that act in one tenant still read that tenant fresh: they enforce its
//! membership and quota, where a watch that lags by a few milliseconds would be visible.

use std::sync::Arc;
use std::time::Duration;

use atelier_crds::Tenant;
use futures::StreamExt;
use kube::Api;
use kube::api::ListParams;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};

/// How long a request waits for the first list of the watch before reading directly.
const FIRST_LIST_WAIT: Duration = Duration::from_secs(5);

pub struct TenantCache {
    kube: kube::Client,
    store: Store<Tenant>,
}

impl TenantCache {
    /// Starts the watch on the current tokio runtime.
    pub fn spawn(kube: kube::Client) -> Self {
        let (store, writer) = reflector::store::<Tenant>();
        let watch = reflector::reflector(
            writer,
            watcher(Api::<Tenant>::all(kube.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .touched_objects()
        .for_each(|_| async {});
        tokio::spawn(watch);
        TenantCache { kube, store }
    }

    /// Every tenant; read directly while the watch has not listed them yet.
    pub async fn all(&self) -> kube::Result<Vec<Arc<Tenant>>> {
        if tokio::time::timeout(FIRST_LIST_WAIT, self.store.wait_until_ready())
            .await
            .is_ok_and(|ready| ready.is_ok())
        {
            return Ok(self.store.state());
        }
        let list = Api::<Tenant>::all(self.kube.clone())
            .list(&ListParams::default())
            .await?;
        Ok(list.items.into_iter().map(Arc::new).collect())
    }
}
