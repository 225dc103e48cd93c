//! The token a tenant's inference and outputs pods require (`Authorization: Bearer`), read from
//! the tenant namespace's Secret `atelier-api-token` by the dispatcher and the API.
//!
//! Cached per namespace after the first read: the token changes only when someone deletes the
//! Secret (the tenant controller then creates a new one), and a pod that refuses the cached
//! token makes the caller [`PodTokens::forget`] it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use atelier_crds::names::{API_TOKEN_KEY, API_TOKEN_SECRET};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading Secret {API_TOKEN_SECRET} of {namespace}: {source}")]
    Read {
        namespace: String,
        source: kube::Error,
    },
    #[error("Secret {API_TOKEN_SECRET} of {0} has no key {API_TOKEN_KEY}")]
    Missing(String),
}

#[derive(Clone)]
pub struct PodTokens {
    client: kube::Client,
    cache: Arc<Mutex<HashMap<String, Arc<str>>>>,
}

impl PodTokens {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Arc::default(),
        }
    }

    /// The token of the pods in tenant namespace `namespace`.
    pub async fn get(&self, namespace: &str) -> Result<Arc<str>, TokenError> {
        if let Some(token) = self.lock().get(namespace) {
            return Ok(token.clone());
        }
        let secret = Api::<Secret>::namespaced(self.client.clone(), namespace)
            .get(API_TOKEN_SECRET)
            .await
            .map_err(|source| TokenError::Read {
                namespace: namespace.to_string(),
                source,
            })?;
        let token = secret
            .data
            .as_ref()
            .and_then(|data| data.get(API_TOKEN_KEY))
            .and_then(|bytes| std::str::from_utf8(&bytes.0).ok())
            .map(|token| Arc::<str>::from(token.trim()))
            .ok_or_else(|| TokenError::Missing(namespace.to_string()))?;
        self.lock().insert(namespace.to_string(), token.clone());
        Ok(token)
    }

    /// Drops the cached token of `namespace` after a pod refused it.
    pub fn forget(&self, namespace: &str) {
        self.lock().remove(namespace);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<str>>> {
        // The map is consistent at every point; a panic elsewhere leaves it usable.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
