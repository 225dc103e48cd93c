//! From token claims to an [`Identity`]: the same rules for bearer tokens and for the claims of
//! a browser login (ID token and userinfo).

use serde_json::{Map, Value};

use crate::api::authz::Identity;

/// Which claims carry the user id and the groups (`--user-claim`, `--groups-claim`).
#[derive(Clone, Debug)]
pub struct ClaimNames {
    pub user: String,
    pub groups: String,
}

/// The identity in `claims`. The user claim must be a non-empty string (else `Err` with its
/// name); a missing groups claim means no groups, and a single string counts as one group.
pub fn identity_from_claims(
    claims: &Map<String, Value>,
    names: &ClaimNames,
) -> Result<Identity, String> {
    let user = claims
        .get(&names.user)
        .and_then(Value::as_str)
        .filter(|user| !user.is_empty())
        .ok_or_else(|| names.user.clone())?
        .to_string();
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
        let claims = map(json!({"sub": "u1", "email": "a@x", "groups": ["g1", 7, "g2"]}));
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
        let single = map(json!({"email": "a@x", "groups": "g1"}));
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
            Err("email".to_string())
        );
        assert_eq!(
            identity_from_claims(&map(json!({"email": ""})), &names("email")),
            Err("email".to_string())
        );
        assert!(
            identity_from_claims(&claims, &names("sub"))
                .unwrap()
                .groups
                .is_empty()
        );
    }
}
