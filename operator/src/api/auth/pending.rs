//! Logins in progress, kept apart from live sessions.
//!
//! `/auth/login` answers anyone, so what it stores is bounded twice: in all ([`MAX_PENDING`])
//! and per client address ([`MAX_PENDING_PER_CLIENT`]). One address starting logins in a loop
//! only fills its own share, and a flood can never push out a live session: those are in the
//! [`SessionStore`](super::session::SessionStore). When the store is full, expired entries go
//! first and then the oldest pending login of the fullest address, so a flood from many
//! addresses costs each of them, not the people logging in now.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::session::random_token;

/// How long a started login may take at the provider.
pub const PENDING_TTL: Duration = Duration::from_secs(10 * 60);
/// Logins in progress at once, all clients together.
pub const MAX_PENDING: usize = 10_000;
/// Logins in progress at once from one client address (a household or office behind one NAT
/// starts a few at a time; a browser retrying starts one per click).
pub const MAX_PENDING_PER_CLIENT: usize = 20;

/// A login in progress: what the callback needs to finish it.
#[derive(Clone, Debug)]
pub struct PendingLogin {
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
    /// Absolute URL on the API's own origin to return to after login.
    pub return_to: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("too many logins in progress from your address; finish or wait for one (10 minutes)")]
pub struct TooManyFromClient;

struct Entry {
    expires: Instant,
    /// `None`: a client whose address is unknown (all such share one budget).
    client: Option<IpAddr>,
    login: PendingLogin,
}

/// Every update leaves its map consistent (nothing in it can panic half-way), so a lock poisoned by
/// a panic elsewhere is used as it is rather than turning every later request into a panic.
#[derive(Default)]
pub struct PendingLogins {
    entries: Mutex<HashMap<String, Entry>>,
}

impl PendingLogins {
    /// Stores a login in progress and returns the id for the cookie.
    pub fn start(
        &self,
        client: Option<IpAddr>,
        login: PendingLogin,
    ) -> Result<String, TooManyFromClient> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let from_client = |entries: &HashMap<String, Entry>| {
            entries
                .values()
                .filter(|entry| entry.client == client && entry.expires > now)
                .count()
        };
        if from_client(&entries) >= MAX_PENDING_PER_CLIENT {
            return Err(TooManyFromClient);
        }
        if entries.len() >= MAX_PENDING {
            entries.retain(|_, entry| entry.expires > now);
        }
        if entries.len() >= MAX_PENDING {
            evict_oldest_of_fullest_client(&mut entries);
        }
        let id = random_token();
        entries.insert(
            id.clone(),
            Entry {
                expires: now + PENDING_TTL,
                client,
                login,
            },
        );
        Ok(id)
    }

    /// Takes (removes) the login in progress under `id`: each is finished at most once.
    pub fn take(&self, id: &str) -> Option<PendingLogin> {
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)?;
        (entry.expires > Instant::now()).then_some(entry.login)
    }

    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn evict_oldest_of_fullest_client(entries: &mut HashMap<String, Entry>) {
    let mut per_client: HashMap<Option<IpAddr>, usize> = HashMap::new();
    for entry in entries.values() {
        *per_client.entry(entry.client).or_default() += 1;
    }
    let Some(fullest) = per_client
        .into_iter()
        .max_by_key(|(_, count)| *count)
        .map(|(client, _)| client)
    else {
        return;
    };
    let oldest = entries
        .iter()
        .filter(|(_, entry)| entry.client == fullest)
        .min_by_key(|(_, entry)| entry.expires)
        .map(|(id, _)| id.clone());
    if let Some(id) = oldest {
        entries.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(state: &str) -> PendingLogin {
        PendingLogin {
            state: state.into(),
            nonce: "n".into(),
            pkce_verifier: "v".into(),
            return_to: "https://atelier.example.com/".into(),
        }
    }

    fn address(n: u32) -> Option<IpAddr> {
        Some(IpAddr::V4(n.into()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_finishes_once_and_expires() {
        let store = PendingLogins::default();
        let id = store.start(address(1), login("s")).unwrap();
        assert_eq!(store.take(&id).unwrap().state, "s");
        assert!(store.take(&id).is_none(), "a login finishes once");
        let id = store.start(address(1), login("s")).unwrap();
        tokio::time::advance(PENDING_TTL).await;
        assert!(store.take(&id).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn one_address_cannot_lock_out_another() {
        let store = PendingLogins::default();
        for _ in 0..MAX_PENDING_PER_CLIENT {
            store.start(address(1), login("flood")).unwrap();
        }
        assert_eq!(
            store.start(address(1), login("flood")),
            Err(TooManyFromClient)
        );
        assert_eq!(store.len(), MAX_PENDING_PER_CLIENT);
        let id = store.start(address(2), login("mine")).unwrap();
        assert_eq!(store.take(&id).unwrap().state, "mine");
        // The flood's logins expire, and its address may log in again.
        tokio::time::advance(PENDING_TTL).await;
        assert!(store.start(address(1), login("later")).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_from_many_addresses_stays_bounded_and_logins_still_start() {
        let store = PendingLogins::default();
        let mut n = 0;
        while store.len() < MAX_PENDING {
            n += 1;
            store.start(address(n % 1000), login("flood")).unwrap();
        }
        // Full: a new login still starts (at the expense of the fullest flooder), and the one
        // started just before this is still there to finish.
        let first = store.start(address(5000), login("first")).unwrap();
        let second = store.start(address(5001), login("second")).unwrap();
        assert_eq!(store.len(), MAX_PENDING);
        assert_eq!(store.take(&first).unwrap().state, "first");
        assert_eq!(store.take(&second).unwrap().state, "second");
    }
}
