//! `serve-outputs` over real HTTP: listing, paging, isolation between users, path safety.

use std::path::Path;
use std::time::Duration;

use atelier_inference::outputs::{ImageData, JobInfo, write_job_outputs};
use atelier_inference::server;
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

struct History {
    root: TempDir,
    addr: String,
    http: reqwest::Client,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), server::Error>>,
}

impl History {
    async fn start() -> History {
        let root = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve_outputs(
            listener,
            root.path().to_owned(),
            None,
            async {
                let _ = stopped.await;
            },
        ));
        History {
            root,
            addr,
            http: reqwest::Client::new(),
            stop,
            task,
        }
    }

    fn write(&self, user: &str, job_id: &str, created: &str, images: &[&[u8]]) -> Vec<String> {
        write_outputs(self.root.path(), user, job_id, created, images)
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .unwrap()
    }

    async fn json(&self, path: &str) -> (StatusCode, Value) {
        let response = self.get(path).await;
        (response.status(), response.json().await.unwrap())
    }

    /// Sends the path exactly as given: HTTP clients normalize `..` away, attackers do not.
    async fn raw_status(&self, path: &str) -> u16 {
        let mut stream = TcpStream::connect(&self.addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response.split_whitespace().nth(1).expect("a status line");
        status.parse().unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn write_outputs(
    root: &Path,
    user: &str,
    job_id: &str,
    created: &str,
    images: &[&[u8]],
) -> Vec<String> {
    let job = JobInfo {
        job_id,
        user,
        prompt: "a red fox",
        steps: 2,
        guidance: 3.5,
        model: "tiny",
        created_at: created.parse().unwrap(),
    };
    let images: Vec<ImageData<'_>> = images
        .iter()
        .map(|png| ImageData {
            png,
            width: 256,
            height: 256,
            seed: 7,
        })
        .collect();
    write_job_outputs(root, &job, 7, &images)
        .unwrap()
        .into_iter()
        .map(|f| f.path)
        .collect()
}

fn files(listing: &Value) -> Vec<&str> {
    listing["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["file"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn listing_is_newest_first_paged_and_per_user() {
    let history = History::start().await;
    history.write("alice@example.com", "a0", "2026-11-28T08:00:00Z", &[b"a0"]);
    history.write(
        "alice@example.com",
        "a1",
        "2026-11-29T09:00:00Z",
        &[b"a1-0", b"a1-1"],
    );
    history.write("alice@example.com", "a2", "2026-11-30T10:00:00Z", &[b"a2"]);
    history.write("bob@example.com", "b0", "2026-11-30T11:00:00Z", &[b"b0"]);

    let (code, page) = history
        .json("/v1/outputs/alice%40example.com?limit=2")
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        files(&page),
        ["20261130_100000_7_a2.png", "20261129_090000_7_a1_1.png"]
    );
    let first = &page["images"][0];
    assert_eq!(first["bytes"], 2);
    assert_eq!(first["createdAt"], "2026-11-30T10:00:00Z");
    assert_eq!(first["metadata"]["jobId"], "a2");
    assert_eq!(first["metadata"]["user"], "alice@example.com");
    assert_eq!(page["nextBefore"], "20261129_090000_7_a1_1.png");

    let (_, page) = history
        .json("/v1/outputs/alice@example.com?limit=2&before=20261129_090000_7_a1_1.png")
        .await;
    assert_eq!(
        files(&page),
        ["20261129_090000_7_a1.png", "20261128_080000_7_a0.png"]
    );
    assert_eq!(page["nextBefore"], Value::Null);

    // Bob sees only his; a stranger has an empty history.
    let (_, bob) = history.json("/v1/outputs/bob@example.com").await;
    assert_eq!(files(&bob), ["20261130_110000_7_b0.png"]);
    let (code, nobody) = history.json("/v1/outputs/carol@example.com").await;
    assert_eq!((code, files(&nobody).len()), (StatusCode::OK, 0));

    let (code, bad) = history
        .json("/v1/outputs/alice@example.com?before=../../x")
        .await;
    assert_eq!(
        (code, &bad["error"]["reason"]),
        (StatusCode::BAD_REQUEST, &Value::from("InvalidRequest"))
    );
    let (code, bad) = history
        .json("/v1/outputs/alice@example.com?limit=lots")
        .await;
    assert_eq!(
        (code, &bad["error"]["reason"]),
        (StatusCode::BAD_REQUEST, &Value::from("InvalidRequest"))
    );
    history.stop().await;
}

#[tokio::test]
async fn files_are_served_with_their_content_type() {
    let history = History::start().await;
    let paths = history.write(
        "alice@example.com",
        "a0",
        "2026-11-28T08:00:00Z",
        &[b"\x89PNG-ish"],
    );
    let file = paths[0].strip_prefix("alice@example.com/").unwrap();

    let response = history
        .get(&format!("/v1/outputs/alice@example.com/{file}"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"\x89PNG-ish");

    let json_file = file.replace(".png", ".json");
    let response = history
        .get(&format!("/v1/outputs/alice@example.com/{json_file}"))
        .await;
    assert_eq!(response.headers()["content-type"], "application/json");
    let metadata: Value = response.json().await.unwrap();
    assert_eq!(metadata["prompt"], "a red fox");

    // Another user asking for the same name finds nothing: names only resolve in one's own dir.
    let (code, answer) = history
        .json(&format!("/v1/outputs/bob@example.com/{file}"))
        .await;
    assert_eq!(
        (code, &answer["error"]["reason"]),
        (StatusCode::NOT_FOUND, &Value::from("NotFound"))
    );
    history.stop().await;
}

#[tokio::test]
async fn traversal_and_hostile_names_never_reach_other_files() {
    let history = History::start().await;
    let bob = history.write("bob", "b0", "2026-11-28T08:00:00Z", &[b"bob's"]);
    let bob_file = bob[0].strip_prefix("bob/").unwrap().to_owned();
    std::fs::write(history.root.path().join("secret.png"), b"secret").unwrap();
    // Hostile user names get their own escaped directory, inside the root.
    let hostile = history.write("../bob", "h0", "2026-11-28T09:00:00Z", &[b"hostile"]);
    assert_eq!(hostile[0], "%2E.%2Fbob/20261128_090000_7_h0.png");
    history.write(".hidden", "h1", "2026-11-28T09:00:00Z", &[b"hidden"]);

    for path in [
        format!("/v1/outputs/alice/..%2Fbob%2F{bob_file}"),
        format!("/v1/outputs/alice/%2E%2E%2Fbob%2F{bob_file}"),
        format!("/v1/outputs/../bob/{bob_file}"),
        format!("/v1/outputs/%2E%2E/bob%2F{bob_file}"),
        format!("/v1/outputs/%2E%2E/{bob_file}"),
        format!("/v1/outputs/..%2Fbob/{bob_file}"),
        "/v1/outputs/%2E%2E/secret.png".to_owned(),
        "/v1/outputs/alice/..%2Fsecret.png".to_owned(),
        "/v1/outputs/alice/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd".to_owned(),
        "/v1/outputs/%2F/etc%2Fpasswd".to_owned(),
        "/v1/outputs/bob/.%2E".to_owned(),
        format!("/v1/outputs/bob/{bob_file}%00.png"),
    ] {
        let status = history.raw_status(&path).await;
        assert!(matches!(status, 400 | 404), "{path} → {status}");
    }
    // The hostile users' files are reachable only under their own (escaped) names, and bob's
    // listing shows only bob's file.
    let (_, listing) = history.json("/v1/outputs/..%2Fbob").await;
    assert_eq!(files(&listing), ["20261128_090000_7_h0.png"]);
    let (_, listing) = history.json("/v1/outputs/bob").await;
    assert_eq!(files(&listing), [bob_file.as_str()]);
    let (_, listing) = history.json("/v1/outputs/.hidden").await;
    assert_eq!(listing["images"][0]["metadata"]["user"], ".hidden");
    assert_eq!(
        history
            .raw_status(&format!("/v1/outputs/bob/{bob_file}"))
            .await,
        200
    );
    history.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let history = History::start().await;
    assert_eq!(history.get("/healthz").await.status(), StatusCode::OK);
    let (code, ready) = history.json("/readyz").await;
    assert_eq!(
        (code, &ready["state"]),
        (StatusCode::OK, &Value::from("ready"))
    );
    history.get("/v1/outputs/alice").await;
    let metrics = history.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"atelier_inference_outputs_requests_total{kind="list"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("atelier_inference_process_resident_memory_bytes "),
        "{metrics}"
    );
    // Without its volume the server is not ready.
    let root = history.root.path().to_owned();
    std::fs::remove_dir_all(&root).unwrap();
    assert_eq!(
        history.get("/readyz").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    std::fs::create_dir(&root).unwrap();
    history.stop().await;
}
