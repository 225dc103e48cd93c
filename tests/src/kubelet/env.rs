//! A container's environment: `env`/`envFrom` with the downward API, Secret and ConfigMap
//! references, and Kubernetes' `$(VAR)` expansion.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::{Api, Client, ResourceExt};

/// Expands `$(NAME)` with `lookup` like Kubernetes does for `command`, `args` and `env`
/// values: `$$` escapes a `$`, and a reference to an unknown name stays as written.
pub(crate) fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut output = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(dollar) = rest.find('$') {
        output.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        let mut chars = after.chars();
        match chars.next() {
            None => {
                output.push('$');
                rest = after;
            }
            Some('$') => {
                output.push('$');
                rest = &after[1..];
            }
            Some('(') => match after.find(')') {
                Some(close) => {
                    let name = &after[1..close];
                    match lookup(name) {
                        Some(value) => output.push_str(&value),
                        None => output.push_str(&format!("$({name})")),
                    }
                    rest = &after[close + 1..];
                }
                None => {
                    output.push_str("$(");
                    rest = &after[1..];
                }
            },
            Some(other) => {
                output.push('$');
                output.push(other);
                rest = chars.as_str();
            }
        }
    }
    output.push_str(rest);
    output
}

/// Ordered environment variables where a later definition replaces an earlier one in place.
#[derive(Default)]
pub(crate) struct EnvVars(Vec<(String, String)>);

impl EnvVars {
    pub(crate) fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.0.iter_mut().find(|(existing, _)| *existing == name) {
            Some(entry) => entry.1 = value,
            None => self.0.push((name, value)),
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(existing, _)| existing == name)
            .map(|(_, value)| value.clone())
    }

    pub(crate) fn expand(&self, input: &str) -> String {
        expand(input, |name| self.get(name))
    }

    pub(crate) fn into_vec(self) -> Vec<(String, String)> {
        self.0
    }
}

/// The value of a downward-API `fieldRef` path for this pod.
pub(crate) fn field_value(pod: &Pod, path: &str, pod_ip: &str) -> anyhow::Result<String> {
    let spec = pod.spec.as_ref();
    if let Some(key) = bracketed(path, "metadata.labels") {
        return Ok(pod.labels().get(key).cloned().unwrap_or_default());
    }
    if let Some(key) = bracketed(path, "metadata.annotations") {
        return Ok(pod.annotations().get(key).cloned().unwrap_or_default());
    }
    Ok(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => pod.uid().unwrap_or_default(),
        "spec.nodeName" => spec
            .and_then(|spec| spec.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|spec| spec.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => "127.0.0.1".into(),
        other => bail!("unsupported fieldRef {other:?}"),
    })
}

/// `metadata.labels['key']` → `key`.
fn bracketed<'a>(path: &'a str, field: &str) -> Option<&'a str> {
    path.strip_prefix(field)?
        .strip_prefix("['")?
        .strip_suffix("']")
}

/// Reads Secrets and ConfigMaps of the pod's namespace.
pub(crate) struct References {
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
}

impl References {
    pub(crate) fn new(client: &Client, namespace: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client.clone(), namespace),
        }
    }

    /// The decoded data of a Secret, `None` if it does not exist.
    pub(crate) async fn secret(
        &self,
        name: &str,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let secret = self
            .secrets
            .get_opt(name)
            .await
            .with_context(|| format!("reading Secret {name}"))?;
        Ok(secret.map(|secret| {
            let mut data: BTreeMap<String, Vec<u8>> = secret
                .string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(key, value)| (key, value.into_bytes()))
                .collect();
            data.extend(
                secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(key, value)| (key, value.0)),
            );
            data
        }))
    }

    /// The data (text and binary) of a ConfigMap, `None` if it does not exist.
    pub(crate) async fn config_map(
        &self,
        name: &str,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let config_map = self
            .config_maps
            .get_opt(name)
            .await
            .with_context(|| format!("reading ConfigMap {name}"))?;
        Ok(config_map.map(|config_map| {
            let mut data: BTreeMap<String, Vec<u8>> = config_map
                .binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(key, value)| (key, value.0))
                .collect();
            data.extend(
                config_map
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(key, value)| (key, value.into_bytes())),
            );
            data
        }))
    }

    async fn key(
        &self,
        kind: Kind,
        name: &str,
        key: &str,
        optional: Option<bool>,
    ) -> anyhow::Result<Option<String>> {
        let data = match kind {
            Kind::Secret => self.secret(name).await?,
            Kind::ConfigMap => self.config_map(name).await?,
        };
        let value = data.as_ref().and_then(|data| data.get(key));
        match value {
            Some(bytes) => Ok(Some(String::from_utf8_lossy(bytes).into_owned())),
            None if optional == Some(true) => Ok(None),
            None if data.is_none() => Err(anyhow!("{kind:?} {name:?} not found")),
            None => Err(anyhow!("key {key:?} not found in {kind:?} {name:?}")),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Secret,
    ConfigMap,
}

/// The container's environment on top of `base` (which it may override): `envFrom` first,
/// then `env` in order, each value expanded against the variables defined before it.
pub(crate) async fn container_env(
    references: &References,
    pod: &Pod,
    container: &Container,
    pod_ip: &str,
    base: EnvVars,
) -> anyhow::Result<EnvVars> {
    let mut vars = base;
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.as_deref().unwrap_or_default();
        let (data, name, optional) = if let Some(reference) = &source.config_map_ref {
            let data = references.config_map(&reference.name).await?;
            (data, &reference.name, reference.optional)
        } else if let Some(reference) = &source.secret_ref {
            let data = references.secret(&reference.name).await?;
            (data, &reference.name, reference.optional)
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (key, value) in data {
                    vars.set(format!("{prefix}{key}"), String::from_utf8_lossy(&value));
                }
            }
            None if optional == Some(true) => {}
            None => bail!("envFrom: {name:?} not found"),
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => Some(vars.expand(var.value.as_deref().unwrap_or_default())),
            Some(source) => {
                if let Some(field) = &source.field_ref {
                    Some(field_value(pod, &field.field_path, pod_ip)?)
                } else if let Some(key) = &source.secret_key_ref {
                    references
                        .key(Kind::Secret, &key.name, &key.key, key.optional)
                        .await?
                } else if let Some(key) = &source.config_map_key_ref {
                    references
                        .key(Kind::ConfigMap, &key.name, &key.key, key.optional)
                        .await?
                } else {
                    bail!(
                        "env {}: only fieldRef, secretKeyRef and configMapKeyRef are supported",
                        var.name
                    );
                }
            }
        };
        if let Some(value) = value {
            vars.set(&var.name, value);
        }
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "POD_IP" => Some("198.18.0.2".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_like_kubernetes() {
        assert_eq!(
            expand("--listen $(POD_IP):8080", lookup),
            "--listen 198.18.0.2:8080"
        );
        assert_eq!(expand("$(POD_IP)$(POD_IP)", lookup), "198.18.0.2198.18.0.2");
        assert_eq!(expand("a$(EMPTY)b", lookup), "ab");
        assert_eq!(expand("$(UNKNOWN) stays", lookup), "$(UNKNOWN) stays");
        assert_eq!(
            expand("$$(POD_IP) is escaped", lookup),
            "$(POD_IP) is escaped"
        );
        assert_eq!(expand("$$$(POD_IP)", lookup), "$198.18.0.2");
        assert_eq!(expand("unclosed $(POD_IP", lookup), "unclosed $(POD_IP");
        assert_eq!(
            expand("$x and $é and trailing $", lookup),
            "$x and $é and trailing $"
        );
        assert_eq!(expand("no references", lookup), "no references");
    }

    #[test]
    fn later_definitions_replace_earlier_ones_in_place() {
        let mut vars = EnvVars::default();
        vars.set("A", "1");
        vars.set("B", "$(A)");
        vars.set("A", "2");
        assert_eq!(vars.expand("$(A)-$(B)"), "2-$(A)");
        assert_eq!(
            vars.into_vec(),
            vec![("A".into(), "2".into()), ("B".into(), "$(A)".into())]
        );
    }

    #[test]
    fn downward_api_fields() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "local-1", "containers": []},
        }))
        .unwrap();
        assert_eq!(
            field_value(&pod, "metadata.name", "198.18.0.9").unwrap(),
            "p"
        );
        assert_eq!(field_value(&pod, "metadata.namespace", "").unwrap(), "ns");
        assert_eq!(field_value(&pod, "metadata.uid", "").unwrap(), "u-1");
        assert_eq!(
            field_value(&pod, "metadata.labels['app']", "").unwrap(),
            "web"
        );
        assert_eq!(
            field_value(&pod, "status.podIP", "198.18.0.9").unwrap(),
            "198.18.0.9"
        );
        assert_eq!(field_value(&pod, "spec.nodeName", "").unwrap(), "local-1");
        assert_eq!(
            field_value(&pod, "spec.serviceAccountName", "").unwrap(),
            "default"
        );
        assert!(field_value(&pod, "spec.bogus", "").is_err());
    }
}
