//! Presets: named parameter sets. Each user keeps their own; tenant admins publish presets for
//! the whole tenant.
//!
//! Stored in the ConfigMap `atelier-presets` of the tenant namespace: key `tenant.json` holds
//! the tenant's presets, `users.json` every user's (by user id). Kubernetes is the database
//! here as elsewhere; writes are read-modify-write with the resourceVersion, retried on
//! conflict. The API shows a user only their own presets (people with `kubectl` read access to
//! ConfigMaps of the namespace see all of them: presets are not secrets).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{TenantAccess, tenant_access};
use crate::api::AppState;
use crate::api::audit::{Event, Outcome};
use crate::api::auth::Caller;
use crate::api::error::{ApiError, ApiResult, ErrorBody};

pub const CONFIG_MAP: &str = "atelier-presets";
const TENANT_KEY: &str = "tenant.json";
const USERS_KEY: &str = "users.json";
const MAX_PER_SCOPE: usize = 50;
/// Keeps the ConfigMap well below Kubernetes' 1 MiB object limit.
const MAX_STORED_BYTES: usize = 512 * 1024;
/// One user's share of [`MAX_STORED_BYTES`] (serialized), so that one member cannot fill the
/// tenant's storage alone.
const MAX_USER_BYTES: usize = 24 * 1024;
const WRITE_ATTEMPTS: usize = 8;

/// Saved generation parameters; every field optional.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PresetParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_images: Option<u32>,
}

#[derive(Serialize, ToSchema, Debug, PartialEq)]
pub struct Preset {
    pub name: String,
    pub params: PresetParams,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct Presets {
    /// Published by the tenant's admins.
    pub tenant: Vec<Preset>,
    /// The caller's own.
    pub mine: Vec<Preset>,
}

/// A preset as stored, or as sent: the parameters this API knows, and the fields it does not.
/// Stored data keeps unknown fields (written by a newer API, or by hand) through rewrites;
/// a request that sends any is refused ([`parse_body`]).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct PresetRecord {
    #[serde(flatten)]
    pub params: PresetParams,
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

impl From<PresetParams> for PresetRecord {
    fn from(params: PresetParams) -> Self {
        Self {
            params,
            unknown: serde_json::Map::new(),
        }
    }
}

type Named = BTreeMap<String, PresetRecord>;

/// The stored presets of one ConfigMap.
#[derive(Default, Debug, PartialEq)]
pub struct Store {
    pub tenant: Named,
    pub users: BTreeMap<String, Named>,
}

impl Store {
    /// The presets in the ConfigMap (none when there is none). Stored data that does not parse
    /// is an error naming the key, never an empty store: the next write would replace
    /// everyone's presets with it.
    pub fn from_config_map(map: Option<&ConfigMap>) -> Result<Self, String> {
        let data = map.and_then(|map| map.data.as_ref());
        let read = |key: &str| {
            data.and_then(|data| data.get(key))
                .map_or("{}", String::as_str)
        };
        let unreadable = |key: &str, error: serde_json::Error| {
            format!(
                "the stored presets (ConfigMap {CONFIG_MAP}, key {key}) cannot be read: {error}; \
                 an administrator must repair or remove the key"
            )
        };
        Ok(Self {
            tenant: serde_json::from_str(read(TENANT_KEY))
                .map_err(|error| unreadable(TENANT_KEY, error))?,
            users: serde_json::from_str(read(USERS_KEY))
                .map_err(|error| unreadable(USERS_KEY, error))?,
        })
    }

    pub fn to_data(&self) -> Result<BTreeMap<String, String>, String> {
        let tenant = serde_json::to_string(&self.tenant).map_err(|e| e.to_string())?;
        let users = serde_json::to_string(&self.users).map_err(|e| e.to_string())?;
        if tenant.len() + users.len() > MAX_STORED_BYTES {
            return Err("preset storage of this tenant is full".into());
        }
        Ok([
            (TENANT_KEY.to_string(), tenant),
            (USERS_KEY.to_string(), users),
        ]
        .into())
    }

    pub fn view(&self, user: &str) -> Presets {
        let list = |named: &Named| {
            named
                .iter()
                .map(|(name, record)| Preset {
                    name: name.clone(),
                    params: record.params.clone(),
                })
                .collect()
        };
        Presets {
            tenant: list(&self.tenant),
            mine: self.users.get(user).map(list).unwrap_or_default(),
        }
    }
}

/// Which presets a change is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Mine,
    Tenant,
}

/// Applies one change (`Some` saves, `None` deletes) to the store.
pub fn apply(
    store: &mut Store,
    scope: Scope,
    user: &str,
    name: &str,
    params: Option<PresetParams>,
) -> Result<(), String> {
    if !valid_name(name) {
        return Err("preset names are 1-64 letters, digits, spaces, '.', '_' or '-'".into());
    }
    let named = match scope {
        Scope::Tenant => &mut store.tenant,
        Scope::Mine => store.users.entry(user.to_string()).or_default(),
    };
    match params {
        Some(params) => {
            if params
                .prompt
                .as_ref()
                .is_some_and(|prompt| prompt.chars().count() > 2000)
            {
                return Err("prompt must be at most 2000 characters".into());
            }
            if !named.contains_key(name) && named.len() >= MAX_PER_SCOPE {
                return Err(format!("at most {MAX_PER_SCOPE} presets"));
            }
            let previous = named.insert(name.to_string(), params.into());
            let over_share = scope == Scope::Mine && serialized_len(named) > MAX_USER_BYTES;
            if over_share {
                match previous {
                    Some(previous) => named.insert(name.to_string(), previous),
                    None => named.remove(name),
                };
                store.users.retain(|_, named| !named.is_empty());
                return Err(format!(
                    "your presets would take more than {} KiB; delete some first",
                    MAX_USER_BYTES / 1024
                ));
            }
        }
        None => {
            named.remove(name);
        }
    }
    store.users.retain(|_, named| !named.is_empty());
    Ok(())
}

/// Bytes of `named` as stored (these types always serialize).
fn serialized_len(named: &Named) -> usize {
    serde_json::to_string(named).map_or(usize::MAX, |json| json.len())
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '.' | '_' | '-'))
        && name.trim() == name
}

fn config_maps(state: &AppState, access: &TenantAccess) -> Api<ConfigMap> {
    Api::namespaced(state.kube.clone(), &access.namespace)
}

/// Read-modify-write of the ConfigMap, retried on conflicts with concurrent writers.
async fn change(
    state: &AppState,
    access: &TenantAccess,
    caller: &Caller,
    scope: Scope,
    name: &str,
    params: Option<PresetParams>,
) -> ApiResult<Presets> {
    let api = config_maps(state, access);
    for attempt in 1..=WRITE_ATTEMPTS {
        let current = api.get_opt(CONFIG_MAP).await?;
        let mut store = Store::from_config_map(current.as_ref()).map_err(ApiError::Internal)?;
        apply(&mut store, scope, caller.user(), name, params.clone())
            .map_err(ApiError::InvalidRequest)?;
        let data = store.to_data().map_err(ApiError::Conflict)?;
        let written = match current {
            Some(mut map) => {
                map.data = Some(data);
                api.replace(CONFIG_MAP, &PostParams::default(), &map).await
            }
            None => {
                let map = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(CONFIG_MAP.into()),
                        ..ObjectMeta::default()
                    },
                    data: Some(data),
                    ..ConfigMap::default()
                };
                api.create(&PostParams::default(), &map).await
            }
        };
        match written {
            Ok(_) => {
                let action = if params.is_some() {
                    "preset_save"
                } else {
                    "preset_delete"
                };
                Event::new(action, Outcome::Success)
                    .user(caller.user())
                    .tenant(&access.name)
                    .client(caller.client)
                    .object(name)
                    .emit();
                return Ok(store.view(caller.user()));
            }
            Err(kube::Error::Api(status)) if status.code == 409 && attempt < WRITE_ATTEMPTS => {
                continue;
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(ApiError::Conflict(
        "presets are being changed concurrently; try again".into(),
    ))
}

/// List presets
#[utoipa::path(
    get, path = "/api/v1/tenants/{tenant}/presets", tag = "presets",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses((status = 200, description = "The tenant's and the caller's presets", body = Presets)),
    security(("bearer" = []), ("session" = []))
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Presets>> {
    let access = tenant_access(&state, &caller, &tenant, "presets").await?;
    let current = config_maps(&state, &access).get_opt(CONFIG_MAP).await?;
    let store = Store::from_config_map(current.as_ref()).map_err(ApiError::Internal)?;
    Ok(Json(store.view(caller.user())))
}

/// The parameters of a request; a field this API does not know is refused by name.
fn parse_body(
    body: Result<Json<PresetRecord>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<PresetParams> {
    let Json(record) = body.map_err(|rejection| ApiError::InvalidRequest(rejection.body_text()))?;
    if !record.unknown.is_empty() {
        let names: Vec<&str> = record.unknown.keys().map(String::as_str).collect();
        return Err(ApiError::InvalidRequest(format!(
            "unknown preset field(s): {}",
            names.join(", ")
        )));
    }
    Ok(record.params)
}

/// Save one of my presets
#[utoipa::path(
    put, path = "/api/v1/tenants/{tenant}/presets/mine/{name}", tag = "presets",
    params(("tenant" = String, Path, description = "Tenant name"), ("name" = String, Path, description = "Preset name")),
    request_body = PresetParams,
    responses((status = 200, description = "Saved", body = Presets), (status = 400, description = "Bad name or parameters", body = ErrorBody)),
    security(("bearer" = []), ("session" = []))
)]
pub async fn save_mine(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
    body: Result<Json<PresetRecord>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<Presets>> {
    let access = tenant_access(&state, &caller, &tenant, "preset_save").await?;
    let params = parse_body(body)?;
    Ok(Json(
        change(&state, &access, &caller, Scope::Mine, &name, Some(params)).await?,
    ))
}

/// Delete one of my presets
#[utoipa::path(
    delete, path = "/api/v1/tenants/{tenant}/presets/mine/{name}", tag = "presets",
    params(("tenant" = String, Path, description = "Tenant name"), ("name" = String, Path, description = "Preset name")),
    responses((status = 200, description = "Deleted (or was not there)", body = Presets)),
    security(("bearer" = []), ("session" = []))
)]
pub async fn delete_mine(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Json<Presets>> {
    let access = tenant_access(&state, &caller, &tenant, "preset_delete").await?;
    Ok(Json(
        change(&state, &access, &caller, Scope::Mine, &name, None).await?,
    ))
}

/// Publish a tenant preset (admin)
#[utoipa::path(
    put, path = "/api/v1/tenants/{tenant}/presets/tenant/{name}", tag = "presets",
    params(("tenant" = String, Path, description = "Tenant name"), ("name" = String, Path, description = "Preset name")),
    request_body = PresetParams,
    responses((status = 200, description = "Published", body = Presets), (status = 403, description = "Not an admin", body = ErrorBody)),
    security(("bearer" = []), ("session" = []))
)]
pub async fn save_tenant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
    body: Result<Json<PresetRecord>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<Presets>> {
    let access = tenant_access(&state, &caller, &tenant, "preset_save").await?;
    access.require_admin(&caller, "preset_save")?;
    let params = parse_body(body)?;
    Ok(Json(
        change(&state, &access, &caller, Scope::Tenant, &name, Some(params)).await?,
    ))
}

/// Withdraw a tenant preset (admin)
#[utoipa::path(
    delete, path = "/api/v1/tenants/{tenant}/presets/tenant/{name}", tag = "presets",
    params(("tenant" = String, Path, description = "Tenant name"), ("name" = String, Path, description = "Preset name")),
    responses((status = 200, description = "Withdrawn", body = Presets), (status = 403, description = "Not an admin", body = ErrorBody)),
    security(("bearer" = []), ("session" = []))
)]
pub async fn delete_tenant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Json<Presets>> {
    let access = tenant_access(&state, &caller, &tenant, "preset_delete").await?;
    access.require_admin(&caller, "preset_delete")?;
    Ok(Json(
        change(&state, &access, &caller, Scope::Tenant, &name, None).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(steps: u32) -> PresetParams {
        PresetParams {
            steps: Some(steps),
            ..PresetParams::default()
        }
    }

    #[test]
    fn users_keep_their_own_presets_apart() {
        let mut store = Store::default();
        apply(&mut store, Scope::Mine, "alice", "fast", Some(params(4))).unwrap();
        apply(&mut store, Scope::Mine, "bob", "fast", Some(params(8))).unwrap();
        apply(
            &mut store,
            Scope::Tenant,
            "carol",
            "house style",
            Some(params(28)),
        )
        .unwrap();
        let alice = store.view("alice");
        assert_eq!(
            alice.mine,
            vec![Preset {
                name: "fast".into(),
                params: params(4)
            }]
        );
        assert_eq!(alice.tenant.len(), 1);
        assert_eq!(store.view("bob").mine[0].params, params(8));
        assert!(store.view("carol").mine.is_empty());

        // Round trip through the ConfigMap data.
        let map = ConfigMap {
            data: Some(store.to_data().unwrap()),
            ..ConfigMap::default()
        };
        assert_eq!(Store::from_config_map(Some(&map)).unwrap(), store);

        apply(&mut store, Scope::Mine, "alice", "fast", None).unwrap();
        assert!(
            !store.users.contains_key("alice"),
            "empty entries are dropped"
        );
        for bad in ["", " x", "a/b", "../x", &"x".repeat(65)] {
            assert!(
                apply(&mut store, Scope::Mine, "alice", bad, Some(params(1))).is_err(),
                "{bad:?}"
            );
        }
        for i in 0..MAX_PER_SCOPE {
            apply(
                &mut store,
                Scope::Mine,
                "dave",
                &format!("p{i}"),
                Some(params(1)),
            )
            .unwrap();
        }
        assert!(apply(&mut store, Scope::Mine, "dave", "one more", Some(params(1))).is_err());
        assert!(
            apply(&mut store, Scope::Mine, "dave", "p0", Some(params(2))).is_ok(),
            "replacing is fine"
        );
        let sent: PresetRecord = serde_json::from_str(r#"{"steps": 4, "user": "bob"}"#).unwrap();
        assert!(
            parse_body(Ok(Json(sent))).is_err(),
            "requests name no unknown field"
        );
    }

    fn config_map(tenant: &str, users: &str) -> ConfigMap {
        ConfigMap {
            data: Some(
                [
                    (TENANT_KEY.to_string(), tenant.to_string()),
                    (USERS_KEY.to_string(), users.to_string()),
                ]
                .into(),
            ),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn unreadable_stored_presets_are_an_error_not_an_empty_store() {
        let alices = r#"{"alice": {"fast": {"steps": 4}}}"#;
        let broken = config_map("{}", r#"{"alice": {"fast": {"steps": "four"}}}"#);
        let error = Store::from_config_map(Some(&broken)).unwrap_err();
        assert!(error.contains("users.json"), "{error}");
        let error = Store::from_config_map(Some(&config_map("[", alices))).unwrap_err();
        assert!(error.contains("tenant.json"), "{error}");
        assert!(Store::from_config_map(None).unwrap().users.is_empty());
    }

    #[test]
    fn stored_unknown_fields_survive_a_rewrite() {
        let map = config_map(
            r#"{"house": {"steps": 28, "sampler": "euler"}}"#,
            r#"{"alice": {"fast": {"steps": 4, "loraScale": 0.5}}}"#,
        );
        let mut store = Store::from_config_map(Some(&map)).unwrap();
        assert_eq!(store.view("alice").mine[0].params, params(4));
        apply(&mut store, Scope::Mine, "bob", "slow", Some(params(50))).unwrap();
        let written = store.to_data().unwrap();
        assert!(
            written[TENANT_KEY].contains(r#""sampler":"euler""#),
            "{written:?}"
        );
        assert!(
            written[USERS_KEY].contains(r#""loraScale":0.5"#),
            "{written:?}"
        );
    }

    #[test]
    fn one_user_cannot_take_the_whole_store() {
        let mut store = Store::default();
        let long = |n: usize| PresetParams {
            prompt: Some(format!("{n} {}", "x".repeat(1900))),
            ..PresetParams::default()
        };
        let mut saved = 0;
        while apply(
            &mut store,
            Scope::Mine,
            "mallory",
            &format!("p{saved}"),
            Some(long(saved)),
        )
        .is_ok()
        {
            saved += 1;
        }
        assert!(
            saved < MAX_PER_SCOPE,
            "the byte share ends it before the count"
        );
        let json = serde_json::to_string(&store.users["mallory"]).unwrap();
        assert!(json.len() <= MAX_USER_BYTES);
        let failed_name = format!("p{saved}");
        assert!(
            !store.users["mallory"].contains_key(&failed_name),
            "a refused save leaves nothing"
        );
        apply(&mut store, Scope::Mine, "alice", "mine", Some(long(0))).unwrap();
    }
}
