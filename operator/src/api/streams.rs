//! How many event streams (`GET .../generations/{name}/events`) one user holds open.
//!
//! Each stream is a watch on the Kubernetes API for as long as its job runs, so an unbounded
//! number per user would let one member load the API server and this process at will, and a
//! stream must not outlive the login it was opened with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::AppState;

/// How often an event stream opened with a browser session checks that the session still
/// exists (a stream outlives no logout by more than this).
const SESSION_CHECK_INTERVAL: Duration = Duration::from_secs(15);

/// Event streams one user may hold open at once (a few browser tabs, a script or two).
pub const MAX_STREAMS_PER_USER: usize = 8;

/// Counts per user; a lock poisoned by a panic elsewhere is used as it is (every update is whole).
#[derive(Default)]
pub struct StreamSlots {
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream; dropping it frees the slot.
pub struct StreamSlot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    user: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("you have {MAX_STREAMS_PER_USER} event streams open already; close one first")]
pub struct TooManyStreams;

impl StreamSlots {
    pub fn acquire(&self, user: &str) -> Result<StreamSlot, TooManyStreams> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(user.to_string()).or_default();
        if *count >= MAX_STREAMS_PER_USER {
            return Err(TooManyStreams);
        }
        *count += 1;
        Ok(StreamSlot {
            open: self.open.clone(),
            user: user.to_string(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// Resolves when the browser session a stream was opened with ends (logout, expiry), checked
/// every [`SESSION_CHECK_INTERVAL`]; never for a stream opened with a bearer token.
pub async fn session_ended(state: Arc<AppState>, session: Option<String>) {
    let Some(id) = session else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(SESSION_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        if state.sessions.get(&id).is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_capped_per_user_and_freed_on_drop() {
        let slots = StreamSlots::default();
        let mut held: Vec<StreamSlot> = (0..MAX_STREAMS_PER_USER)
            .map(|_| slots.acquire("mallory").unwrap())
            .collect();
        assert_eq!(slots.acquire("mallory").err(), Some(TooManyStreams));
        assert!(slots.acquire("alice").is_ok(), "others are not affected");
        held.pop();
        assert!(slots.acquire("mallory").is_ok());
        held.clear();
        assert!(slots.open.lock().unwrap().get("mallory").is_none());
    }
}
