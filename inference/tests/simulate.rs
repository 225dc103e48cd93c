//! `serve --simulate`: the real job API with no model (docs/inference-api.md, *Simulate mode*).

use std::time::{Duration, Instant};

use atelier_inference::server::simulate::SimulateConfig;
use atelier_inference::server::{self, ServeConfig};
use serde_json::{Value, json};
use tokio::net::TcpListener;

#[tokio::test]
async fn a_simulated_job_reports_its_steps_and_writes_a_png_like_a_real_one() {
    let outputs = tempfile::tempdir().unwrap();
    let config = ServeConfig {
        model_dir: "/nonexistent".into(),
        outputs_dir: outputs.path().to_owned(),
        precision: "bf16".parse().unwrap(),
        device: Default::default(),
        compute_dtype: None,
        concurrency: 2,
        idle_offload: Duration::from_secs(300),
        shutdown_grace: Duration::from_secs(5),
        api_token: None,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::serve_simulated(
        listener,
        config,
        SimulateConfig {
            step_delay: Duration::from_millis(5),
        },
        async {
            let _ = stopped.await;
        },
    ));
    let http = reqwest::Client::new();
    let model: Value = http
        .get(format!("{base}/v1/model"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(model["name"], "simulated");
    assert_eq!(model["state"], "host");

    let request = json!({"id": "sim-1", "user": "ann@example.com", "prompt": "a fox", "seed": 9,
                         "width": 64, "height": 48, "steps": 3});
    let accepted = http
        .post(format!("{base}/v1/jobs"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let status: Value = http
            .get(format!("{base}/v1/jobs/sim-1"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["state"] == "succeeded" {
            break status;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done["step"], 3);
    let output = &done["outputs"][0];
    assert_eq!(
        (output["width"].as_u64(), output["height"].as_u64()),
        (Some(64), Some(48))
    );
    let png = std::fs::read(outputs.path().join(output["path"].as_str().unwrap())).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(png.len() as u64, output["bytes"].as_u64().unwrap());
    let metadata: Value = serde_json::from_slice(
        &std::fs::read(
            outputs
                .path()
                .join(output["metadataPath"].as_str().unwrap()),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(metadata["model"], "simulated");
    assert_eq!(metadata["jobId"], "sim-1");

    // Idempotent like the real server: the same request again is the same job.
    let again = http
        .post(format!("{base}/v1/jobs"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    drop(stop);
    task.await.unwrap().unwrap();
}
