//! The API's surroundings in the end-to-end tests: the test OpenID provider
//! (`tests/oidc/provider.mjs`, npm `oidc-provider`) with its users, and the API process
//! (`atelier-operator api`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
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
    json!([
        user("alice", Some(&["team-x"])),
        user("bob", Some(&["team-x"])),
        user("carol", Some(&["team-x-admins"])),
        user("dave", Some(&["team-y"])),
        user("erin", Some(&[PLATFORM_ADMINS])),
        user("frank", None),
        user("gina", Some(&["team-q"])),
        user("hank", Some(&["team-x"])),
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

/// The test OpenID provider.
pub struct Provider {
    pub issuer: String,
    _process: TestProcess,
}

impl Provider {
    pub fn start(dir: &Path, api_url: &str) -> anyhow::Result<Self> {
        let oidc_dir = paths::workspace_root().join("tests/oidc");
        if !oidc_dir.join("node_modules/oidc-provider").exists() {
            bail!("run `npm ci` in {} first", oidc_dir.display());
        }
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
        let config_path = dir.join(format!("oidc-{}.json", free_port()));
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let log = std::fs::File::create(config_path.with_extension("log"))?;
        let mut command = Command::new("node");
        command
            .arg(oidc_dir.join("provider.mjs"))
            .arg("--config")
            .arg(&config_path)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(log);
        let (process, stdout) = TestProcess::spawn(command)?;
        let lines = BufReader::new(stdout.expect("captured")).lines();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keeps reading after READY so that the provider never blocks on a full pipe.
            for line in lines.map_while(Result::ok) {
                if let Some(issuer) = line.strip_prefix("READY ") {
                    let _ = sender.send(issuer.to_string());
                }
            }
        });
        let issuer = receiver
            .recv_timeout(Duration::from_secs(30))
            .context("the OpenID provider did not start")?;
        Ok(Self {
            issuer,
            _process: process,
        })
    }
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
