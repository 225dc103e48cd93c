//! Completion webhooks, signed like Standard Webhooks (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256>`), sent in the background with retries so that a
//! slow receiver never holds up the queue.

use std::time::Duration;

use atelier_crds::{GenerationJob, WebhookEvent};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use sha2::Sha256;

use super::Context;

const ATTEMPTS: u32 = 5;

/// Sends `event` for `job` if its webhook asks for it; returns at once.
pub fn notify(ctx: &Context, job: &GenerationJob, event: WebhookEvent, phase: &str) {
    let Some(webhook) = job.spec.webhook.clone() else {
        return;
    };
    if !webhook.events.contains(&event) {
        return;
    }
    let client = ctx.client.clone();
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
            "name": job.name_any(),
            "uid": uid,
            "user": job.spec.user,
            "phase": phase,
            "outputs": job.status.as_ref().map(|s| s.outputs.clone()).unwrap_or_default(),
        },
    })
    .to_string();
    let message_id = format!("{uid}-{event_name}");
    tokio::spawn(async move {
        let secret = match &webhook.secret_ref {
            Some(reference) => {
                match signing_key(&client, &namespace, &reference.name, &reference.key).await {
                    Ok(key) => Some(key),
                    Err(error) => {
                        tracing::warn!(%error, "webhook secret unreadable; not sending");
                        return;
                    }
                }
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("plain client");
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
                    tracing::warn!(attempt, status = %response.status(), url = webhook.url, "webhook refused")
                }
                Err(error) => tracing::warn!(attempt, %error, url = webhook.url, "webhook failed"),
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    });
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
