//! The inference server over real HTTP, with the real pipeline on a tiny random-weight model.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use atelier_inference::server::{self, ServeConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_runs_and_resubmission_is_idempotent() {
    let server = Server::start(|_| {}).await;
    let body = job("job-idem-1", 2);

    let (code, first) = server.post_job(&body).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{first}");
    assert_eq!(first["id"], "job-idem-1");
    assert!(
        matches!(first["state"].as_str(), Some("queued" | "running")),
        "{first}"
    );
    assert_eq!(first["totalSteps"], 2);
    assert_eq!(first["seed"], 42);

    // Again while it runs, then after it finished: the same job, never a second generation.
    let (code, again) = server.post_job(&body).await;
    assert_eq!(code, StatusCode::OK, "{again}");
    assert_eq!(again["createdAt"], first["createdAt"]);
    let done = server.wait_finished("job-idem-1").await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["step"], 2);
    assert_eq!(done["error"], Value::Null);
    let (code, after) = server.post_job(&body).await;
    assert_eq!(
        (code, &after["state"]),
        (StatusCode::OK, &json!("succeeded"))
    );

    let outputs = done["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    let output = &outputs[0];
    let path = output["path"].as_str().unwrap();
    assert!(
        path.starts_with("alice@example.com/") && path.ends_with("_42_jobidem1.png"),
        "{path}"
    );
    assert_eq!(
        (output["width"].as_u64(), output["height"].as_u64()),
        (Some(256), Some(256))
    );
    let png = std::fs::read(server.outputs().join(path)).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(output["bytes"].as_u64(), Some(png.len() as u64));
    let sha = sha256_hex(&png);
    assert_eq!(output["sha256"].as_str(), Some(sha.as_str()));
    let metadata: Value = serde_json::from_slice(
        &std::fs::read(
            server
                .outputs()
                .join(output["metadataPath"].as_str().unwrap()),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(metadata["jobId"], "job-idem-1");
    assert_eq!(metadata["user"], "alice@example.com");
    assert_eq!(metadata["prompt"], "a red fox");
    assert_eq!(metadata["sha256"].as_str(), Some(sha.as_str()));
    assert_eq!(metadata["steps"], 2);

    // One generation: exactly one PNG and its metadata.
    assert_eq!(
        list_files(&server.outputs().join("alice@example.com")).len(),
        2
    );

    // Same id, different request.
    let mut changed = body.clone();
    changed["prompt"] = json!("a blue fox");
    let (code, conflict) = server.post_job(&changed).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(conflict["error"]["reason"], "Conflict");

    // The listing keeps finished jobs for re-adoption.
    let list = server.get_json("/v1/jobs").await;
    assert_eq!(list["capacity"], 1);
    assert_eq!(list["active"], 0);
    assert_eq!(list["jobs"][0]["id"], "job-idem-1");
    assert_eq!(
        server.get("/v1/jobs/nope").await.status(),
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_writes_one_file_per_image() {
    let server = Server::start(|_| {}).await;
    let mut body = job("batch-1", 2);
    body["numImages"] = json!(2);
    server.post_job(&body).await;
    let done = server.wait_finished("batch-1").await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let paths: Vec<&str> = done["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), 2);
    assert!(
        paths[0].ends_with("_batch1.png") && paths[1].ends_with("_batch1_1.png"),
        "{paths:?}"
    );
    assert_eq!(
        list_files(&server.outputs().join("alice@example.com")).len(),
        4
    );
    server.stop().await;
}

/// The operator sends a job again when its pod was lost; the images that pod already wrote on
/// the shared volume are the result, and an unfinished attempt's files are cleaned up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_job_is_answered_from_the_images_of_a_lost_pod() {
    let volume = tempfile::tempdir().unwrap();
    let on_volume = |config: &mut ServeConfig| config.outputs_dir = volume.path().to_owned();
    let user_dir = volume.path().join("alice@example.com");
    let body = job("resent-1", 2);

    let first_pod = Server::start(on_volume).await;
    first_pod.post_job(&body).await;
    let first = first_pod.wait_finished("resent-1").await;
    assert_eq!(first["state"], "succeeded", "{first}");
    first_pod.stop().await;

    let second_pod = Server::start(on_volume).await;
    let (code, again) = second_pod.post_job(&body).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["state"], "succeeded", "{again}");
    assert_eq!(again["outputs"], first["outputs"]);
    assert_eq!(list_files(&user_dir).len(), 2, "no second image");
    let metrics = second_pod.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "atelier_inference_steps_total 0"),
        "the second pod generated nothing:\n{metrics}"
    );
    second_pod.stop().await;

    // A pod killed between the metadata and the PNG: the job is generated again, and the
    // metadata file without its image is gone.
    let png = volume
        .path()
        .join(first["outputs"][0]["path"].as_str().unwrap());
    std::fs::remove_file(&png).unwrap();
    let third_pod = Server::start(on_volume).await;
    third_pod.post_job(&body).await;
    let regenerated = third_pod.wait_finished("resent-1").await;
    assert_eq!(regenerated["state"], "succeeded", "{regenerated}");
    let files = list_files(&user_dir);
    assert_eq!(files.len(), 2, "{files:?}");
    let new_png = regenerated["outputs"][0]["path"].as_str().unwrap();
    assert!(volume.path().join(new_png).is_file());
    third_pod.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_with_reason() {
    let server = Server::start(|_| {}).await;
    let mut no_seed = job("bad-1", 2);
    no_seed.as_object_mut().unwrap().remove("seed");
    let mut odd_size = job("bad-2", 2);
    odd_size["width"] = json!(250);
    let mut hostile_id = job("../../etc", 2);
    hostile_id["id"] = json!("../../etc");
    for body in [no_seed, odd_size, hostile_id, json!({"id": "x"})] {
        let (code, answer) = server.post_job(&body).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body} → {answer}");
        assert_eq!(answer["error"]["reason"], "InvalidRequest", "{answer}");
        assert!(!answer["error"]["message"].as_str().unwrap().is_empty());
    }
    let response = server
        .http
        .post(server.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["reason"], "InvalidRequest");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_server_answers_429_and_cancel_stops_mid_run() {
    let server = Server::start(|_| {}).await;
    let (code, _) = server.post_job(&job("slow-1", SLOW_STEPS)).await;
    assert_eq!(code, StatusCode::ACCEPTED);

    let response = server
        .http
        .post(server.url("/v1/jobs"))
        .json(&job("other-1", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().get("retry-after").is_some());
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["reason"], "AtCapacity");

    let running = server
        .wait_for("slow-1", |s| s["step"].as_u64() >= Some(1))
        .await;
    assert_eq!(running["state"], "running");
    let response = server
        .http
        .delete(server.url("/v1/jobs/slow-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cancelled: Value = response.json().await.unwrap();
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["error"]["reason"], "Cancelled");
    assert!(
        cancelled["step"].as_u64() < Some(u64::from(SLOW_STEPS)),
        "{cancelled}"
    );
    assert_eq!(cancelled["outputs"], json!([]));
    // Idempotent on a finished job, 404 on an unknown one.
    let again: Value = server
        .http
        .delete(server.url("/v1/jobs/slow-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["finishedAt"], cancelled["finishedAt"]);
    assert_eq!(
        server
            .http
            .delete(server.url("/v1/jobs/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert!(list_files(&server.outputs().join("alice@example.com")).is_empty());

    // The slot is free again.
    let (code, _) = server.post_job(&job("other-1", 2)).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    assert_eq!(server.wait_finished("other-1").await["state"], "succeeded");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_job_is_cancelled_without_running() {
    let server = Server::start(|c| c.concurrency = 2).await;
    server.post_job(&job("slow-q1", SLOW_STEPS)).await;
    // Once the first runs, the second can only wait.
    server
        .wait_for("slow-q1", |s| s["state"] == "running")
        .await;
    let (code, queued) = server.post_job(&job("quick-q2", 2)).await;
    assert_eq!(
        (code, &queued["state"]),
        (StatusCode::ACCEPTED, &json!("queued"))
    );
    let (code, _) = server.post_job(&job("third-q3", 2)).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    let metrics = server.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "atelier_inference_queue_depth 1"),
        "{metrics}"
    );

    let cancelled: Value = server
        .http
        .delete(server.url("/v1/jobs/quick-q2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["state"], "cancelled");
    assert_eq!(cancelled["startedAt"], Value::Null);
    server
        .http
        .delete(server.url("/v1/jobs/slow-q1"))
        .send()
        .await
        .unwrap();
    assert_eq!(server.wait_finished("slow-q1").await["state"], "cancelled");
    assert_eq!(
        server.get_json("/v1/jobs/quick-q2").await["startedAt"],
        Value::Null
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_fails_the_job_with_deadline_exceeded() {
    let server = Server::start(|_| {}).await;
    let mut body = job("deadline-1", SLOW_STEPS);
    body["timeoutSeconds"] = json!(1);
    server.post_job(&body).await;
    let done = server.wait_finished("deadline-1").await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["reason"], "DeadlineExceeded");
    assert!(
        done["step"].as_u64() < Some(u64::from(SLOW_STEPS)),
        "the generation was stopped: {done}"
    );
    assert!(list_files(&server.outputs().join("alice@example.com")).is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_write_error_fails_the_job_without_files() {
    let server = Server::start(|_| {}).await;
    // The user's directory is taken by a regular file: every write below it fails (also for
    // root, who ignores permission bits). A full disk is covered by the tmpfs test below.
    std::fs::write(server.outputs().join("bob"), b"").unwrap();
    let mut body = job("write-fail-1", 2);
    body["user"] = json!("bob");
    server.post_job(&body).await;
    let done = server.wait_finished("write-fail-1").await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["reason"], "OutputWriteFailed");
    assert_eq!(list_files(server.outputs()), ["bob"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_the_job_without_partial_files() {
    let Some(tmpfs) = TinyTmpfs::mount(8 * 1024) else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the read-only-path test still runs"
        );
        return;
    };
    let outputs = tmpfs.path().to_owned();
    let server = Server::start(move |c| c.outputs_dir = outputs).await;
    server.post_job(&job("full-1", 2)).await;
    let done = server.wait_finished("full-1").await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["reason"], "OutputWriteFailed");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{done}"
    );
    // Not the metadata written before the PNG, not a temp file: nothing at all.
    assert_eq!(
        list_files(&tmpfs.path().join("alice@example.com")),
        Vec::<String>::new()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_moves_to_device_for_jobs_and_back_when_idle() {
    let server = Server::start(|c| c.idle_offload = Duration::from_secs(3)).await;
    let (code, ready) = server.get_status_json("/readyz").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        (&ready["state"], &ready["capacity"], &ready["active"]),
        (&json!("host"), &json!(1), &json!(0))
    );
    let model = server.get_json("/v1/model").await;
    assert_eq!(model["state"], "host");
    assert_eq!(model["precision"], "bf16");
    assert!(model["weightBytes"].as_u64() > Some(0), "{model}");
    assert!(!model["name"].as_str().unwrap().is_empty());

    server.post_job(&job("warm-1", 2)).await;
    server.wait_finished("warm-1").await;
    // Right after a job the weights stay on the device...
    assert_eq!(server.get_json("/readyz").await["state"], "device");
    let metrics = server.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"atelier_inference_model_state{state="device"} 1"#),
        "{metrics}"
    );
    // ...and go back to host memory after the idle period.
    server
        .wait_model_state("host", Duration::from_secs(10))
        .await;

    // The next job brings them back; an explicit offload frees the device at once.
    server.post_job(&job("warm-2", 2)).await;
    server.wait_finished("warm-2").await;
    assert_eq!(server.get_json("/v1/model").await["state"], "device");
    let response = server
        .http
        .post(server.url("/v1/model/offload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let model: Value = response.json().await.unwrap();
    assert_eq!(model["state"], "host");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_is_refused_while_a_job_runs() {
    let server = Server::start(|_| {}).await;
    server.post_job(&job("busy-1", SLOW_STEPS)).await;
    server.wait_for("busy-1", |s| s["state"] == "running").await;
    let response = server
        .http
        .post(server.url("/v1/model/offload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["reason"], "ModelBusy");
    server
        .http
        .delete(server.url("/v1/jobs/busy-1"))
        .send()
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_steps_jobs_and_memory() {
    let server = Server::start(|_| {}).await;
    server.post_job(&job("metrics-1", 3)).await;
    server.wait_finished("metrics-1").await;
    let text = server.get_text("/metrics").await;
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("atelier_inference_steps_total"), 3.0);
    assert!(value("atelier_inference_steps_per_second") > 0.0);
    assert_eq!(value("atelier_inference_generation_seconds_count"), 1.0);
    assert_eq!(value(r#"atelier_inference_jobs{state="succeeded"}"#), 1.0);
    assert_eq!(
        value(r#"atelier_inference_jobs_finished_total{state="succeeded"}"#),
        1.0
    );
    assert_eq!(
        value(r#"atelier_inference_model_state{state="loading"}"#),
        0.0
    );
    assert_eq!(value("atelier_inference_queue_depth"), 0.0);
    assert_eq!(value("atelier_inference_capacity"), 1.0);
    assert!(value("atelier_inference_process_resident_memory_bytes") > 1e6);
    assert!(text.contains("# TYPE atelier_inference_generation_seconds histogram"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_progress_until_finished() {
    let server = Server::start(|_| {}).await;
    server.post_job(&job("events-1", 3)).await;
    let mut response = server.get("/v1/jobs/events-1/events").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    // The stream ends by itself after the final state.
    let read_all = async {
        while let Some(chunk) = response.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read_all)
        .await
        .expect("the stream ends");
    let statuses: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(text.contains("event: status"));
    assert_eq!(statuses.last().unwrap()["state"], "succeeded", "{text}");
    assert!(statuses.len() >= 2, "{text}");
    assert_eq!(
        server.get("/v1/jobs/nope/events").await.status(),
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_running_job_and_refuses_new_ones() {
    let server = Server::start(|c| c.shutdown_grace = Duration::from_secs(60)).await;
    server.post_job(&job("drain-1", 20)).await;
    server
        .wait_for("drain-1", |s| s["state"] == "running")
        .await;
    let (base, http, outputs, handle) = server.begin_stop();
    // While draining: not ready, new ids refused, known ids still answered.
    let started = Instant::now();
    while http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        == StatusCode::OK
    {
        assert!(started.elapsed() < Duration::from_secs(10), "still ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = http
        .post(format!("{base}/v1/jobs"))
        .json(&job("late-1", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let answer: Value = refused.json().await.unwrap();
    assert_eq!(answer["error"]["reason"], "ShuttingDown");
    let known = http
        .post(format!("{base}/v1/jobs"))
        .json(&job("drain-1", 20))
        .send()
        .await
        .unwrap();
    assert_eq!(known.status(), StatusCode::OK);
    let result = tokio::time::timeout(Duration::from_secs(120), handle)
        .await
        .expect("server stops");
    result.unwrap().unwrap();
    // The running job was finished, not cancelled.
    assert_eq!(
        list_files(&outputs.path().join("alice@example.com")).len(),
        2
    );
}

// ---- helpers ----

/// Steps of a job that must still be running when the test acts on it (cancel, timeout,
/// capacity): far more than the tiny model needs to make a single step observable.
const SLOW_STEPS: u32 = 100;
/// Upper bound for any job of these tests to finish.
const JOB_TIMEOUT: Duration = Duration::from_secs(180);

/// One tiny checkpoint for all tests of this binary.
fn model_dir() -> &'static Path {
    static MODEL: OnceLock<TempDir> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            atelier_inference::tiny::make_tiny_model(
                dir.path(),
                0,
                &atelier_inference::tiny::TinyModelOptions::tiny(),
            )
            .unwrap();
            dir
        })
        .path()
}

fn job(id: &str, steps: u32) -> Value {
    json!({
        "id": id, "user": "alice@example.com", "prompt": "a red fox",
        "width": 256, "height": 256, "steps": steps, "guidance": 3.5, "seed": 42,
        "numImages": 1, "timeoutSeconds": 600,
    })
}

/// Names in a directory (hidden ones included), sorted; empty if it does not exist.
fn list_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

/// A server running in this process on 127.0.0.1:0.
struct Server {
    base: String,
    http: reqwest::Client,
    outputs: TempDir,
    outputs_dir: PathBuf,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), server::Error>>,
}

impl Server {
    async fn start(configure: impl FnOnce(&mut ServeConfig)) -> Server {
        let model_dir = tokio::task::spawn_blocking(|| model_dir().to_owned())
            .await
            .unwrap();
        let outputs = tempfile::tempdir().unwrap();
        let mut config = ServeConfig {
            model_dir,
            outputs_dir: outputs.path().to_owned(),
            precision: "bf16".parse().unwrap(),
            device: Default::default(),
            compute_dtype: None,
            concurrency: 1,
            idle_offload: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(5),
            api_token: None,
        };
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let outputs_dir = config.outputs_dir.clone();
        let task = tokio::spawn(server::serve(listener, config, async {
            let _ = stopped.await;
        }));
        let server = Server {
            base,
            http: reqwest::Client::new(),
            outputs,
            outputs_dir,
            stop,
            task,
        };
        server
            .wait_model_state("host", Duration::from_secs(120))
            .await;
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn outputs(&self) -> &Path {
        &self.outputs_dir
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    async fn get_status_json(&self, path: &str) -> (StatusCode, Value) {
        let response = self.get(path).await;
        (response.status(), response.json().await.unwrap())
    }

    async fn get_json(&self, path: &str) -> Value {
        let (code, body) = self.get_status_json(path).await;
        assert_eq!(code, StatusCode::OK, "GET {path}: {body}");
        body
    }

    async fn get_text(&self, path: &str) -> String {
        self.get(path).await.text().await.unwrap()
    }

    async fn post_job(&self, body: &Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url("/v1/jobs"))
            .json(body)
            .send()
            .await
            .unwrap();
        (response.status(), response.json().await.unwrap())
    }

    async fn wait_for(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let status = self.get_json(&format!("/v1/jobs/{id}")).await;
            if done(&status) {
                return status;
            }
            assert!(started.elapsed() < JOB_TIMEOUT, "job {id} stuck: {status}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_finished(&self, id: &str) -> Value {
        self.wait_for(id, |s| {
            matches!(
                s["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        })
        .await
    }

    async fn wait_model_state(&self, state: &str, within: Duration) {
        let started = Instant::now();
        loop {
            if let Ok(response) = self.http.get(self.url("/v1/model")).send().await {
                let model: Value = response.json().await.unwrap();
                if model["state"] == state {
                    return;
                }
            }
            assert!(
                started.elapsed() < within,
                "model never reached state {state}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Triggers shutdown; returns what the test still needs while the server drains.
    fn begin_stop(
        self,
    ) -> (
        String,
        reqwest::Client,
        TempDir,
        JoinHandle<Result<(), server::Error>>,
    ) {
        let _ = self.stop.send(());
        (self.base, self.http, self.outputs, self.task)
    }

    async fn stop(self) {
        let (_, _, _outputs, task) = self.begin_stop();
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

/// A tmpfs of a few KiB, to run out of space for real; unmounted on drop.
struct TinyTmpfs {
    dir: TempDir,
}

impl TinyTmpfs {
    fn mount(bytes: usize) -> Option<TinyTmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(TinyTmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}
