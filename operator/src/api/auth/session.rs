//! Browser sessions, kept in the API process's memory.
//!
//! In memory on purpose: a session holds nothing that cannot be had again by logging in, and
//! the login round trip is a redirect. The price: sessions are lost when the API restarts, and
//! with several API replicas the ingress must keep a browser on one replica (session
//! affinity) — or run one replica. The cookie carries only a random id; the identity, the CSRF
//! token and the ID token (for RP-initiated logout) stay on the server.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::api::authz::Identity;

/// How long a login may last.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Bound on stored sessions. Only a finished login at the provider creates one (logins in
/// progress are in [`PendingLogins`](super::pending::PendingLogins)).
const MAX_SESSIONS: usize = 100_000;

/// A logged-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    pub identity: Identity,
    /// Must come back in `X-CSRF-Token` (or the `csrf` form field) on state-changing requests.
    pub csrf_token: String,
    /// Raw ID token, sent as `id_token_hint` at logout.
    pub id_token: Option<String>,
}

/// Every update leaves its map consistent (nothing in it can panic half-way), so a lock poisoned by
/// a panic elsewhere is used as it is rather than turning every later request into a panic.
#[derive(Default)]
pub struct SessionStore {
    entries: Mutex<HashMap<String, (Instant, Session)>>,
}

#[derive(Debug, thiserror::Error)]
#[error("too many sessions; try again later")]
pub struct StoreFull;

/// A fresh unguessable id (256 bits from the OS generator, base64url).
pub fn random_token() -> String {
    openidconnect::CsrfToken::new_random_len(32).into_secret()
}

impl SessionStore {
    /// Stores a new session under a new id (never the login's, against session fixation).
    pub fn create(&self, session: Session) -> Result<String, StoreFull> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= MAX_SESSIONS / 2 {
            entries.retain(|_, (expires, _)| *expires > now);
        }
        if entries.len() >= MAX_SESSIONS {
            return Err(StoreFull);
        }
        let id = random_token();
        entries.insert(id.clone(), (now + SESSION_TTL, session));
        Ok(id)
    }

    pub fn get(&self, id: &str) -> Option<Session> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        match entries.get(id) {
            Some((expires, session)) if *expires > Instant::now() => Some(session.clone()),
            _ => None,
        }
    }

    pub fn remove(&self, id: &str) -> Option<Session> {
        let removed = self
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        removed.map(|(_, session)| session)
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

/// Cookie names. With `Secure` cookies the `__Host-` prefix makes browsers refuse the cookie
/// unless it is Secure, host-only and for path `/`, so a sibling domain cannot plant one.
pub fn cookie_name(secure: bool) -> &'static str {
    if secure {
        "__Host-atelier_session"
    } else {
        "atelier_session"
    }
}

/// `Set-Cookie` value for the session cookie; `None` clears it.
pub fn set_cookie(secure: bool, id: Option<&str>, max_age: Duration) -> String {
    let name = cookie_name(secure);
    let secure_attr = if secure { "; Secure" } else { "" };
    match id {
        Some(id) => format!(
            "{name}={id}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{secure_attr}",
            max_age.as_secs()
        ),
        None => format!("{name}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{secure_attr}"),
    }
}

/// The session id from a request's `Cookie` headers.
pub fn cookie_value(headers: &axum::http::HeaderMap, secure: bool) -> Option<String> {
    let name = cookie_name(secure);
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_string())
        .filter(|value| !value.is_empty())
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str) -> Session {
        Session {
            identity: Identity {
                user: user.into(),
                groups: vec![],
            },
            csrf_token: random_token(),
            id_token: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_expire() {
        let store = SessionStore::default();
        let id = store.create(session("alice")).unwrap();
        assert_eq!(store.get(&id).unwrap().identity.user, "alice");
        tokio::time::advance(SESSION_TTL).await;
        assert!(store.get(&id).is_none());

        let id = store.create(session("bob")).unwrap();
        assert!(store.remove(&id).is_some());
        assert!(store.get(&id).is_none());
    }

    #[test]
    fn cookies() {
        let secure = set_cookie(true, Some("abc"), SESSION_TTL);
        assert_eq!(
            secure,
            "__Host-atelier_session=abc; Path=/; HttpOnly; SameSite=Lax; Max-Age=28800; Secure"
        );
        assert!(!set_cookie(false, Some("abc"), SESSION_TTL).contains("Secure"));
        assert!(set_cookie(false, None, SESSION_TTL).contains("Max-Age=0"));

        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            axum::http::header::COOKIE,
            "other=1; atelier_session=xyz; x=2".parse().unwrap(),
        );
        assert_eq!(cookie_value(&headers, false).as_deref(), Some("xyz"));
        assert_eq!(
            cookie_value(&headers, true),
            None,
            "the insecure name is not read in secure mode"
        );
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
        assert_eq!(random_token().len(), 43);
    }
}
