//! Clients of the API in the end-to-end tests: a minimal browser for the login flows and a
//! bearer-token client with real access tokens from the test OpenID provider.

use std::collections::HashMap;

use anyhow::{anyhow, bail};
use atelier_tests::unique_name;
use base64::Engine as _;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use serde_json::Value;
use sha2::Digest;

use super::platform::{AUDIENCE, CLI_REDIRECT};

/// A minimal browser: cookies per origin, redirects followed by hand.
pub struct Browser {
    pub http: reqwest::Client,
    pub cookies: HashMap<String, HashMap<String, String>>,
    /// Raw Set-Cookie headers seen, to check their attributes.
    pub set_cookies: Vec<String>,
}

pub fn origin(url: &reqwest::Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or_default()
    )
}

impl Browser {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Self {
            http,
            cookies: HashMap::new(),
            set_cookies: Vec::new(),
        }
    }

    pub async fn send(
        &mut self,
        method: reqwest::Method,
        url: &str,
        form: Option<&[(&str, &str)]>,
        headers: HeaderMap,
    ) -> anyhow::Result<reqwest::Response> {
        let parsed = reqwest::Url::parse(url)?;
        let jar = self.cookies.entry(origin(&parsed)).or_default();
        let mut request = self.http.request(method, parsed.clone()).headers(headers);
        if !jar.is_empty() {
            let cookie = jar
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            request = request.header(reqwest::header::COOKIE, cookie);
        }
        if let Some(form) = form {
            let body: String = form
                .iter()
                .map(|(k, v)| format!("{k}={}", form_encode(v)))
                .collect::<Vec<_>>()
                .join("&");
            request = request
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body);
        }
        let response = request.send().await?;
        for value in response.headers().get_all(SET_COOKIE) {
            let text = value.to_str()?.to_string();
            let pair = text.split(';').next().unwrap_or_default();
            if let Some((name, value)) = pair.split_once('=') {
                let expired = text.to_ascii_lowercase().contains("max-age=0") || value.is_empty();
                if expired {
                    jar.remove(name.trim());
                } else {
                    jar.insert(name.trim().to_string(), value.to_string());
                }
            }
            self.set_cookies.push(text);
        }
        Ok(response)
    }

    /// GETs `url` and follows redirects until an answer that is not one, or until the next
    /// location starts with `stop_at`; returns the last URL and response.
    pub async fn navigate(
        &mut self,
        url: &str,
        stop_at: Option<&str>,
    ) -> anyhow::Result<(String, reqwest::Response)> {
        let mut url = url.to_string();
        for _ in 0..20 {
            let response = self
                .send(reqwest::Method::GET, &url, None, HeaderMap::new())
                .await?;
            if !response.status().is_redirection() {
                return Ok((url, response));
            }
            let next = location(&url, &response)?;
            if stop_at.is_some_and(|prefix| next.starts_with(prefix)) {
                return Ok((next, response));
            }
            url = next;
        }
        bail!("too many redirects from {url}")
    }

    /// Fills the provider's login form at `form_url` and follows the redirects.
    pub async fn sign_in(
        &mut self,
        form_url: &str,
        user: &str,
        password: &str,
        stop_at: Option<&str>,
    ) -> anyhow::Result<(String, reqwest::Response)> {
        let action = format!("{form_url}/login");
        let response = self
            .send(
                reqwest::Method::POST,
                &action,
                Some(&[("login", user), ("password", password)]),
                HeaderMap::new(),
            )
            .await?;
        if !response.status().is_redirection() {
            return Ok((action, response));
        }
        let next = location(&action, &response)?;
        self.navigate(&next, stop_at).await
    }
}

pub fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn location(base: &str, response: &reqwest::Response) -> anyhow::Result<String> {
    let location = response
        .headers()
        .get(LOCATION)
        .ok_or_else(|| anyhow!("redirect without Location"))?
        .to_str()?;
    Ok(reqwest::Url::parse(base)?.join(location)?.to_string())
}
/// A real access token for the API: authorization code flow with PKCE of the public
/// command-line client, with the API as resource (so the provider issues a JWT for it).
pub async fn access_token(issuer: &str, user: &str) -> anyhow::Result<String> {
    let verifier = format!("{}-{}", unique_name(user), "v".repeat(48));
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    let mut url = reqwest::Url::parse(&format!("{}/auth", issuer))?;
    url.query_pairs_mut()
        .append_pair("client_id", "atelier-cli")
        .append_pair("response_type", "code")
        .append_pair("scope", "openid email groups atelier")
        .append_pair("redirect_uri", CLI_REDIRECT)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256")
        .append_pair("state", "state-1")
        .append_pair("resource", AUDIENCE);
    let mut browser = Browser::new();
    let (form_url, _) = browser.navigate(url.as_str(), Some(CLI_REDIRECT)).await?;
    let (callback, _) = browser
        .sign_in(&form_url, user, &format!("{user}-pw"), Some(CLI_REDIRECT))
        .await?;
    let callback = reqwest::Url::parse(&callback)?;
    let code = callback
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| anyhow!("no code in {callback}"))?;
    let response = reqwest::Client::new()
        .post(format!("{}/token", issuer))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", CLI_REDIRECT),
            ("client_id", "atelier-cli"),
            ("code_verifier", &verifier),
            ("resource", AUDIENCE),
        ])
        .send()
        .await?;
    let body: Value = response.json().await?;
    let token = body["access_token"]
        .as_str()
        .ok_or_else(|| anyhow!("no access token: {body}"))?;
    assert_eq!(token.split('.').count(), 3, "a JWT access token");
    Ok(token.to_string())
}

/// A bearer-token client of the API.
pub struct Bearer {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Bearer {
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.to_string(),
            token: token.to_string(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.call(reqwest::Method::DELETE, path, None).await
    }
}
