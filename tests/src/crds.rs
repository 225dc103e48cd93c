//! Installs the chart's CustomResourceDefinitions and waits until the API serves them.

use std::path::Path;

use anyhow::Context;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;

use crate::wait::{DEFAULT_TIMEOUT, wait_for};

/// Every CRD in the `*.yaml`/`*.yml` files of `dir` (several documents per file allowed), in
/// file name order.
pub fn read_crds(dir: &Path) -> anyhow::Result<Vec<CustomResourceDefinition>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading the CRDs in {}", dir.display()))?;
    let mut files: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    let mut crds = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)
                .with_context(|| format!("parsing {}", file.display()))?;
            if value.is_null() {
                continue;
            }
            let crd = serde_yaml::from_value(value)
                .with_context(|| format!("a CRD in {}", file.display()))?;
            crds.push(crd);
        }
    }
    Ok(crds)
}

/// Server-side applies the CRDs of `dir` and waits until each is Established. Returns their
/// names.
pub async fn install_crds(client: &Client, dir: &Path) -> anyhow::Result<Vec<String>> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("atelier-tests").force();
    let mut names = Vec::new();
    for crd in read_crds(dir)? {
        let name = crd.name_any();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .with_context(|| format!("applying CRD {name}"))?;
        names.push(name);
    }
    for name in &names {
        wait_for(
            &format!("CRD {name} to be Established"),
            DEFAULT_TIMEOUT,
            || async {
                let crd = api.get(name).await?;
                let established = crd
                    .status
                    .and_then(|status| status.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|condition| {
                        condition.type_ == "Established" && condition.status == "True"
                    });
                Ok(established.then_some(()))
            },
        )
        .await?;
    }
    Ok(names)
}
