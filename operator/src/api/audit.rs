//! Audit events: one JSON line per security-relevant action on the `audit` tracing target
//! ([`AUDIT_TARGET`]), so that they can be routed and retained apart from operational logs.
//!
//! Fields: `action` (`login`, `logout`, `generate`, `cancel`, `quota_reset`, `restart`,
//! `offload`, `preset`, `access`), `outcome` (`success`, `failure`, `denied`), `user`, `tenant`,
//! `client` (address), `reason`. Tokens, codes, cookies and prompts are never logged.

use std::net::IpAddr;

use crate::telemetry::AUDIT_TARGET;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
        }
    }
}

/// One audit event. Build it with [`Event::new`] and the setters, then [`Event::emit`] it.
#[derive(Debug)]
pub struct Event<'a> {
    action: &'a str,
    outcome: Outcome,
    user: Option<&'a str>,
    tenant: Option<&'a str>,
    client: Option<IpAddr>,
    reason: Option<&'a str>,
    target: Option<&'a str>,
}

impl<'a> Event<'a> {
    pub fn new(action: &'a str, outcome: Outcome) -> Self {
        Self {
            action,
            outcome,
            user: None,
            tenant: None,
            client: None,
            reason: None,
            target: None,
        }
    }

    pub fn user(mut self, user: &'a str) -> Self {
        self.user = Some(user);
        self
    }

    pub fn tenant(mut self, tenant: &'a str) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// The client's address; `None` when a trusted proxy did not say (logged as absent).
    pub fn client(mut self, client: Option<IpAddr>) -> Self {
        self.client = client;
        self
    }

    pub fn reason(mut self, reason: &'a str) -> Self {
        self.reason = Some(reason);
        self
    }

    /// The object acted on: a job name, the user whose quota is reset, a preset.
    pub fn object(mut self, target: &'a str) -> Self {
        self.target = Some(target);
        self
    }

    pub fn emit(self) {
        let client = self.client.map(|ip| ip.to_string());
        tracing::info!(
            target: AUDIT_TARGET,
            action = self.action,
            outcome = self.outcome.as_str(),
            user = self.user,
            tenant = self.tenant,
            client = client.as_deref(),
            reason = self.reason,
            object = self.target,
            "audit"
        );
    }
}
