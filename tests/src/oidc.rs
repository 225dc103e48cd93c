//! The test OpenID provider (`tests/oidc/provider.mjs`, npm `oidc-provider`) as a process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{TestProcess, paths};

/// A running provider and the issuer URL it announced.
pub struct OidcProvider {
    pub issuer: String,
    _process: TestProcess,
}

impl OidcProvider {
    /// Starts the provider on a free loopback port with `config` (clients, users, audience; see
    /// provider.mjs), written to `config_path`; its log goes next to it (`.log`).
    pub fn start(config_path: &Path, config: &Value) -> anyhow::Result<Self> {
        let oidc_dir = paths::workspace_root().join("tests/oidc");
        if !oidc_dir.join("node_modules/oidc-provider").exists() {
            bail!("run `npm ci` in {} first", oidc_dir.display());
        }
        std::fs::write(config_path, serde_json::to_vec_pretty(config)?)?;
        let log = std::fs::File::create(config_path.with_extension("log"))?;
        let mut command = Command::new("node");
        command
            .arg(oidc_dir.join("provider.mjs"))
            .arg("--config")
            .arg(config_path)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(log);
        let (process, stdout) = TestProcess::spawn(command).context("starting node")?;
        let lines = BufReader::new(stdout.context("the provider's stdout")?).lines();
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

    /// The provider's signing keys, as its discovery document points to them.
    pub async fn jwks(&self) -> anyhow::Result<Value> {
        let http = reqwest::Client::new();
        let discovery: Value = http
            .get(format!("{}/.well-known/openid-configuration", self.issuer))
            .send()
            .await?
            .json()
            .await?;
        let uri = discovery["jwks_uri"].as_str().context("no jwks_uri")?;
        Ok(http.get(uri).send().await?.json().await?)
    }
}

/// A token signed (`mode` "sign") or deliberately malformed (other modes of provider.mjs's
/// `/__test/mint`) by the provider at `issuer`, with exactly `claims`, under key `kid` or the
/// current one.
pub async fn mint(
    issuer: &str,
    mode: &str,
    claims: &Value,
    kid: Option<&str>,
) -> anyhow::Result<String> {
    mint_request(
        issuer,
        &serde_json::json!({ "mode": mode, "claims": claims, "kid": kid }),
    )
    .await
}

/// A token signed with the provider's current key whose JOSE header has `header`'s fields
/// added (such as `crit`).
pub async fn mint_with_header(
    issuer: &str,
    claims: &Value,
    header: &Value,
) -> anyhow::Result<String> {
    mint_request(
        issuer,
        &serde_json::json!({ "mode": "sign", "claims": claims, "header": header }),
    )
    .await
}

async fn mint_request(issuer: &str, request: &Value) -> anyhow::Result<String> {
    let body: Value = reqwest::Client::new()
        .post(format!("{issuer}/__test/mint"))
        .json(request)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(body["token"]
        .as_str()
        .context("the provider minted no token")?
        .to_string())
}
