//! The Helm chart (`charts/atelier`) and the examples, against the real tools and the real API
//! server:
//!
//! - `helm lint --strict` and `helm template` pass with every `ci/` values file and every
//!   `examples/values-*.yaml`, and every rendered pod runs with the restricted security context;
//! - the schema refuses typos and missing required values;
//! - the rendered manifests and every example manifest pass a server-side dry run;
//! - the RBAC rules are exactly the documented ones;
//! - the chart installs, the operator and the API run as pods through the local kubelet with the
//!   chart's ServiceAccounts (so with exactly its RBAC), the example tenant and job go through
//!   end to end, a kubectl user cannot create jobs for someone else, requests outside the
//!   operator's role are refused, the CRD upgrade path works, `helm upgrade` rolls the pods and
//!   `helm uninstall` leaves no platform object behind while tenant data stays.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use atelier_crds::{GenerationJob, JobPhase, Tenant};
use atelier_tests::oidc::OidcProvider;
use atelier_tests::{TestCluster, paths, unique_name, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// How long the chart's pods and the example job may take on a busy machine.
const SLOW: Duration = Duration::from_secs(300);

fn chart_dir() -> PathBuf {
    paths::workspace_root().join("charts/atelier")
}

fn examples_dir() -> PathBuf {
    paths::workspace_root().join("examples")
}

/// `charts/atelier/ci/*.yaml` and `examples/values-*.yaml`: every values file the project ships.
fn values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    for (dir, prefix) in [(chart_dir().join("ci"), ""), (examples_dir(), "values-")] {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        files.extend(
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    name.starts_with(prefix) && name.ends_with(".yaml")
                }),
        );
    }
    files.sort();
    assert!(
        files.len() >= 4,
        "the ci/ values files are missing: {files:?}"
    );
    files
}

fn tool(name: &str) -> PathBuf {
    let path = paths::tool(name);
    assert!(
        path.exists(),
        "{} is missing: run `make cluster` (tests/cluster/build.sh)",
        path.display()
    );
    path
}

/// Runs a command to completion; its stdout, or an error with everything it printed.
async fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes()).await?;
        drop(pipe);
    }
    let output = child.wait_with_output().await?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "`{} {}` failed ({}):\n{}\n{}",
            program.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            stdout
        );
    }
    Ok(stdout)
}

async fn helm(args: &[&str]) -> anyhow::Result<String> {
    run(&tool("helm"), args, None).await
}

/// `kubectl --kubeconfig <cluster admin> ARGS`.
async fn kubectl(
    cluster: &TestCluster,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let kubeconfig = cluster.kubeconfig_path().to_string_lossy().into_owned();
    let mut all = vec!["--kubeconfig", kubeconfig.as_str()];
    all.extend_from_slice(args);
    run(&tool("kubectl"), &all, stdin).await
}

/// `helm template` of the chart with a values file, as parsed documents.
async fn template(
    release: &str,
    namespace: &str,
    values: &Path,
    extra: &[&str],
) -> anyhow::Result<(String, Vec<Value>)> {
    let chart = chart_dir().to_string_lossy().into_owned();
    let values = values.to_string_lossy().into_owned();
    let mut args = vec![
        "template",
        release,
        &chart,
        "--namespace",
        namespace,
        "--kube-version",
        "1.36.3",
        "-f",
        &values,
    ];
    args.extend_from_slice(extra);
    let text = helm(&args).await?;
    let documents = parse_documents(&text)?;
    Ok((text, documents))
}

fn parse_documents(text: &str) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize;
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value =
            Value::deserialize(document).context("a rendered document is not valid YAML")?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

fn kind_and_name(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The pod templates of the Deployments among `documents`.
fn pod_templates(documents: &[Value]) -> Vec<(String, &Value)> {
    documents
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .map(|d| (kind_and_name(d), &d["spec"]["template"]))
        .collect()
}

/// Reads a file of the repository with `MODEL_DIR` and similar placeholders replaced.
fn example(name: &str, replacements: &[(&str, &str)]) -> String {
    let path = examples_dir().join(name);
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    for (from, to) in replacements {
        text = text.replace(from, to);
    }
    text
}

#[tokio::test]
async fn lint_and_template_pass_with_every_values_file() -> anyhow::Result<()> {
    let chart = chart_dir().to_string_lossy().into_owned();
    for values in values_files() {
        let file = values.to_string_lossy().into_owned();
        helm(&[
            "lint",
            "--strict",
            &chart,
            "-f",
            &file,
            "--kube-version",
            "1.36.3",
        ])
        .await
        .with_context(|| format!("helm lint with {file}"))?;
        let (_, documents) = template("atelier", "atelier-system", &values, &[])
            .await
            .with_context(|| format!("helm template with {file}"))?;
        ensure!(!documents.is_empty(), "{file} renders nothing");
        for object in &documents {
            let name = kind_and_name(object);
            let labels = &object["metadata"]["labels"];
            for label in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
                "app.kubernetes.io/version",
            ] {
                ensure!(
                    labels[label].is_string(),
                    "{name} ({file}) lacks the label {label}"
                );
            }
        }
        for (name, pod) in pod_templates(&documents) {
            check_restricted(&name, pod).with_context(|| format!("with {file}"))?;
        }
    }
    Ok(())
}

/// The restricted Pod Security profile, spelled out rather than left to namespace defaults.
fn check_restricted(name: &str, template: &Value) -> anyhow::Result<()> {
    let spec = &template["spec"];
    let pod = &spec["securityContext"];
    ensure!(pod["runAsNonRoot"] == true, "{name}: pod runAsNonRoot");
    ensure!(
        pod["seccompProfile"]["type"] == "RuntimeDefault",
        "{name}: seccomp RuntimeDefault"
    );
    let containers = spec["containers"].as_array().context("containers")?;
    for container in containers {
        let security = &container["securityContext"];
        ensure!(
            security["allowPrivilegeEscalation"] == false,
            "{name}: allowPrivilegeEscalation"
        );
        ensure!(
            security["readOnlyRootFilesystem"] == true,
            "{name}: readOnlyRootFilesystem"
        );
        ensure!(
            security["runAsNonRoot"] == true,
            "{name}: container runAsNonRoot"
        );
        ensure!(
            security["capabilities"]["drop"] == json!(["ALL"]),
            "{name}: drop ALL capabilities"
        );
        ensure!(
            container["resources"]["limits"].is_object(),
            "{name}: resource limits"
        );
        ensure!(
            container["readinessProbe"].is_object(),
            "{name}: readiness probe"
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_schema_refuses_typos_and_missing_required_values() -> anyhow::Result<()> {
    let default = chart_dir().join("ci/default-values.yaml");
    let typo = template(
        "atelier",
        "atelier-system",
        &default,
        &["--set", "operator.replcas=3"],
    )
    .await;
    let message = format!("{:#}", typo.expect_err("a misspelled key must fail"));
    ensure!(
        message.contains("replcas"),
        "the error names the unknown key: {message}"
    );
    let nested = template(
        "atelier",
        "atelier-system",
        &default,
        &["--set", "api.oidc.issuer=https://x"],
    )
    .await;
    ensure!(nested.is_err(), "unknown nested keys fail too");
    let wrong_type = template(
        "atelier",
        "atelier-system",
        &default,
        &["--set", "operator.replicas=two"],
    )
    .await;
    ensure!(wrong_type.is_err(), "wrong types fail");
    let no_issuer = template(
        "atelier",
        "atelier-system",
        &default,
        &["--set", "api.oidc.issuerUrl="],
    )
    .await;
    let message = format!("{:#}", no_issuer.expect_err("the issuer is required"));
    ensure!(
        message.contains("api.oidc.issuerUrl"),
        "the error says what is missing: {message}"
    );
    let unsafe_replicas = template(
        "atelier",
        "atelier-system",
        &default,
        &["--set", "operator.leaderElection.enabled=false"],
    )
    .await;
    ensure!(
        unsafe_replicas.is_err(),
        "two replicas without leader election are refused"
    );
    // Issue 16, item 4: ID tokens carry the client id as audience.
    let id_token_audience = template(
        "atelier",
        "atelier-system",
        &default,
        &["--set", "api.oidc.audience=atelier"],
    )
    .await;
    let message = format!(
        "{:#}",
        id_token_audience.expect_err("the client id as API audience is refused")
    );
    ensure!(
        message.contains("api.oidc.audience must differ from api.oidc.clientId"),
        "{message}"
    );
    let no_audience = template(
        "atelier",
        "atelier-system",
        &default,
        &["--set", "api.oidc.audience="],
    )
    .await;
    let message = format!("{:#}", no_audience.expect_err("the audience is required"));
    ensure!(
        message.contains("api.oidc.audience is required"),
        "{message}"
    );
    // Issue 16, item 6: a proxy header believed from anyone would let any pod pick its address.
    let header_from_anyone = template(
        "atelier",
        "atelier-system",
        &default,
        &["--set", "api.trustedProxyHeader=X-Forwarded-For"],
    )
    .await;
    let message = format!(
        "{:#}",
        header_from_anyone.expect_err("the header needs the proxies' CIDRs")
    );
    ensure!(
        message.contains("api.trustedProxyCidrs is required"),
        "{message}"
    );
    Ok(())
}

/// (apiGroup, resource, verb, resourceName or "*") of every rule of a role.
type Grants = BTreeSet<(String, String, String, String)>;

fn grants(role: &Value) -> Grants {
    let mut out = Grants::new();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    for rule in role["rules"].as_array().into_iter().flatten() {
        let names = strings(&rule["resourceNames"]);
        let names = if names.is_empty() {
            vec!["*".to_string()]
        } else {
            names
        };
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    for name in &names {
                        out.insert((group.clone(), resource.clone(), verb.clone(), name.clone()));
                    }
                }
            }
        }
    }
    out
}

/// `group resource verbs...` lines → grants (resourceName "*").
fn expected(lines: &[&str]) -> Grants {
    let mut out = Grants::new();
    for line in lines {
        let mut words = line.split_whitespace();
        let group = words.next().unwrap();
        let group = if group == "core" { "" } else { group };
        let resource = words.next().unwrap();
        for verb in words {
            let (verb, name) = verb.split_once('=').unwrap_or((verb, "*"));
            out.insert((
                group.to_string(),
                resource.to_string(),
                verb.to_string(),
                name.to_string(),
            ));
        }
    }
    out
}

fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .ok_or_else(|| anyhow!("no {kind}/{name} rendered"))
}

fn diff(name: &str, actual: &Grants, expected: &Grants) -> anyhow::Result<()> {
    let extra: Vec<_> = actual.difference(expected).collect();
    let missing: Vec<_> = expected.difference(actual).collect();
    ensure!(
        extra.is_empty() && missing.is_empty(),
        "{name}: granted but not expected {extra:?}; expected but not granted {missing:?}"
    );
    Ok(())
}

/// The RBAC of the chart, rule by rule. docs/operations.md explains each; changing one is a
/// decision to make there and here together.
#[tokio::test]
async fn rbac_is_exactly_the_documented_least_privilege() -> anyhow::Result<()> {
    let (_, documents) = template(
        "atelier",
        "atelier-system",
        &chart_dir().join("ci/default-values.yaml"),
        &[],
    )
    .await?;
    let operator = expected(&[
        "atelier.dev tenants get list watch patch",
        "atelier.dev tenants/status patch update",
        "atelier.dev generationjobs get list watch patch delete",
        "atelier.dev generationjobs/status patch",
        "core namespaces get list watch create patch delete",
        "core resourcequotas get list watch create patch",
        "core persistentvolumeclaims get list watch create patch delete",
        "core services get list watch create patch",
        "core limitranges get create patch",
        "core serviceaccounts get create patch",
        "networking.k8s.io networkpolicies get create patch",
        "rbac.authorization.k8s.io rolebindings get create patch",
        "apps deployments get list watch create patch",
        "core pods list",
        "apps replicasets list",
        "core persistentvolumes patch",
        "discovery.k8s.io endpointslices list watch",
        "core secrets get create",
        "events.k8s.io events create patch",
        "rbac.authorization.k8s.io clusterroles bind=atelier-tenant-admin bind=atelier-tenant-member",
    ]);
    diff(
        "operator ClusterRole",
        &grants(find(&documents, "ClusterRole", "atelier-operator")?),
        &operator,
    )?;
    let leader =
        expected(&["coordination.k8s.io leases get=atelier-operator update=atelier-operator"]);
    diff(
        "operator leader-election Role",
        &grants(find(
            &documents,
            "Role",
            "atelier-operator-leader-election",
        )?),
        &leader,
    )?;
    let api = expected(&[
        "atelier.dev generationjobs get list watch create patch",
        "atelier.dev tenants get list watch",
        "atelier.dev tenants/status update",
        "discovery.k8s.io endpointslices list",
        "core pods deletecollection",
        "core secrets get=atelier-api-token",
        "core configmaps create get=atelier-presets update=atelier-presets",
    ]);
    diff(
        "API ClusterRole",
        &grants(find(&documents, "ClusterRole", "atelier-api")?),
        &api,
    )?;
    let admin = expected(&[
        "atelier.dev generationjobs get list watch create patch prioritize",
        "core pods get list watch",
        "core pods/log get",
    ]);
    diff(
        "tenant admin ClusterRole",
        &grants(find(&documents, "ClusterRole", "atelier-tenant-admin")?),
        &admin,
    )?;
    let member = expected(&["atelier.dev generationjobs create get"]);
    diff(
        "tenant member ClusterRole",
        &grants(find(&documents, "ClusterRole", "atelier-tenant-member")?),
        &member,
    )?;

    // Each binding gives its role to the chart's own ServiceAccount and nobody else.
    for (kind, name, account) in [
        ("ClusterRoleBinding", "atelier-operator", "atelier-operator"),
        (
            "RoleBinding",
            "atelier-operator-leader-election",
            "atelier-operator",
        ),
        ("ClusterRoleBinding", "atelier-api", "atelier-api"),
    ] {
        let binding = find(&documents, kind, name)?;
        ensure!(
            binding["subjects"]
                == json!([{"kind": "ServiceAccount", "name": account, "namespace": "atelier-system"}]),
            "{kind}/{name} binds {}",
            binding["subjects"]
        );
    }
    // No wildcard anywhere, and nothing that escalates.
    for role in documents
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for (group, resource, verb, _) in grants(role) {
            ensure!(
                group != "*" && resource != "*" && verb != "*",
                "{} grants a wildcard",
                kind_and_name(role)
            );
            ensure!(
                verb != "escalate" && verb != "impersonate",
                "{} grants {verb}",
                kind_and_name(role)
            );
        }
    }
    Ok(())
}

/// A stand-in for the Prometheus Operator's ServiceMonitor CRD (which the test cluster lacks),
/// so that the servicemonitor values render into objects the server accepts.
async fn ensure_service_monitor_crd(client: &Client) -> anyhow::Result<()> {
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"plural": "servicemonitors", "singular": "servicemonitor", "kind": "ServiceMonitor", "listKind": "ServiceMonitorList"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            }],
        },
    }))?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "servicemonitors.monitoring.coreos.com",
        &PatchParams::apply("atelier-tests"),
        &Patch::Apply(&crd),
    )
    .await?;
    wait_for(
        "the ServiceMonitor CRD",
        Duration::from_secs(30),
        || async {
            let crd = crds.get("servicemonitors.monitoring.coreos.com").await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(established.then_some(()))
        },
    )
    .await
}

#[tokio::test]
async fn rendered_manifests_pass_a_server_side_dry_run() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    ensure_service_monitor_crd(&cluster.client().await).await?;
    for values in values_files() {
        let namespace = cluster.create_namespace("chart-dry-run").await?;
        let release = unique_name("dry");
        let (text, _) = template(&release, &namespace, &values, &[]).await?;
        kubectl(
            cluster,
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--field-manager=helm-dry-run",
                "-f",
                "-",
            ],
            Some(&text),
        )
        .await
        .with_context(|| format!("dry run of the chart with {}", values.display()))?;
    }
    Ok(())
}

#[tokio::test]
async fn every_example_manifest_passes_a_server_side_dry_run() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    // The job example names the namespace of tenant team-a, which the install test creates for
    // real; here it goes to a namespace of its own.
    let namespace = cluster.create_namespace("examples").await?;
    let mut manifests = 0;
    for entry in std::fs::read_dir(examples_dir())? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !name.ends_with(".yaml") || name.starts_with("values-") {
            continue;
        }
        let text = example(
            &name,
            &[
                ("MODEL_DIR", "/var/lib/atelier/models/flux-tiny"),
                (
                    "namespace: atelier-team-a",
                    &format!("namespace: {namespace}"),
                ),
            ],
        );
        // Cluster-scoped examples are renamed so that they never meet the real ones.
        let text = text.replace(
            "name: team-a\n",
            &format!("name: {}\n", unique_name("dry-team-a")),
        );
        kubectl(
            cluster,
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--field-manager=examples-dry-run",
                "-f",
                "-",
            ],
            Some(&text),
        )
        .await
        .with_context(|| format!("dry run of examples/{name}"))?;
        manifests += 1;
    }
    ensure!(manifests >= 5, "only {manifests} example manifests found");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The chart installed for real.

const RELEASE: &str = "atelier";
const RELEASE_NAMESPACE: &str = "atelier-system";
const OPERATOR_SA: &str = "system:serviceaccount:atelier-system:atelier-operator";
const API_SA: &str = "system:serviceaccount:atelier-system:atelier-api";
const TENANT: &str = "team-a";
const TENANT_NAMESPACE: &str = "atelier-team-a";

/// An OpenID provider for the API pods (tests/oidc), stopped when dropped.
fn start_oidc_provider(dir: &Path, public_url: &str) -> anyhow::Result<OidcProvider> {
    let config = json!({
        "audience": format!("{public_url}/api"),
        "clients": [{
            "client_id": "atelier-demo",
            "client_secret": "atelier-demo-secret",
            "redirect_uris": [format!("{public_url}/auth/callback")],
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
        }],
        "users": [{"id": "alice", "email": "alice@example.com", "password": "alice-pw", "groups": ["team-a"]}],
    });
    std::fs::create_dir_all(dir)?;
    OidcProvider::start(&dir.join("oidc-config.json"), &config)
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Ready pods of a component of the release.
async fn ready_pods(client: &Client, component: &str) -> anyhow::Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let selector =
        format!("app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}");
    Ok(pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none())
        .collect())
}

/// Pod logs of the release, for failure messages.
fn release_logs(cluster: &TestCluster, pods: &[Pod]) -> String {
    pods.iter()
        .map(|p| cluster.pod_logs(RELEASE_NAMESPACE, &p.name_any()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The state of the example job and the tenant's pods, with every log, for failure messages.
async fn diagnostics(cluster: &TestCluster, client: &Client, operators: &[Pod]) -> String {
    let job = Api::<GenerationJob>::namespaced(client.clone(), TENANT_NAMESPACE)
        .get("lighthouse-at-dusk")
        .await
        .ok();
    let pods = Api::<Pod>::namespaced(client.clone(), TENANT_NAMESPACE)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let mut out = format!("job status: {:?}\n", job.and_then(|j| j.status));
    for pod in &pods {
        out += &format!(
            "pod {}: {:?}\n{}\n",
            pod.name_any(),
            pod.status
                .as_ref()
                .map(|s| (&s.phase, &s.conditions, &s.container_statuses)),
            cluster.pod_logs(TENANT_NAMESPACE, &pod.name_any())
        );
    }
    out + &release_logs(cluster, operators)
}

/// The host directory behind a claim (hostPath or local volume).
async fn claim_dir(client: &Client, namespace: &str, claim: &str) -> anyhow::Result<PathBuf> {
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .get(claim)
        .await?;
    let volume = claim
        .spec
        .and_then(|s| s.volume_name)
        .context("the claim is not bound")?;
    let volume = Api::<PersistentVolume>::all(client.clone())
        .get(&volume)
        .await?;
    let spec = volume.spec.context("a PV without spec")?;
    let path = spec
        .host_path
        .map(|h| h.path)
        .or(spec.local.map(|l| l.path))
        .context("the volume has no host path")?;
    Ok(PathBuf::from(path))
}

/// `kubectl ... --as USER --as-group G...`: a request as someone else, through impersonation.
async fn kubectl_as(
    cluster: &TestCluster,
    user: &str,
    groups: &[&str],
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let mut all = vec![format!("--as={user}")];
    all.extend(groups.iter().map(|g| format!("--as-group={g}")));
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    kubectl(cluster, &all, stdin).await
}

async fn expect_forbidden(cluster: &TestCluster, user: &str, args: &[&str]) -> anyhow::Result<()> {
    let groups = if user.starts_with("system:serviceaccount:") {
        vec!["system:serviceaccounts", "system:authenticated"]
    } else {
        vec!["system:authenticated"]
    };
    match kubectl_as(cluster, user, &groups, args, None).await {
        Ok(out) => bail!("`kubectl {}` as {user} was allowed: {out}", args.join(" ")),
        Err(error) => {
            let message = format!("{error:#}");
            ensure!(
                message.contains("Forbidden") || message.contains("forbidden"),
                "`kubectl {}` as {user} failed otherwise: {message}",
                args.join(" ")
            );
            Ok(())
        }
    }
}

#[tokio::test]
async fn the_chart_installs_runs_a_job_upgrades_and_uninstalls() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let kubeconfig = cluster.kubeconfig_path().to_string_lossy().into_owned();
    let chart = chart_dir().to_string_lossy().into_owned();
    for binary in ["atelier-operator", "atelier-inference"] {
        let path = cluster.bin_dir().join(binary);
        ensure!(
            path.exists(),
            "{} is missing: build the workspace binaries first (`make build`)",
            path.display()
        );
    }

    // The API reaches its OpenID provider at start.
    let public_url = "http://atelier.test";
    let oidc = start_oidc_provider(&cluster.dir().join("oidc"), public_url)?;

    // Install. CRDs already exist (the test cluster installs the chart's): Helm skips them.
    let values = examples_dir()
        .join("values-local.yaml")
        .to_string_lossy()
        .into_owned();
    let install = helm(&[
        "install",
        RELEASE,
        &chart,
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "-f",
        &values,
        "--set",
        &format!("api.oidc.issuerUrl={}", oidc.issuer),
        "--set",
        &format!("api.publicUrl={public_url}"),
        "--set",
        &format!("api.oidc.audience={public_url}/api"),
        "--wait",
        "--timeout",
        "5m",
    ])
    .await;
    if let Err(error) = install {
        let pods = Api::<Pod>::namespaced(client.clone(), RELEASE_NAMESPACE)
            .list(&ListParams::default())
            .await?
            .items;
        return Err(error.context(format!(
            "pods: {:?}\nlogs:\n{}",
            pods.iter()
                .map(|p| (p.name_any(), p.status.clone()))
                .collect::<Vec<_>>(),
            release_logs(cluster, &pods)
        )));
    }
    let operators = wait_for("two ready operator pods", SLOW, || async {
        let pods = ready_pods(&client, "operator").await?;
        Ok((pods.len() == 2).then_some(pods))
    })
    .await?;
    wait_for("a ready API pod", SLOW, || async {
        Ok(ready_pods(&client, "api").await?.into_iter().next())
    })
    .await?;
    // The pods run as their ServiceAccounts: that is what the kubelet hands them.
    for pod in &operators {
        ensure!(
            pod.spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                == Some("atelier-operator")
        );
    }

    // Exactly one leader, holding the Lease the chart created.
    let lease = || async {
        let text = kubectl(
            cluster,
            &[
                "-n",
                RELEASE_NAMESPACE,
                "get",
                "lease",
                "atelier-operator",
                "-o",
                "json",
            ],
            None,
        )
        .await?;
        anyhow::Ok(serde_json::from_str::<Value>(&text)?)
    };
    let leader = wait_for("a leader", Duration::from_secs(60), || async {
        let lease = lease().await?;
        Ok(lease["spec"]["holderIdentity"]
            .as_str()
            .filter(|h| operators.iter().any(|p| p.name_any() == *h))
            .map(String::from))
    })
    .await;
    if let Err(error) = leader {
        let current = lease()
            .await
            .map_or_else(|e| e.to_string(), |l| l.to_string());
        return Err(error.context(format!(
            "lease {current}\nlogs:\n{}",
            release_logs(cluster, &operators)
        )));
    }

    // The example tenant on the tiny model, and the example job, submitted by its user.
    let model_dir = cluster.dir().join("models/flux-tiny");
    run(
        &cluster.bin_dir().join("atelier-inference"),
        &["make-tiny-model", "--out", &model_dir.to_string_lossy()],
        None,
    )
    .await?;
    let pv = example(
        "model-pv-local.yaml",
        &[("MODEL_DIR", &model_dir.to_string_lossy())],
    );
    kubectl(cluster, &["apply", "-f", "-"], Some(&pv)).await?;
    kubectl(
        cluster,
        &[
            "apply",
            "-f",
            &examples_dir().join("tenant.yaml").to_string_lossy(),
        ],
        None,
    )
    .await?;
    let tenants: Api<Tenant> = Api::all(client.clone());
    let tenant_ready =
        wait_for("tenant team-a Ready", SLOW, || async {
            let tenant = tenants.get(TENANT).await?;
            Ok((tenant.status.as_ref().and_then(|s| s.phase)
                == Some(atelier_crds::TenantPhase::Ready))
            .then_some(()))
        })
        .await;
    if let Err(error) = tenant_ready {
        let status = tenants.get(TENANT).await.ok().and_then(|t| t.status);
        return Err(error.context(format!(
            "tenant status: {status:?}\nlogs:\n{}",
            release_logs(cluster, &operators)
        )));
    }

    // kubectl users: a team member may not create a job for someone else (admission policy)...
    let job_text = example("generationjob.yaml", &[]);
    let as_mallory = kubectl_as(
        cluster,
        "oidc:mallory@example.com",
        &["oidc:team-a", "system:authenticated"],
        &["create", "-f", "-"],
        Some(&job_text),
    )
    .await;
    let message = format!(
        "{:#}",
        as_mallory.expect_err("creating a job for another user must be refused")
    );
    ensure!(
        message.contains("spec.user must be your own identity"),
        "refused for the wrong reason: {message}"
    );
    // ...nor rank their job above fair share, nor list the other members' jobs...
    let prioritized = example(
        "generationjob.yaml",
        &[("numImages: 1", "numImages: 1\n  priority: 100")],
    );
    let as_alice_first = kubectl_as(
        cluster,
        "oidc:alice@example.com",
        &["oidc:team-a", "system:authenticated"],
        &["create", "-f", "-"],
        Some(&prioritized),
    )
    .await;
    let message = format!(
        "{:#}",
        as_alice_first.expect_err("a member's job of priority 100 must be refused")
    );
    ensure!(
        message.contains("spec.priority is for tenant admins"),
        "refused for the wrong reason: {message}"
    );
    let listed = kubectl_as(
        cluster,
        "oidc:alice@example.com",
        &["oidc:team-a", "system:authenticated"],
        &["-n", TENANT_NAMESPACE, "get", "generationjobs"],
        None,
    )
    .await;
    ensure!(
        listed
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("forbidden")),
        "a member listed every job of the tenant: {listed:?}"
    );
    // ...nor outside their tenant's RoleBinding...
    expect_forbidden(
        cluster,
        "oidc:alice@example.com",
        &["-n", "default", "get", "generationjobs"],
    )
    .await?;
    // ...and creates their own through the RoleBinding the operator made for group team-a.
    kubectl_as(
        cluster,
        "oidc:alice@example.com",
        &["oidc:team-a", "system:authenticated"],
        &["create", "-f", "-"],
        Some(&job_text),
    )
    .await?;
    let jobs: Api<GenerationJob> = Api::namespaced(client.clone(), TENANT_NAMESPACE);
    let finished = wait_for("the example job to finish", SLOW, || async {
        let job = jobs.get("lighthouse-at-dusk").await?;
        Ok(job.phase().is_finished().then_some(job))
    })
    .await;
    let job = match finished {
        Ok(job) => job,
        Err(error) => return Err(error.context(diagnostics(cluster, &client, &operators).await)),
    };
    ensure!(
        job.phase() == JobPhase::Succeeded,
        "the example job ended {:?}: {:?}",
        job.phase(),
        job.status
    );
    let output = job
        .status
        .as_ref()
        .and_then(|s| s.outputs.first())
        .context("no output")?;
    let outputs_dir = claim_dir(&client, TENANT_NAMESPACE, "outputs").await?;
    let png = outputs_dir.join(output.path.trim_start_matches("/outputs/"));
    let bytes = std::fs::read(&png).with_context(|| format!("reading {}", png.display()))?;
    ensure!(
        bytes.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        png.display()
    );

    // Requests outside the operator's and the API's roles are refused.
    expect_forbidden(cluster, OPERATOR_SA, &["get", "secrets", "-A"]).await?;
    expect_forbidden(
        cluster,
        OPERATOR_SA,
        &["-n", TENANT_NAMESPACE, "delete", "deployment", "inference"],
    )
    .await?;
    expect_forbidden(
        cluster,
        OPERATOR_SA,
        &[
            "create",
            "clusterrolebinding",
            "escalate",
            "--clusterrole=cluster-admin",
            "--user=x",
        ],
    )
    .await?;
    expect_forbidden(
        cluster,
        OPERATOR_SA,
        &[
            "-n",
            TENANT_NAMESPACE,
            "create",
            "rolebinding",
            "escalate",
            "--clusterrole=admin",
            "--user=x",
        ],
    )
    .await?;
    expect_forbidden(cluster, OPERATOR_SA, &["-n", "default", "get", "leases"]).await?;
    expect_forbidden(
        cluster,
        OPERATOR_SA,
        &["-n", TENANT_NAMESPACE, "get", "pod", "any-pod"],
    )
    .await?;
    expect_forbidden(cluster, API_SA, &["delete", "tenant", TENANT]).await?;
    expect_forbidden(cluster, API_SA, &["-n", TENANT_NAMESPACE, "get", "secrets"]).await?;
    expect_forbidden(cluster, API_SA, &["-n", "default", "get", "configmaps"]).await?;
    // RBAC grants these cluster-wide; the platform-scope admission policy keeps them inside
    // the namespaces the operator manages.
    expect_forbidden(
        cluster,
        OPERATOR_SA,
        &[
            "-n",
            "default",
            "create",
            "deployment",
            "scope",
            "--image=x",
        ],
    )
    .await?;
    expect_forbidden(
        cluster,
        API_SA,
        &["-n", "default", "create", "configmap", "atelier-presets"],
    )
    .await?;
    let bystander = cluster.create_namespace("bystander").await?;
    expect_forbidden(cluster, OPERATOR_SA, &["delete", "namespace", &bystander]).await?;

    // CRD upgrade path (Helm never upgrades crds/): an outdated CRD comes back with the
    // documented command.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let remove_columns =
        r#"[{"op": "remove", "path": "/spec/versions/0/additionalPrinterColumns"}]"#;
    kubectl(
        cluster,
        &[
            "patch",
            "crd",
            "tenants.atelier.dev",
            "--type",
            "json",
            "-p",
            remove_columns,
        ],
        None,
    )
    .await?;
    let outdated = crds.get("tenants.atelier.dev").await?;
    ensure!(
        outdated.spec.versions[0]
            .additional_printer_columns
            .is_none(),
        "the CRD was not made outdated"
    );
    let crd_dir = chart_dir().join("crds").to_string_lossy().into_owned();
    kubectl(
        cluster,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &crd_dir,
        ],
        None,
    )
    .await?;
    let restored = crds.get("tenants.atelier.dev").await?;
    ensure!(
        restored.spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .is_some_and(|c| !c.is_empty()),
        "the CRD was not upgraded"
    );

    // helm upgrade with a changed value rolls the pods out.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let before = deployments
        .get("atelier-operator")
        .await?
        .metadata
        .generation;
    helm(&[
        "upgrade",
        RELEASE,
        &chart,
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        RELEASE_NAMESPACE,
        "--reuse-values",
        "--set",
        "logLevel=info\\,atelier_operator=debug",
        "--wait",
        "--timeout",
        "5m",
    ])
    .await?;
    let after = deployments
        .get("atelier-operator")
        .await?
        .metadata
        .generation;
    ensure!(
        after > before,
        "the operator Deployment did not change ({before:?} → {after:?})"
    );
    wait_for("operator pods with the new RUST_LOG", SLOW, || async {
        let pods = ready_pods(&client, "operator").await?;
        let rolled = pods.len() == 2
            && pods.iter().all(|p| {
                p.spec.as_ref().is_some_and(|s| {
                    s.containers[0].env.iter().flatten().any(|e| {
                        e.name == "RUST_LOG"
                            && e.value.as_deref() == Some("info,atelier_operator=debug")
                    })
                })
            });
        Ok(rolled.then_some(()))
    })
    .await?;
    wait_for("the upgraded API pod", SLOW, || async {
        Ok(ready_pods(&client, "api").await?.into_iter().next())
    })
    .await?;

    // helm uninstall leaves no platform object behind; tenants and their data stay.
    helm(&[
        "uninstall",
        RELEASE,
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        RELEASE_NAMESPACE,
        "--wait",
        "--timeout",
        "3m",
    ])
    .await?;
    // ReplicaSets and pods go by garbage collection, shortly after their Deployment.
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let kinds = "deployments,replicasets,pods,services,serviceaccounts,secrets,configmaps,leases,networkpolicies,poddisruptionbudgets,\
                 roles,rolebindings,clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings,ingresses";
    let left = wait_for("helm uninstall to leave nothing", SLOW, || async {
        let left = kubectl(
            cluster,
            &["get", "-A", "-l", &selector, "-o", "name", kinds],
            None,
        )
        .await?;
        Ok(left.trim().is_empty().then_some(()))
    })
    .await;
    if let Err(error) = left {
        let left = kubectl(
            cluster,
            &["get", "-A", "-l", &selector, "-o", "name", kinds],
            None,
        )
        .await
        .unwrap_or_default();
        return Err(error.context(format!("left behind: {left}")));
    }
    wait_for("the release's pods to go", SLOW, || async {
        let pods = Api::<Pod>::namespaced(client.clone(), RELEASE_NAMESPACE)
            .list(&ListParams::default())
            .await?;
        Ok(pods.items.is_empty().then_some(()))
    })
    .await?;
    let leases = kubectl(
        cluster,
        &["-n", RELEASE_NAMESPACE, "get", "leases", "-o", "name"],
        None,
    )
    .await?;
    ensure!(leases.trim().is_empty(), "leases left behind: {leases}");
    ensure!(
        crds.get_opt("tenants.atelier.dev").await?.is_some(),
        "the CRDs stay (Helm never deletes crds/)"
    );
    ensure!(tenants.get_opt(TENANT).await?.is_some(), "tenants stay");
    ensure!(
        Api::<Namespace>::all(client.clone())
            .get_opt(TENANT_NAMESPACE)
            .await?
            .is_some(),
        "the tenant namespace stays"
    );
    ensure!(png.exists(), "the image stays on the tenant volume");
    drop(oidc);
    Ok(())
}

/// `scripts/demo.sh --no-wait` (what `make demo` runs, stopping right after its summary) works
/// from scratch and leaves nothing behind.
#[tokio::test]
async fn the_demo_runs_and_cleans_up_after_itself() -> anyhow::Result<()> {
    let script = paths::workspace_root().join("scripts/demo.sh");
    let bin_dir = paths::default_bin_dir();
    let target = bin_dir
        .parent()
        .context("the bin dir is target/debug")?
        .to_string_lossy()
        .into_owned();
    let tmp = tempfile::tempdir()?;
    let output = tokio::time::timeout(
        Duration::from_secs(900),
        tokio::process::Command::new("bash")
            .arg(&script)
            .env("ATELIER_DEMO_EXIT", "1")
            .env("CARGO_TARGET_DIR", &target)
            .env("ATELIER_DEMO_TMP", tmp.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the demo took more than 15 minutes")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "the demo failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let image = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Image:"))
        .context("no Image: line")?
        .trim();
    ensure!(
        image.ends_with(".png"),
        "the demo printed no PNG path: {stdout}"
    );
    for expected in [
        "Web page:",
        "Login:",
        "lighthouse-at-dusk",
        "Succeeded",
        "atelier-operator",
        "team-a",
    ] {
        ensure!(
            stdout.contains(expected),
            "the summary lacks {expected:?}:\n{stdout}"
        );
    }
    // Everything it started is gone with it: no state directory, no process of its own.
    let left: Vec<_> = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    ensure!(left.is_empty(), "the demo left {left:?}");
    let processes = run(Path::new("ps"), &["-eo", "args"], None).await?;
    let state = tmp.path().to_string_lossy().into_owned();
    let stray: Vec<&str> = processes.lines().filter(|l| l.contains(&state)).collect();
    ensure!(stray.is_empty(), "processes left running: {stray:?}");
    Ok(())
}
