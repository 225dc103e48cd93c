//! From token claims to an [`Identity`]: the same rules for bearer tokens and for the claims of
//! a browser login (ID token and userinfo).

use atelier_crds::names::user_name_problem;
use serde_json::{Map, Value};

use crate::api::authz::Identity;

/// Which claims carry the user id and the groups (`--user-claim`, `--groups-claim`).
#[derive(Clone, Debug)]
pub struct ClaimNames {
    pub user: String,
    pub groups: String,
}

/// Why the claims name no acceptable user.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("the token lacks the required claim {0:?}")]
    Missing(String),
    /// With `email` as the user claim: anyone can put any address in their profile at many
    /// providers, so only an address the provider verified is an identity.
    #[error("the e-mail address is not verified (`email_verified` is not true)")]
    UnverifiedEmail,
    #[error("the user claim {claim:?} {problem}")]
    BadUserName {
        claim: String,
        problem: &'static str,
    },
}

impl ClaimError {
    pub fn reason(&self) -> &'static str {
        match self {
            ClaimError::Missing(_) => "missing_claim",
            ClaimError::UnverifiedEmail => "unverified_email",
            ClaimError::BadUserName { .. } => "bad_user_claim",
        }
    }
}

/// The identity in `claims`. The user claim must be a string that [`user_name_problem`]
/// accepts, and when it is `email`, `email_verified` must be true; a missing groups claim
/// means no groups, and a single string counts as one group.
pub fn identity_from_claims(
    claims: &Map<String, Value>,
    names: &ClaimNames,
) -> Result<Identity, ClaimError> {
    let user = claims
        .get(&names.user)
        .and_then(Value::as_str)
        .filter(|user| !user.is_empty())
        .ok_or_else(|| ClaimError::Missing(names.user.clone()))?
        .to_string();
    if let Some(problem) = user_name_problem(&user) {
        return Err(ClaimError::BadUserName {
            claim: names.user.clone(),
            problem,
        });
    }
    if names.user == "email" && !email_verified(claims) {
        return Err(ClaimError::UnverifiedEmail);
    }
    let groups = match claims.get(&names.groups) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(group)) => vec![group.clone()],
        _ => Vec::new(),
    };
    Ok(Identity { user, groups })
}

/// `email_verified: true`; some providers (Cognito) send the string `"true"`.
fn email_verified(claims: &Map<String, Value>) -> bool {
    match claims.get("email_verified") {
        Some(Value::Bool(verified)) => *verified,
        Some(Value::String(verified)) => verified == "true",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(user: &str) -> ClaimNames {
        ClaimNames {
            user: user.into(),
            groups: "groups".into(),
        }
    }

    fn map(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn user_and_groups() {
        let claims = map(
            json!({"sub": "u1", "email": "a@x", "email_verified": true, "groups": ["g1", 7, "g2"]}),
        );
        let identity = identity_from_claims(&claims, &names("email")).unwrap();
        assert_eq!(
            identity,
            Identity {
                user: "a@x".into(),
                groups: vec!["g1".into(), "g2".into()]
            }
        );
        assert_eq!(
            identity_from_claims(&claims, &names("sub")).unwrap().user,
            "u1"
        );
        let single = map(json!({"email": "a@x", "email_verified": "true", "groups": "g1"}));
        assert_eq!(
            identity_from_claims(&single, &names("email"))
                .unwrap()
                .groups,
            vec!["g1".to_string()]
        );
    }

    #[test]
    fn missing_user_claim_is_an_error_missing_groups_are_none() {
        let claims = map(json!({"sub": "u1"}));
        assert_eq!(
            identity_from_claims(&claims, &names("email")),
            Err(ClaimError::Missing("email".to_string()))
        );
        assert_eq!(
            identity_from_claims(&map(json!({"email": ""})), &names("email")),
            Err(ClaimError::Missing("email".to_string()))
        );
        assert!(
            identity_from_claims(&claims, &names("sub"))
                .unwrap()
                .groups
                .is_empty()
        );
    }

    #[test]
    fn an_email_is_an_identity_only_when_verified() {
        for unverified in [
            json!({"email": "alice@example.com"}),
            json!({"email": "alice@example.com", "email_verified": false}),
            json!({"email": "alice@example.com", "email_verified": "false"}),
            json!({"email": "alice@example.com", "email_verified": 1}),
        ] {
            assert_eq!(
                identity_from_claims(&map(unverified.clone()), &names("email")),
                Err(ClaimError::UnverifiedEmail),
                "{unverified}"
            );
        }
        // Another user claim does not depend on the e-mail's verification.
        let by_sub = map(json!({"sub": "u1", "email": "alice@example.com"}));
        assert_eq!(
            identity_from_claims(&by_sub, &names("sub")).unwrap().user,
            "u1"
        );
    }

    #[test]
    fn user_names_that_could_pass_for_another_are_refused() {
        for user in [
            "al\tice@example.com",
            ".\t.",
            "..",
            "alice@example.com\r\n",
            "al\u{200b}ice",
        ] {
            let claims = map(json!({"sub": user, "email": user, "email_verified": true}));
            for claim in ["sub", "email"] {
                assert_eq!(
                    identity_from_claims(&claims, &names(claim)).map_err(|e| e.reason()),
                    Err("bad_user_claim"),
                    "{user:?} as {claim}"
                );
            }
        }
    }
}
