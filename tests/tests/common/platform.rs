//! The API's surroundings in the end-to-end tests: the test OpenID provider
//! (`tests/oidc/provider.mjs`, npm `oidc-provider`) with its users, and the API process
//! (`atelier-operator api`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use atelier_tests::oidc::OidcProvider;
use atelier_tests::{DEFAULT_TIMEOUT, TestCluster, TestProcess, paths, wait_for};
use serde_json::{Value, json};

pub const AUDIENCE: &str = "https://atelier.test/api";
pub const CLI_REDIRECT: &str = "http://127.0.0.1:9/callback";
pub const PLATFORM_ADMINS: &str = "platform-admins";

pub fn users() -> Value {
    let user = |id: &str, groups: Option<&[&str]>| {
        let mut user =
            json!({"id": id, "email": format!("{id}@example.com"), "password": format!("{id}-pw")});
        if let Some(groups) = groups {
            user["groups"] = json!(groups);
        }
        user
    };
    // An address the provider never verified: no identity with the default user claim.
    let mut mallory = user("mallory", Some(&["team-x"]));
    mallory["email_verified"] = json!(false);
    json!([
        user("alice", Some(&["team-x"])),
        user("bob", Some(&["team-x"])),
        user("carol", Some(&["team-x-admins"])),
        user("dave", Some(&["team-y"])),
        user("erin", Some(&[PLATFORM_ADMINS])),
        user("frank", None),
        user("gina", Some(&["team-q"])),
        user("hank", Some(&["team-x"])),
        mallory,
    ])
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = paths::default_bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is missing: run `make build` (cargo build --workspace --bins) first",
            path.display()
        );
    }
    Ok(path)
}

/// The test OpenID provider with the users of [`users`] and the clients of the API under test.
pub fn start_provider(dir: &Path, api_url: &str) -> anyhow::Result<OidcProvider> {
    let config = json!({
        "audience": AUDIENCE,
        "clients": [
            {
                "client_id": "atelier-api",
                "client_secret": "test-secret",
                "redirect_uris": [format!("{api_url}/auth/callback")],
                "post_logout_redirect_uris": [format!("{api_url}/")],
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
            },
            {
                "client_id": "atelier-cli",
                "token_endpoint_auth_method": "none",
                "redirect_uris": [CLI_REDIRECT],
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
            },
        ],
        "users": users(),
    });
    OidcProvider::start(&dir.join(format!("oidc-{}.json", free_port())), &config)
}

/// One running API process and its log (stdout and stderr: JSON lines, audit included).
pub struct ApiProcess {
    pub url: String,
    log: PathBuf,
    _process: TestProcess,
}

impl ApiProcess {
    pub async fn start(
        cluster: &TestCluster,
        dir: &Path,
        port: u16,
        issuer: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let url = format!("http://127.0.0.1:{port}");
        let log = dir.join(format!("api-{port}.log"));
        let file = std::fs::File::create(&log)?;
        let mut command = Command::new(binary("atelier-operator")?);
        command
            .args(["api", "--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--issuer-url",
                issuer,
                "--client-id",
                "atelier-api",
                "--audience",
                AUDIENCE,
            ])
            .args([
                "--public-url",
                &url,
                "--insecure-cookies",
                "--platform-admin-group",
                PLATFORM_ADMINS,
            ])
            .args(extra)
            .env("ATELIER_OIDC_CLIENT_SECRET", "test-secret")
            .env("KUBECONFIG", cluster.kubeconfig_path())
            .env("RUST_LOG", "info")
            .stdout(file.try_clone()?)
            .stderr(file);
        let (process, _) = TestProcess::spawn(command)?;
        let http = reqwest::Client::new();
        let ready = format!("{url}/readyz");
        wait_for("the API to be ready", DEFAULT_TIMEOUT, || async {
            Ok(http
                .get(&ready)
                .send()
                .await?
                .status()
                .is_success()
                .then_some(()))
        })
        .await
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
        Ok(Self {
            url,
            log,
            _process: process,
        })
    }

    /// Everything the API logged so far (stdout and stderr).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The audit events logged so far.
    pub fn audit(&self) -> Vec<Value> {
        self.logs()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["target"] == "audit")
            .collect()
    }

    /// Waits for an audit event with all the given fields.
    pub async fn expect_audit(&self, fields: Value) -> anyhow::Result<Value> {
        let wanted = fields.as_object().expect("an object").clone();
        wait_for(
            &format!("audit event {fields}"),
            Duration::from_secs(10),
            || {
                let found = self
                    .audit()
                    .into_iter()
                    .find(|event| wanted.iter().all(|(k, v)| &event[k] == v));
                async move { Ok(found) }
            },
        )
        .await
    }
}
