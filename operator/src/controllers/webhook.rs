//! Completion webhooks, signed like Standard Webhooks (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256>`), sent in the background with retries so that a
//! slow receiver never holds up the queue.
//!
//! A webhook URL is a tenant member's input sent from the operator's trusted network position:
//! it is resolved once, every address must pass `core::webhook_target`, the connection goes to
//! exactly those addresses (no second lookup to rebind), redirects and proxies are not
//! followed, and the URL is never logged (it may carry a token).

use std::net::SocketAddr;
use std::time::Duration;

use atelier_crds::{GenerationJob, WebhookEvent};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use sha2::Sha256;

use super::Context;
use crate::core::webhook_target;

const ATTEMPTS: u32 = 5;

/// The label a Secret needs before a job's `webhook.secretRef` may name it: the signing key is
/// then one the tenant's admins meant for webhooks, not any Secret of the namespace.
pub const SIGNING_SECRET_LABEL: &str = "atelier.dev/webhook-signing";

/// Sends `event` for `job` if its webhook asks for it; returns at once.
pub fn notify(ctx: &Context, job: &GenerationJob, event: WebhookEvent, phase: &str) {
    let Some(webhook) = job.spec.webhook.clone() else {
        return;
    };
    if !webhook.events.contains(&event) {
        return;
    }
    let client = ctx.client.clone();
    let recorder = ctx.recorder.clone();
    let allowed = ctx.webhook_allowed_cidrs.clone();
    let job_ref = job.object_ref(&());
    let job_name = job.name_any();
    let namespace = job.namespace().unwrap_or_default();
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let event_name = match event {
        WebhookEvent::Started => "generation.started",
        WebhookEvent::Completed => "generation.completed",
    };
    let body = serde_json::json!({
        "type": event_name,
        "timestamp": jiff::Timestamp::now().to_string(),
        "data": {
            "namespace": namespace,
            "name": job_name,
            "uid": uid,
            "user": job.spec.user,
            "phase": phase,
            "outputs": job.status.as_ref().map(|s| s.outputs.clone()).unwrap_or_default(),
        },
    })
    .to_string();
    let message_id = format!("{uid}-{event_name}");
    tokio::spawn(async move {
        let http = match client_for(&webhook.url, &allowed).await {
            Ok(http) => http,
            Err(why) => return warn(&recorder, &job_ref, "WebhookRefused", why).await,
        };
        let secret = match &webhook.secret_ref {
            Some(reference) => {
                match signing_key(&client, &namespace, &reference.name, &reference.key).await {
                    Ok(key) => Some(key),
                    Err(error) => {
                        let why = format!("webhook secret: {error}");
                        return warn(&recorder, &job_ref, "WebhookRefused", why).await;
                    }
                }
            }
            None => None,
        };
        let mut delay = Duration::from_secs(1);
        for attempt in 1..=ATTEMPTS {
            let timestamp = jiff::Timestamp::now().as_second().to_string();
            let mut request = http
                .post(&webhook.url)
                .header("content-type", "application/json")
                .header("webhook-id", &message_id)
                .header("webhook-timestamp", &timestamp);
            if let Some(key) = &secret {
                request = request.header(
                    "webhook-signature",
                    sign(key, &message_id, &timestamp, &body),
                );
            }
            match request.body(body.clone()).send().await {
                Ok(response) if response.status().is_success() => return,
                Ok(response) => {
                    tracing::warn!(attempt, job = job_name, namespace, status = %response.status(), "webhook refused")
                }
                Err(error) => {
                    // reqwest's errors name the URL: keep only what went wrong.
                    let error = error.without_url();
                    tracing::warn!(attempt, job = job_name, namespace, %error, "webhook failed")
                }
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
        let why = format!("{event_name}: no success in {ATTEMPTS} attempts");
        warn(&recorder, &job_ref, "WebhookFailed", why).await;
    });
}

/// Says on the job why its webhook was not (or not successfully) sent.
async fn warn(recorder: &Recorder, job: &ObjectReference, reason: &str, why: String) {
    tracing::warn!(job = ?job.name, namespace = ?job.namespace, reason, %why, "webhook not delivered");
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(why),
        action: "Notify".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, job).await {
        tracing::warn!(%error, "could not publish an event");
    }
}

/// An HTTP client that reaches `url`'s host only at the addresses resolved now, each of them
/// allowed, without redirects or proxies; or why not.
async fn client_for(url: &str, allowed: &[IpNet]) -> Result<reqwest::Client, String> {
    let parsed = reqwest::Url::parse(url).map_err(|error| format!("webhook URL: {error}"))?;
    let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
        return Err("the webhook URL names no host".into());
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|error| format!("the webhook host does not resolve: {error}"))?
        .collect();
    if addresses.is_empty() {
        return Err("the webhook host does not resolve".into());
    }
    for address in &addresses {
        if let Some(why) = webhook_target::refusal(address.ip(), allowed) {
            return Err(format!(
                "the webhook host resolves to {why}, which the operator does not call (operator.webhooks.allowedCidrs)"
            ));
        }
    }
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .resolve_to_addrs(host, &addresses)
        .build()
        .map_err(|error| format!("webhook client: {error}"))
}

/// The signature header value: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`.
pub fn sign(key: &[u8], message_id: &str, timestamp: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{message_id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Reads a `whsec_<base64>` secret (the prefix is optional) and decodes its key bytes.
async fn signing_key(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> anyhow::Result<Vec<u8>> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    if secret
        .labels()
        .get(SIGNING_SECRET_LABEL)
        .map(String::as_str)
        != Some("true")
    {
        anyhow::bail!("secret {name} is not labelled {SIGNING_SECRET_LABEL}=true");
    }
    let value = secret
        .data
        .and_then(|d| d.get(key).cloned())
        .ok_or_else(|| anyhow::anyhow!("key {key} missing in secret {name}"))?;
    let text = String::from_utf8(value.0)?;
    Ok(STANDARD.decode(text.trim().trim_start_matches("whsec_"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        // The example from the Standard Webhooks specification.
        let key = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
